"""Where each token is: RoPE angles and rotation, the sinusoidal table, T5's relative position
bias, and the integer positions of new tokens (pad-aware or not).

Shapes: B batch, N tokens, H heads, D head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary angles, each (B, 1, N, D), for integer positions (B, N)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))  # (D/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, N, D/2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, N, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the two halves of each head (x (B, H, N, D)), the Hugging Face / LLaMA layout."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype))


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed (n_positions, dim) table of "Attention is all you need": sin on even, cos on odd columns."""
    pos = torch.arange(n_positions).float()[:, None]
    inv = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table


def t5_bucket(relative: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): exact for small distances, log-spaced
    up to max_distance, the last bucket beyond; the encoder also separates left from right."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        bucket += (relative > 0).long() * n_buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)
    exact = n_buckets // 2
    large = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact) * (n_buckets - exact)).long()
    large = large.clamp(max=n_buckets - 1)
    return bucket + torch.where(relative < exact, relative, large)


class RelativeBias(nn.Module):
    """T5 relative position bias: one learned scalar per (bucket, head), added to the scores."""

    def __init__(self, config: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = config.rel_buckets, config.rel_max_distance
        self.weight = nn.Parameter(torch.zeros(config.rel_buckets, config.n_heads))

    def forward(self, q_start: int, nq: int, nk: int) -> torch.Tensor:
        """(1, H, Nq, Nk) bias for queries at positions q_start..q_start+Nq-1 and keys 0..Nk-1."""
        q = torch.arange(q_start, q_start + nq, device=self.weight.device)[:, None]
        k = torch.arange(nk, device=self.weight.device)[None, :]
        buckets = t5_bucket(k - q, self.bidirectional, self.n_buckets, self.max_distance)  # (Nq, Nk)
        return F.embedding(buckets, self.weight).permute(2, 0, 1)[None]  # (1, H, Nq, Nk)


def positions_for(padding_mask: torch.Tensor, start, pad_aware: bool) -> torch.Tensor:
    """Integer positions (B, N) of the new tokens: start + index, or (pad_aware) start + the
    number of real tokens before each one, so a left-padded row starts at position 0. `start` is
    an int or a (B,) tensor of tokens already seen."""
    b, n = padding_mask.shape
    if pad_aware:
        start = start[:, None] if isinstance(start, torch.Tensor) else start
        return (start + padding_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, N)
    return torch.arange(n, device=padding_mask.device).expand(b, n) + start
