"""The building blocks shared by every architecture: norms, positions (learned, sinusoidal, RoPE,
T5 relative bias), MLPs, the attention block (self and cross, on ``fusedlm.ops.attention``), the
transformer block, a stack of blocks, and the KV cache.

Shapes: B batch, N tokens, d model width, H query heads, Hkv key/value heads, D head dim.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (LLaMA, Qwen2; T5's "LayerNorm" is the same)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return RMSNorm(config.d_model, config.norm_eps)


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# MLP and attention
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """w_out(act(w_in x)); SwiGLU's gate and up projections are stacked in w_in (gate rows first)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        n_in = 2 * config.d_ff if config.mlp == "swiglu" else config.d_ff
        self.w_in = nn.Linear(config.d_model, n_in, bias=config.mlp_bias)
        self.w_out = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            # two matmuls on the halves of w_in give contiguous outputs (faster elementwise ops
            # than chunking one (B, N, 2 d_ff) output)
            w_gate, w_up = self.w_in.weight.chunk(2)
            b_gate, b_up = self.w_in.bias.chunk(2) if self.w_in.bias is not None else (None, None)
            h = F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)  # (B, N, d_ff)
            return self.w_out(h)
        h = self.w_in(x)  # (B, N, d_ff)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.w_out(h)


