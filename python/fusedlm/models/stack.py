"""Stack: position information, the blocks and the final norm of one side of a model (a decoder,
or an encoder-decoder's encoder or decoder), over token embeddings.

Shapes: B batch, N tokens, d model width, Hkv key/value heads, P prefix tokens, D head dim.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import Block, make_norm
from .cache import KVCache
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

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor, *, attn_mode: str, prefix_len=None,
                token_type_ids=None, position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                memory: torch.Tensor | None = None, memory_padding_mask: torch.Tensor | None = None):
        """x (B, N, d) token embeddings; padding_mask (B, N) bool, True for real tokens; attn_mode:
        self-attention's "causal" | "prefix" | "bidirectional". cache: the keys/values before these
        tokens (earlier calls, a prefix: they count as past tokens, so positions start after them);
        written to. memory (B, M, d): the encoder output cross-attention reads (padding
        memory_padding_mask (B, M)). Returns the last hidden state (B, N, d) and the hidden states
        (embeddings, each block; the final norm applied to the last, as Hugging Face reports them)."""
        cfg = self.config
        b, n, _ = x.shape
        if cache is not None:
            seen, n_prefix = cache.seen, cache.n_prefix
            past = cache.extend(padding_mask)
            keys_padding = cache.padding_mask[:, : past + n]  # (B, past + N)
        else:
            seen = past = n_prefix = 0
            keys_padding = padding_mask
        if cfg.positions in ("learned", "sinusoidal") and past + n > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + n} tokens is longer than max_seq_len={cfg.max_seq_len} positions")
        if position_ids is not None:
            if tuple(position_ids.shape) != (b, n):
                raise ValueError(f"position_ids must have shape [B, N] = {[b, n]}, got {list(position_ids.shape)}")
            positions = position_ids.long()
        else:
            positions = positions_for(padding_mask, seen if cfg.pad_aware_positions else past, cfg.pad_aware_positions)
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
        rope = rope_angles(positions, cfg.head_dim, cfg.rope_base) if cfg.positions == "rope" else None
        bias = self.rel_bias(past, n, past + n) if cfg.positions == "t5" else None
        cross_padding = None
        if memory is not None:
            cross_padding = (memory_padding_mask.bool() if memory_padding_mask is not None
                             else memory.new_ones(memory.shape[:2], dtype=torch.bool))  # (B, M)
            if cache is not None:
                cross_padding = cache.cross_padding(cross_padding)  # (B, [P +] M), kept from the first step
        hidden = [x]
        for block in self.blocks:
            x = block(x, attn_mode=attn_mode, prefix_len=prefix_len, key_padding_mask=_or_none(keys_padding), bias=bias,
                      rope=rope, cache=cache, memory=memory, memory_padding_mask=_or_none(cross_padding))
            hidden.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
            hidden[-1] = x
        return x, hidden


def _or_none(padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The padding mask, or None when every key is real (the op then skips it)."""
    return None if padding_mask is None or bool(padding_mask.all()) else padding_mask
