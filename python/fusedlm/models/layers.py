"""The building blocks shared by every architecture: norms, positions (learned, sinusoidal, RoPE,
T5 relative bias), MLPs, the attention block (self and cross, on ``fusedlm.ops.attention``), the
transformer block, a stack of blocks, the KV cache, and the routing of per-sequence adapter/task ids.

Shapes: B batch, N tokens, d model width, H query heads, Hkv key/value heads, D head dim.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import NamedTuple

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
_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "swiglu": F.silu}


class MLP(nn.Module):
    """down_proj(act(up_proj x)), or SwiGLU's down_proj(silu(gate_proj x) * up_proj x); dropout
    (config.mlp_dropout: BART's activation_dropout, T5's dropout_rate) after the activation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, d_ff, bias = config.d_model, config.d_ff, config.mlp_bias
        self.gated = config.mlp == "swiglu"
        self.act = _ACTIVATIONS[config.mlp]
        if self.gated:
            self.gate_proj = nn.Linear(d, d_ff, bias=bias)
        self.up_proj = nn.Linear(d, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d, bias=bias)
        self.dropout = nn.Dropout(config.mlp_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))  # (B, N, d_ff)
        return self.down_proj(self.dropout(h))


def _prepend(prefix, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values (B, Hkv, N, D) with prefix = (k, v) (B, Hkv, P, D) placed before them, if any."""
    if prefix is None:
        return k, v
    return torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # (B, Hkv, P + N, D)


class Attention(nn.Module):
    """Multi-head attention with GQA over ``ops.attention``: q_proj, k_proj, v_proj, o_proj.

    Self-attention projects x; cross-attention (``cross=True``) projects the queries from x and the
    keys/values from the encoder output ``memory``, once per generation (kept in the cache).
    ``prefix`` (k, v), each (B, Hkv, P, D), are keys/values placed before the projected ones
    (prefix tuning); with a cache, the stack has already written them into it.
    """

    def __init__(self, config: ModelConfig, index: int, cross: bool = False):
        super().__init__()
        self.index, self.cross = index, cross
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.scale = config.attn_scale
        self.dropout_p = config.attn_dropout
        d, q_dim, kv_dim = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=config.out_bias)

    def _heads(self, t: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, n_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, D)

    def forward(self, x, *, mask="causal", prefix_len=None, key_padding_mask=None, bias=None, rope=None,
                cache: KVCache | None = None, memory: torch.Tensor | None = None, prefix=None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)  # (B, H, N, D)
        if not self.cross:
            k, v = self._heads(self.k_proj(x), self.n_kv_heads), self._heads(self.v_proj(x), self.n_kv_heads)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            # (B, Hkv, past + N, D): the cache holds the prefix, if any, from the first call
            k, v = cache.append(self.index, k, v) if cache is not None else _prepend(prefix, k, v)
        elif cache is not None and cache.cross[self.index] is not None:
            k, v = cache.cross[self.index]  # the encoder's keys/values, projected at the first step
        else:
            k, v = self._heads(self.k_proj(memory), self.n_kv_heads), self._heads(self.v_proj(memory), self.n_kv_heads)
            k, v = _prepend(prefix, k, v)  # (B, Hkv, [P +] M, D)
            if cache is not None:
                cache.cross[self.index] = (k, v)
        dropout_p = self.dropout_p if self.training else 0.0
        extra = {"dropout_p": dropout_p} if dropout_p > 0 else {}
        y = ops.attention(q, k, v, mask=mask, prefix_len=prefix_len, key_padding_mask=key_padding_mask, bias=bias,
                          scale=self.scale, **extra)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))  # (B, N, d)


class Block(nn.Module):
    """Attention (+ cross-attention) + MLP, each with a residual; pre-norm (GPT-2, LLaMA, T5) or
    post-norm (BERT, BART). config.dropout applies to each sublayer's output before the residual add."""

    def __init__(self, config: ModelConfig, index: int, cross: bool):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attn_norm, self.attn = make_norm(config), Attention(config, index)
        if cross:
            self.cross_norm, self.cross_attn = make_norm(config), Attention(config, index, cross=True)
        self.mlp_norm, self.mlp = make_norm(config), MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, self_args: dict, cross_args: dict | None = None) -> torch.Tensor:
        sublayers = [(self.attn_norm, lambda y: self.attn(y, **self_args))]
        if cross_args is not None:
            sublayers.append((self.cross_norm, lambda y: self.cross_attn(y, **cross_args)))
        sublayers.append((self.mlp_norm, self.mlp))
        for norm, f in sublayers:
            x = x + self.dropout(f(norm(x))) if self.pre_norm else norm(x + self.dropout(f(x)))
        return x


