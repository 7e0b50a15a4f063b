"""KVCache: the keys and values a stack's attention sees before the tokens of a call: those of
earlier calls (incremental decoding) and prefix keys/values (prefix tuning, P-tuning's deep
prompts), which a cache holds from its creation.

    cache = model.new_cache(batch, max_len)                          # decoding
    cache = model.new_cache(batch, max_len, prefix_kv=kv)            # P prefix tokens, then max_len more
    out = model(ids, cache=cache)                                    # the prefix counts as P past tokens

Shapes: L layers, B batch, Hkv key/value heads, P prefix tokens, M encoder tokens, D head dim.
"""
from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Preallocated keys and values of every layer of one stack.

    k[i], v[i]: layer i's (B, Hkv, capacity, D), one tensor per layer (a forward that trains
    through the cache writes each once, after the attention of the layers before it has read
    theirs); padding_mask (B, capacity): True where the key is a real token; seen (B,): real
    tokens so far per row (the next position of a pad-aware model); length: tokens written (the
    same for every row: batches are left-padded); n_prefix: how many of them are prefix
    keys/values; cross[i]: layer i's cross-attention keys/values (the cross prefix, then the
    encoder output's, projected at the first step) and cross_padding_mask (B, [P +] M) their mask.

    The cache owns every write to itself: the constructor takes the prefixes (``prefix_kv`` through
    :meth:`add_prefix`, which also fills an empty cache later, and ``cross_prefix_kv``); a model's
    forward calls :meth:`extend` once (reserving the slots of its new tokens) and :meth:`append`
    once per layer; a decoder calls :meth:`cross_padding` and :meth:`set_cross` at its first step;
    generation strategies call :meth:`reorder` (beam search, expansion to beams or candidates)
    and :meth:`truncate`.
    """

    def __init__(self, config: ModelConfig, n_layers: int, batch: int, max_len: int, dtype=torch.float32, device=None, *,
                 prefix_kv=None, cross_prefix_kv=None):
        """Room for `max_len` tokens after the prefix, if any: prefix_kv / cross_prefix_kv are per
        layer (k, v), each (B, Hkv, P, D), placed before the keys of self- / cross-attention."""
        n_prefix = 0 if prefix_kv is None else check_prefix_kv("prefix_kv", prefix_kv, n_layers, batch, config)
        capacity = n_prefix + max_len
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        self.config, self.n_layers = config, n_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.padding_mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.n_prefix = 0
        self.max_len = capacity
        self.cross: list = [None] * n_layers
        self.cross_padding_mask: torch.Tensor | None = None
        self.cross_prefix = None
        if cross_prefix_kv is not None:
            check_prefix_kv("cross_prefix_kv", cross_prefix_kv, n_layers, batch, config)
            self.cross_prefix = list(cross_prefix_kv)
        if prefix_kv is not None:
            self.add_prefix(prefix_kv)

    @property
    def batch(self) -> int:
        return self.padding_mask.shape[0]

    def add_prefix(self, prefix_kv) -> None:
        """Writes prefix keys/values (per layer (k, v), each (B, Hkv, P, D)) as P real tokens that
        every later query sees; they count as P past tokens. Only into an empty cache."""
        if self.length:
            raise ValueError("prefix_kv goes into an empty cache, before the first call (it is kept there); "
                             f"this cache already holds {self.length} tokens")
        p = check_prefix_kv("prefix_kv", prefix_kv, self.n_layers, self.batch, self.config)
        self.extend(torch.ones(self.batch, p, dtype=torch.bool, device=self.padding_mask.device))
        for i, (k, v) in enumerate(prefix_kv):
            self.append(i, k, v)
        self.n_prefix = p



    def extend(self, padding_mask: torch.Tensor) -> int:
        """Reserves the slots of N new tokens (padding_mask (B, N), True = real) and returns how
        many tokens came before them; the keys/values of each layer follow through :meth:`append`."""
        past, n = self.length, padding_mask.shape[1]
        if padding_mask.shape[0] != self.batch:
            raise ValueError(f"the KV cache holds a batch of {self.batch} rows, got {padding_mask.shape[0]}")
        if past + n > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {past} are in it and {n} more came")
        self.padding_mask[:, past : past + n] = padding_mask
        self.seen = self.seen + padding_mask.long().sum(1)
        self.length = past + n
        return past

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the keys/values (B, Hkv, N, D) of the N tokens :meth:`extend` reserved last;
        returns all of `layer`'s so far, (B, Hkv, length, D) views."""
        start = self.length - k.shape[2]
        self.k[layer][:, :, start : self.length] = k
        self.v[layer][:, :, start : self.length] = v
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]

    def cross_padding(self, memory_padding_mask: torch.Tensor) -> torch.Tensor:
        """The cross-attention key padding mask (B, [P +] M): set at the first step from the
        encoder output's (B, M) (after P ones for a cross prefix), kept after."""
        if self.cross_padding_mask is None:
            mask = memory_padding_mask
            if self.cross_prefix is not None:
                p = self.cross_prefix[0][0].shape[2]
                mask = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)  # (B, P + M)
            self.cross_padding_mask = mask
        return self.cross_padding_mask

    def set_cross(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keeps `layer`'s cross-attention keys/values, the encoder output's (B, Hkv, M, D) after the
        cross prefix, if any; returns them (B, Hkv, [P +] M, D)."""
        if self.cross_prefix is not None:
            pk, pv = self.cross_prefix[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.cross[layer] = (k, v)
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps the rows `index` (LongTensor [B']), in that order: beam search's reorder, or the
        expansion of each row to several beams / candidates (B' may differ from B)."""
        used = self.length  # only the written slots are copied; the rest stays unwritten

        def rows(t: torch.Tensor) -> torch.Tensor:
            new = t.new_empty((len(index), *t.shape[1:]))
            new[:, :, :used] = t[:, :, :used].index_select(0, index)
            return new

        self.k, self.v = [rows(t) for t in self.k], [rows(t) for t in self.v]
        self.padding_mask, self.seen = self.padding_mask.index_select(0, index), self.seen.index_select(0, index)
        pick = lambda kv: None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))  # noqa: E731
        self.cross = [pick(kv) for kv in self.cross]
        if self.cross_prefix is not None:
            self.cross_prefix = [pick(kv) for kv in self.cross_prefix]
        if self.cross_padding_mask is not None:
            self.cross_padding_mask = self.cross_padding_mask.index_select(0, index)

    def truncate(self, length: int) -> None:
        """Forgets every token from `length` on (the next write starts there); the prefix stays."""
        if not self.n_prefix <= length <= self.length:
            raise ValueError(f"length must be in [{self.n_prefix}, {self.length}] (prefix .. written tokens), got {length}")
        self.length = length
        self.padding_mask[:, length:] = False
        self.seen = self.padding_mask.long().sum(1)


def check_prefix_kv(name: str, prefix_kv, n_layers: int, batch: int, config: ModelConfig) -> int:
    """prefix_kv: n_layers pairs (k, v), each (B, Hkv, P, D), one P for all; returns P."""
    if not isinstance(prefix_kv, (list, tuple)) or len(prefix_kv) != n_layers:
        got = f"{len(prefix_kv)} entries" if isinstance(prefix_kv, (list, tuple)) else type(prefix_kv).__name__
        raise ValueError(f"{name} must be a list of {n_layers} (k, v) pairs, one per layer, got {got}")
    p = prefix_kv[0][0].shape[2] if prefix_kv[0][0].dim() == 4 else -1
    want = (batch, config.n_kv_heads, p, config.head_dim)
    for i, kv in enumerate(prefix_kv):
        if len(kv) != 2 or any(tuple(t.shape) != want for t in kv):
            raise ValueError(f"{name}[{i}] must be (k, v), each [B, Hkv, P, D] = {list(want)}, got {[list(t.shape) for t in kv]}")
    return p