class Attention(nn.Module):
    """Multi-head attention with GQA. Self-attention projects q, k, v with one stacked matrix wqkv
    (rows: H*D of q, Hkv*D of k, Hkv*D of v); cross-attention has wq for the queries and wkv for
    the keys/values of the encoder output. Every score computation is ``ops.attention``."""

    def __init__(self, config: ModelConfig, index: int, cross: bool = False):
        super().__init__()
        self.index, self.cross = index, cross
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.scale = config.attn_scale
        d, q_dim, kv_dim = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        if cross:
            self.wq = nn.Linear(d, q_dim, bias=config.qkv_bias)
            self.wkv = nn.Linear(d, 2 * kv_dim, bias=config.qkv_bias)
        else:
            self.wqkv = nn.Linear(d, q_dim + 2 * kv_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(q_dim, d, bias=config.out_bias)

    def _heads(self, t: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, n_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, D)

    def forward(self, x, *, mask="causal", prefix_len=None, key_padding_mask=None, bias=None, rope=None,
                cache: KVCache | None = None, memory: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if not self.cross:
            q, k, v = self.wqkv(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
            q, k, v = self._heads(q, h), self._heads(k, hkv), self._heads(v, hkv)  # (B, H|Hkv, N, D)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.update(self.index, k, v)  # (B, Hkv, past + N, D)
        else:
            q = self._heads(self.wq(x), h)  # (B, H, N, D)
            if cache is not None and cache.cross[self.index] is not None:
                k, v = cache.cross[self.index]  # the encoder's keys/values, projected once
            else:
                k, v = self.wkv(memory).chunk(2, dim=-1)
                k, v = self._heads(k, hkv), self._heads(v, hkv)  # (B, Hkv, M, D)
                if cache is not None:
                    cache.cross[self.index] = (k, v)
        y = ops.attention(q, k, v, mask=mask, prefix_len=prefix_len, key_padding_mask=key_padding_mask, bias=bias, scale=self.scale)
        y = y.transpose(1, 2).reshape(b, n, h * hd)  # (B, N, H*D)
        return self.wo(y)


class Block(nn.Module):
    """Attention (+ cross-attention) + MLP, each with a residual; pre-norm (GPT-2, LLaMA, T5) or
    post-norm (BERT, BART)."""

    def __init__(self, config: ModelConfig, index: int, cross: bool):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attn_norm, self.attn = make_norm(config), Attention(config, index)
        if cross:
            self.cross_norm, self.cross_attn = make_norm(config), Attention(config, index, cross=True)
        self.mlp_norm, self.mlp = make_norm(config), MLP(config)

    def forward(self, x: torch.Tensor, self_args: dict, cross_args: dict | None = None) -> torch.Tensor:
        sublayers = [(self.attn_norm, lambda y: self.attn(y, **self_args))]
        if cross_args is not None:
            sublayers.append((self.cross_norm, lambda y: self.cross_attn(y, **cross_args)))
        sublayers.append((self.mlp_norm, self.mlp))
        for norm, f in sublayers:
            x = x + f(norm(x)) if self.pre_norm else norm(x + f(x))
        return x


class KVCache:
    """Preallocated keys and values of every layer of one stack, for incremental decoding.

    k, v: (L, B, Hkv, max_len, D); mask (B, max_len): True where the key is a real token;
    seen (B,): real tokens so far per row (the next position of a pad-aware model); length: tokens
    written (the same for every row: batches are left-padded); cross: per layer, the encoder's
    projected keys/values for cross-attention (computed at the first step).
    """

    def __init__(self, config: ModelConfig, n_layers: int, batch: int, max_len: int, dtype=torch.float32, device=None):
        shape = (n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        self.cross: list = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new keys/values (B, Hkv, N, D) of `layer`; returns all of them so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, Hkv, end, D)

    def truncate(self, length: int) -> None:
        """Forgets every token from `length` on (the next write starts there)."""
        self.length = length
        self.mask[:, length:] = False
        self.seen = self.mask.long().sum(1)


def positions_for(mask: torch.Tensor, start, pad_aware: bool) -> torch.Tensor:
    """Integer positions (B, N) of the new tokens: start + index, or (pad_aware) start + the
    number of real tokens before each one, so a left-padded row starts at position 0. `start` is
    an int or a (B,) tensor of tokens already seen."""
    b, n = mask.shape
    if pad_aware:
        start = start[:, None] if isinstance(start, torch.Tensor) else start
        return (start + mask.long().cumsum(1) - 1).clamp(min=0)  # (B, N)
    return torch.arange(n, device=mask.device).expand(b, n) + start


class Stack(nn.Module):
    """Position information, the blocks and the final norm, over token embeddings (B, N, d).

    Owns what is per-stack in the checkpoints: learned/sinusoidal position tables, BERT's token
    type table, the embedding norm, T5's relative bias; the token embedding itself belongs to the
    model (an encoder-decoder shares it between its two stacks).
    """

    def __init__(self, config: ModelConfig, n_layers: int, causal: bool, cross: bool = False):
        super().__init__()
        self.config = config
        if config.positions == "learned":
            self.pos_embed = nn.Embedding(config.max_seq_len + config.position_offset, config.d_model)
        elif config.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.max_seq_len, config.d_model), persistent=False)
        elif config.positions == "t5":
            self.rel_bias = RelativeBias(config, bidirectional=not causal)
        if config.type_vocab_size:
            self.type_embed = nn.Embedding(config.type_vocab_size, config.d_model)
        self.embed_norm = make_norm(config) if config.embed_norm else None
        self.blocks = nn.ModuleList(Block(config, i, cross) for i in range(n_layers))
        self.final_norm = make_norm(config) if config.final_norm else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, attn_mask: str, prefix_len=None, token_type_ids=None,
                cache: KVCache | None = None, memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None):
        """x (B, N, d) token embeddings; mask (B, N) bool, True for real tokens. Returns the last
        hidden state (B, N, d) and the list of hidden states (embeddings, each block; the final
        norm applied to the last, as Hugging Face reports them)."""
        cfg = self.config
        b, n, _ = x.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + n > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} tokens; {past} are in it and {n} more came")
        if cfg.positions in ("learned", "sinusoidal") and past + n > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + n} tokens is longer than max_seq_len={cfg.max_seq_len} positions")
        positions = positions_for(mask, cache.seen if cache is not None and cfg.pad_aware_positions else past, cfg.pad_aware_positions)
        if cfg.positions == "learned":
            x = x + self.pos_embed(positions + cfg.position_offset)
        elif cfg.positions == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        if cfg.type_vocab_size:
            x = x + self.type_embed(token_type_ids if token_type_ids is not None else torch.zeros_like(positions))
        if self.embed_norm is not None:
            x = self.embed_norm(x)

        key_mask = mask
        if cache is not None:
            cache.mask[:, past : past + n] = mask
            cache.seen += mask.long().sum(1)
            key_mask = cache.mask[:, : past + n]  # (B, past + N)
        self_args = dict(
            mask=attn_mask, prefix_len=prefix_len, cache=cache,
            key_padding_mask=None if bool(key_mask.all()) else key_mask,
            rope=rope_angles(positions, cfg.head_dim, cfg.rope_base) if cfg.positions == "rope" else None,
            bias=self.rel_bias(past, n, past + n) if cfg.positions == "t5" else None,
        )
        cross_args = None
        if memory is not None:
            cross_args = dict(mask="bidirectional", memory=memory, cache=cache,
                              key_padding_mask=None if memory_mask is None or bool(memory_mask.all()) else memory_mask)
        hidden = [x]
        for block in self.blocks:
            x = block(x, self_args, cross_args)
            hidden.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
            hidden[-1] = x
        if cache is not None:
            cache.length += n
        return x, hidden


def check_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids must be an integer tensor (B, N), N >= 1, with values in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 tensor, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, N] with N >= 1, got {list(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} must be in [0, vocab_size={vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]")


def check_mask(name: str, mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """An attention mask (B, N) of 0/1 or bool, True/1 = real token; None means all real."""
    if mask is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of the shape of the ids {list(ids.shape)}, got {got}")
    return mask.bool()


@dataclasses.dataclass
class ModelOutput:
    """What every model returns. logits: (B, N, V) for LM heads, (B, n_labels) for a classifier,
    None without a head; loss: mean cross-entropy over labels != -100, when labels are given;
    hidden_states: embeddings + every block (only with output_hidden_states=True)."""

    logits: torch.Tensor | None
    last_hidden_state: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None
    pooled: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, shift: bool) -> torch.Tensor | None:
    """Cross-entropy of logits (B, N, V) against labels (B, N), -100 ignored; `shift`: position i
    predicts label i + 1 (causal LMs)."""
    if labels is None:
        return None
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must have shape {list(logits.shape[:2])}, got {list(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