class KVCache:
    """Preallocated keys and values of every layer of one stack, for incremental decoding.

    k, v: (L, B, Hkv, max_len, D); mask (B, max_len): True where the key is a real token;
    seen (B,): real tokens so far per row (the next position of a pad-aware model); length: tokens
    written (the same for every row: batches are left-padded); n_prefix: how many of them are
    prefix-tuning keys/values (written by the first call); cross: per layer, the encoder's
    projected keys/values for cross-attention, and cross_mask (B, [P +] M) their padding mask
    (computed at the first step).

    A model's forward calls :meth:`extend` once (reserving the slots of its new tokens) and
    :meth:`append` once per layer; generation strategies call :meth:`reorder` (beam search,
    expansion to beams or candidates) and :meth:`truncate`. Nothing else changes the cache.
    """

    def __init__(self, config: ModelConfig, n_layers: int, batch: int, max_len: int, dtype=torch.float32, device=None):
        shape = (n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.n_prefix = 0
        self.max_len = max_len
        self.cross: list = [None] * n_layers
        self.cross_mask: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def extend(self, mask: torch.Tensor) -> int:
        """Reserves the slots of N new tokens (mask (B, N), True = real) and returns how many
        tokens came before them; the keys/values of each layer follow through :meth:`append`."""
        past, n = self.length, mask.shape[1]
        if mask.shape[0] != self.batch:
            raise ValueError(f"the KV cache holds a batch of {self.batch} rows, got {mask.shape[0]}")
        if past + n > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {past} are in it and {n} more came")
        self.mask[:, past : past + n] = mask
        self.seen = self.seen + mask.long().sum(1)
        self.length = past + n
        return past

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the keys/values (B, Hkv, N, D) of the N tokens :meth:`extend` reserved last;
        returns all of `layer`'s so far, (B, Hkv, length, D) views."""
        start = self.length - k.shape[2]
        self.k[layer, :, :, start : self.length] = k
        self.v[layer, :, :, start : self.length] = v
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps the rows `index` (LongTensor [B']), in that order: beam search's reorder, or the
        expansion of each row to several beams / candidates (B' may differ from B)."""
        used = self.length  # only the written slots are copied; the rest stays unwritten
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], len(index), *old.shape[2:]))
            new[:, :, :, :used] = old[:, :, :, :used].index_select(1, index)
            setattr(self, name, new)
        self.mask, self.seen = self.mask.index_select(0, index), self.seen.index_select(0, index)
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, index)

    def truncate(self, length: int) -> None:
        """Forgets every token from `length` on (the next write starts there)."""
        if not self.n_prefix <= length <= self.length:
            raise ValueError(f"length must be in [{self.n_prefix}, {self.length}] (prefix .. written tokens), got {length}")
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


