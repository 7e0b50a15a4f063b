"""LanguageModel: what DecoderLM, EncoderLM and Seq2SeqLM share: their config (of their
architecture), the token embedding, and KV caches shaped like their stacks."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import _gemv
from .cache import KVCache
from .config import ModelConfig


class LanguageModel(nn.Module):
    arch: str  # the ModelConfig.arch the subclass builds

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != self.arch:
            raise ValueError(f"{type(self).__name__} needs arch={self.arch!r}, got {config.arch!r}")
        self.config = config
        self.tok_embed = nn.Embedding(config.vocab_size, config.d_model)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, N, d) of input_ids, as the model computes them (scale included)."""
        return self.tok_embed(input_ids) * self.config.embed_scale

    def _output_layer(self) -> nn.Linear | None:
        """The vocabulary projection (d -> V, no bias), or None when it is the token embedding (tied)."""
        return None if self.config.tie_embeddings else nn.Linear(self.config.d_model, self.config.vocab_size, bias=False)

    def _to_vocab(self, h: torch.Tensor, output: nn.Linear | None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (..., V) of h (..., d) through `output` (from _output_layer), or the tied embedding.
        h goes in as 2-D: the last position of a prompt (a (B, 1, d) slice whose strides do not fold
        into rows) sends a 3-D F.linear to a batched matmul that copies the whole transposed weight
        first (a 32000 x 2048 bf16 head: ~0.3 s per call). At decode (a few rows, no autograd) the
        product is fusedlm's dense GEMV (ops._gemv.linear), else F.linear."""
        weight = self._vocab_weight(output)
        return _gemv.linear(h.reshape(-1, h.shape[-1]), weight, bias).reshape(*h.shape[:-1], weight.shape[0])

    def _vocab_weight(self, output: nn.Linear | None) -> torch.Tensor:
        """The [V, d] matrix of the vocabulary projection: `output`'s weight, or the tied embedding."""
        return self.tok_embed.weight if output is None else output.weight

    def _new_cache(self, n_layers: int, batch: int, max_len: int, **prefixes) -> KVCache:
        """A KVCache of n_layers in the embedding's dtype and device (prefixes: see KVCache)."""
        p = self.tok_embed.weight
        return KVCache(self.config, n_layers, batch, max_len, dtype=p.dtype, device=p.device, **prefixes)
