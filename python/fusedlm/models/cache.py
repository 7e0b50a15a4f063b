"""KVCache: the keys and values of every layer of one stack, kept across calls for incremental
decoding."""
from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Preallocated keys and values of every layer of one stack, for incremental decoding.

    k, v: (L, B, Hkv, max_len, D); mask (B, max_len): True where the key is a real token;
    seen (B,): real tokens so far per row (the next position of a pad-aware model); length: tokens
    written (the same for every row: batches are left-padded); n_prefix: how many of them are
    prefix-tuning keys/values; cross: per layer, the encoder's projected keys/values for
    cross-attention, and cross_mask (B, [P +] M) their padding mask (both set at the first step).

    The cache owns every write to itself: :meth:`add_prefix` writes prefix keys/values into an
    empty cache; a model's forward calls :meth:`extend` once (reserving the slots of its new
    tokens) and :meth:`append` once per layer; a decoder's cross-attention calls :meth:`set_cross`
    (and the stack :meth:`cross_padding`) at the first step; generation strategies call
    :meth:`reorder` (beam search, expansion to beams or candidates) and :meth:`truncate`.
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

    def add_prefix(self, prefix_kv) -> int:
        """Writes prefix keys/values, one (k, v) per layer, each (B, Hkv, P, D), as P real tokens
        every later query sees (prefix tuning); the cache must be empty. Returns P."""
        if self.length:
            raise ValueError("prefix_kv goes with the first call on an empty cache (it is kept there); "
                             f"this cache already holds {self.length} tokens")
        p = check_prefix_kv("prefix_kv", prefix_kv, self.k.shape[0], self.batch, self.k.shape[2], self.k.shape[4])
        self.extend(torch.ones(self.batch, p, dtype=torch.bool, device=self.mask.device))
        for i, (k, v) in enumerate(prefix_kv):
            self.append(i, k, v)
        self.n_prefix = p
        return p

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keeps `layer`'s cross-attention keys/values (B, Hkv, M, D), projected at the first step; returns them."""
        self.cross[layer] = (k, v)
        return k, v

    def cross_padding(self, make) -> torch.Tensor:
        """The cross-attention key padding mask (B, [P +] M): ``make()`` at the first step, kept after."""
        if self.cross_mask is None:
            self.cross_mask = make()
        return self.cross_mask

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


def check_prefix_kv(name: str, prefix_kv, n_layers: int, b: int, n_kv_heads: int, head_dim: int) -> int:
    """prefix_kv: n_layers pairs (k, v), each (B, Hkv, P, D), one P for all; returns P."""
    if not isinstance(prefix_kv, (list, tuple)) or len(prefix_kv) != n_layers:
        got = f"{len(prefix_kv)} entries" if isinstance(prefix_kv, (list, tuple)) else type(prefix_kv).__name__
        raise ValueError(f"{name} must be a list of {n_layers} (k, v) pairs, one per layer, got {got}")
    p = prefix_kv[0][0].shape[2] if prefix_kv[0][0].dim() == 4 else -1
    want = (b, n_kv_heads, p, head_dim)
    for i, kv in enumerate(prefix_kv):
        if len(kv) != 2 or any(tuple(t.shape) != want for t in kv):
            raise ValueError(f"{name}[{i}] must be (k, v), each [B, Hkv, P, D] = {list(want)}, got {[list(t.shape) for t in kv]}")
    return p