def _check_prefix_kv(name: str, prefix_kv, n_layers: int, b: int, config: ModelConfig) -> int:
    """prefix_kv: n_layers pairs (k, v), each (B, Hkv, P, D), one P for all; returns P."""
    if not isinstance(prefix_kv, (list, tuple)) or len(prefix_kv) != n_layers:
        got = f"{len(prefix_kv)} entries" if isinstance(prefix_kv, (list, tuple)) else type(prefix_kv).__name__
        raise ValueError(f"{name} must be a list of {n_layers} (k, v) pairs, one per layer, got {got}")
    p = prefix_kv[0][0].shape[2] if prefix_kv[0][0].dim() == 4 else -1
    want = (b, config.n_kv_heads, p, config.head_dim)
    for i, kv in enumerate(prefix_kv):
        if len(kv) != 2 or any(tuple(t.shape) != want for t in kv):
            raise ValueError(f"{name}[{i}] must be (k, v), each [B, Hkv, P, D] = {list(want)}, got {[list(t.shape) for t in kv]}")
    return p


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
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, cross) for i in range(n_layers))
        self.final_norm = make_norm(config) if config.final_norm else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, attn_mask: str, prefix_len=None, token_type_ids=None,
                position_ids: torch.Tensor | None = None, prefix_kv=None, cache: KVCache | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None, cross_prefix_kv=None):
        """x (B, N, d) token embeddings; mask (B, N) bool, True for real tokens. prefix_kv /
        cross_prefix_kv: per layer (k, v) (B, Hkv, P, D) placed before the keys of self- /
        cross-attention; prefix keys count as P past tokens (positions start at P). Returns the
        last hidden state (B, N, d) and the hidden states (embeddings, each block; the final norm
        applied to the last, as Hugging Face reports them)."""
        cfg = self.config
        b, n, _ = x.shape
        n_prefix = 0 if prefix_kv is None else _check_prefix_kv("prefix_kv", prefix_kv, len(self.blocks), b, cfg)
        if cache is not None and prefix_kv is not None:
            if cache.length:
                raise ValueError("prefix_kv goes with the first call on an empty cache (it is kept there); "
                                 f"this cache already holds {cache.length} tokens")
            cache.extend(torch.ones(b, n_prefix, dtype=torch.bool, device=x.device))
            for i, (k, v) in enumerate(prefix_kv):
                cache.append(i, k, v)
            cache.n_prefix = n_prefix
        if cache is not None:
            seen, n_prefix = cache.seen, cache.n_prefix
            past = cache.extend(mask)
            key_mask = cache.mask[:, : past + n]  # (B, past + N)
        else:
            seen = past = n_prefix
            key_mask = mask if not n_prefix else torch.cat([mask.new_ones(b, n_prefix), mask], dim=1)  # (B, P + N)
        if cfg.positions in ("learned", "sinusoidal") and past + n > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + n} tokens is longer than max_seq_len={cfg.max_seq_len} positions")
        if position_ids is not None:
            if tuple(position_ids.shape) != (b, n):
                raise ValueError(f"position_ids must have shape [B, N] = {[b, n]}, got {list(position_ids.shape)}")
            positions = position_ids.long()
        else:
            positions = positions_for(mask, seen if cfg.pad_aware_positions else past, cfg.pad_aware_positions)
        if cfg.positions == "learned":
            x = x + self.pos_embed(positions + cfg.position_offset)
        elif cfg.positions == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        if cfg.type_vocab_size:
            x = x + self.type_embed(token_type_ids if token_type_ids is not None else torch.zeros_like(positions))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)

        if prefix_len is not None and n_prefix:  # prefix-LM prompt lengths count the sequence's tokens
            prefix_len = prefix_len + n_prefix
        self_args = dict(
            mask=attn_mask, prefix_len=prefix_len, cache=cache,
            key_padding_mask=None if bool(key_mask.all()) else key_mask,
            rope=rope_angles(positions, cfg.head_dim, cfg.rope_base) if cfg.positions == "rope" else None,
            bias=self.rel_bias(past, n, past + n) if cfg.positions == "t5" else None,
        )
        cross_args = None
        if memory is not None:
            cross_args = dict(mask="bidirectional", memory=memory, cache=cache,
                              key_padding_mask=self._memory_mask(memory, memory_mask, cross_prefix_kv, cache))
        hidden = [x]
        for i, block in enumerate(self.blocks):
            self_args["prefix"] = None if prefix_kv is None or cache is not None else prefix_kv[i]
            if cross_args is not None:
                cross_args["prefix"] = None if cross_prefix_kv is None else cross_prefix_kv[i]
            x = block(x, self_args, cross_args)
            hidden.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
            hidden[-1] = x
        return x, hidden

    def _memory_mask(self, memory, memory_mask, cross_prefix_kv, cache) -> torch.Tensor | None:
        """The cross-attention key padding mask (B, [P +] M), or None when every key is real; with
        a cache, computed at the first step and kept in it."""
        if cache is not None and cache.cross_mask is not None:
            if cross_prefix_kv is not None:
                raise ValueError("cross_prefix_kv goes with the first decoder step only (the cache keeps it)")
            mask = cache.cross_mask
        else:
            b = memory.shape[0]
            mask = memory_mask.bool() if memory_mask is not None else memory.new_ones(memory.shape[:2], dtype=torch.bool)
            if cross_prefix_kv is not None:
                p = _check_prefix_kv("cross_prefix_kv", cross_prefix_kv, len(self.blocks), b, self.config)
                mask = torch.cat([mask.new_ones(b, p), mask], dim=1)  # (B, P + M)
            if cache is not None:
                cache.cross_mask = mask
        return None if bool(mask.all()) else mask


