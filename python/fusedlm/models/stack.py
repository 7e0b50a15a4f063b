"""Stack: position information, the blocks and the final norm of one side of a model (a decoder,
or an encoder-decoder's encoder or decoder), over token embeddings.

Shapes: B batch, N tokens, d model width, Hkv key/value heads, P prefix tokens, D head dim.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import Block, make_norm
from .cache import KVCache, check_prefix_kv
from .config import ModelConfig
from .positions import RelativeBias, positions_for, rope_angles, sinusoidal_table


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
        if cache is not None and prefix_kv is not None:
            cache.add_prefix(prefix_kv)
        n_prefix = 0 if prefix_kv is None else _prefix_length(prefix_kv, len(self.blocks), b, cfg)
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
        if cache is not None and cache.cross_mask is not None and cross_prefix_kv is not None:
            raise ValueError("cross_prefix_kv goes with the first decoder step only (the cache keeps it)")

        def make() -> torch.Tensor:
            b = memory.shape[0]
            mask = memory_mask.bool() if memory_mask is not None else memory.new_ones(memory.shape[:2], dtype=torch.bool)
            if cross_prefix_kv is not None:
                p = _prefix_length(cross_prefix_kv, len(self.blocks), b, self.config, "cross_prefix_kv")
                mask = torch.cat([mask.new_ones(b, p), mask], dim=1)  # (B, P + M)
            return mask

        mask = make() if cache is None else cache.cross_padding(make)
        return None if bool(mask.all()) else mask


def _prefix_length(prefix_kv, n_layers: int, b: int, config: ModelConfig, name: str = "prefix_kv") -> int:
    return check_prefix_kv(name, prefix_kv, n_layers, b, config.n_kv_heads, config.head_dim)