# ---------------------------------------------------------------------------------------------
# Routing: per-sequence adapter / task ids, visible to PEFT layers during a forward
# ---------------------------------------------------------------------------------------------
class Routing(NamedTuple):
    """Which adapter (``adapter_ids``) and which task (``task_ids``) each sequence of the batch uses:
    LongTensor [B] or None; -1 = none. Models publish them; PEFT layers read them."""

    adapter_ids: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None


_ROUTING: contextvars.ContextVar[Routing] = contextvars.ContextVar("fusedlm_routing", default=Routing())


def _check_routing_ids(name: str, ids: torch.Tensor | None, batch: int) -> None:
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor [B], got {getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {list(ids.shape)}")
    if ids.numel() and int(ids.min()) < -1:
        raise ValueError(f"{name} must be >= -1 (-1 = none), got {int(ids.min())}")


@contextlib.contextmanager
def routing(batch: int, adapter_ids: torch.Tensor | None = None, task_ids: torch.Tensor | None = None):
    """Makes (adapter_ids, task_ids) of a batch of `batch` sequences the :func:`current_routing`
    inside the block. Models wrap their forward in it; nothing happens when both are None."""
    _check_routing_ids("adapter_ids", adapter_ids, batch)
    _check_routing_ids("task_ids", task_ids, batch)
    token = _ROUTING.set(Routing(adapter_ids, task_ids))
    try:
        yield
    finally:
        _ROUTING.reset(token)


def current_routing() -> Routing:
    """The (adapter_ids, task_ids) of the forward running now (both None outside one)."""
    return _ROUTING.get()


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


def check_mask(name: str, mask: torch.Tensor | None, shape: tuple, device) -> torch.Tensor:
    """An attention mask (B, N) of 0/1 or bool, True/1 = real token; None means all real."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of the shape of the ids {list(shape)}, got {got}")
    return mask.bool()


def token_inputs(model: nn.Module, ids_name: str, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                 mask_name: str, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings (B, N, d) and bool mask (B, N) of a model's inputs: exactly one of
    input_ids (embedded by ``model.embed``) or inputs_embeds (used as given)."""
    embeds_name = ids_name.replace("input_ids", "inputs_embeds")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"pass exactly one of {ids_name} and {embeds_name}")
    if input_ids is not None:
        check_ids(ids_name, input_ids, model.config.vocab_size)
        x = model.embed(input_ids)  # (B, N, d)
    else:
        d = model.config.d_model
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d \
                or inputs_embeds.shape[1] == 0:
            got = list(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
            raise ValueError(f"{embeds_name} must be a float tensor [B, N, d_model={d}] with N >= 1, got {got}")
        x = inputs_embeds
    return x, check_mask(mask_name, attention_mask, x.shape[:2], x.device)


@dataclasses.dataclass
class ModelOutput:
    """What every model returns. logits: (B, N, V) for LM heads, (B, n_labels) for a classifier,
    None without a head or with return_logits=False; loss: mean cross-entropy over labels != -100,
    when labels are given; hidden_states: embeddings + every block (only with output_hidden_states=True)."""

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


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, i]) under logits[b, i] (B, N, V), float32 (B, N); 0 where the label is -100.

    No shift: for a causal LM pass ``logits[:, :-1]`` and ``labels[:, 1:]``. Sequence log-probs
    (DPO, PPO) are sums of this over the completion tokens."""
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must have shape {list(logits.shape[:2])}, got {list(labels.shape)}")
    keep = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, N, V)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, N)
    return picked * keep
