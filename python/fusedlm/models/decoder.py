"""DecoderLM: a decoder-only language model (GPT-2, LLaMA, Qwen2 and their kin), causal or prefix-LM.

    model = DecoderLM(get_config("llama-tiny"))
    out = model(ids, attention_mask=mask)                 # out.logits (B, N, V)
    out = model(ids, prefix_len=torch.tensor([3, 5]))     # prefix-LM: the first 3 / 5 keys bidirectional
    ids = model.generate(ids, max_new_tokens=20)          # greedy, with the KV cache

Batches are left-padded: attention_mask (B, N) marks real tokens, and positions count real tokens
only, as Hugging Face's generate does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import KVCache, ModelOutput, Stack, check_ids, check_mask, lm_loss


class DecoderLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "decoder":
            raise ValueError(f"DecoderLM needs arch='decoder', got {config.arch!r}")
        self.config = config
        self.tok_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.decoder = Stack(config, config.n_layers, causal=True)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.tok_embed.weight
        return KVCache(self.config, self.config.n_layers, batch, max_len, dtype=p.dtype, device=p.device)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, prefix_len=None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None, output_hidden_states: bool = False,
                last_logits_only: bool = False) -> ModelOutput:
        """input_ids (B, N): the new tokens (all of them, or those after the cache's); attention_mask
        (B, N) for these tokens (the cache remembers earlier ones). prefix_len (int or (B,)): keys
        before it are seen by every query (mask "prefix"); required when config.mask is "prefix".
        last_logits_only: logits (B, 1, V) of the last position only (all generation needs)."""
        cfg = self.config
        check_ids("input_ids", input_ids, cfg.vocab_size)
        mask = check_mask("attention_mask", attention_mask, input_ids)
        if cfg.mask == "prefix" and prefix_len is None:
            raise ValueError("this model's config.mask is 'prefix': pass prefix_len (an int or a LongTensor [B])")
        x = self.tok_embed(input_ids) * cfg.embed_scale  # (B, N, d)
        h, hidden = self.decoder(x, mask, attn_mask="causal" if prefix_len is None else "prefix", prefix_len=prefix_len, cache=cache)
        if last_logits_only and labels is not None:
            raise ValueError("labels need the logits of every position: drop last_logits_only")
        weight = self.tok_embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h[:, -1:] if last_logits_only else h, weight)  # (B, N or 1, V)
        return ModelOutput(logits=logits, last_hidden_state=h, loss=lm_loss(logits, labels, shift=True),
                           hidden_states=hidden if output_hidden_states else None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 prefix_len=None, eos_token_id: int | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with the KV cache: (B, N) -> (B, N + up to max_new_tokens). After a row
        emits eos_token_id it gets pad_token_id (default: eos); it stops when every row is done."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        b, n = input_ids.shape
        cache = self.new_cache(b, n + max_new_tokens)
        logits = self(input_ids, attention_mask=attention_mask, prefix_len=prefix_len, cache=cache, last_logits_only=True).logits
        tokens, done = [input_ids], torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_id = logits[:, -1].argmax(-1)  # (B,)
            if eos_token_id is not None:
                next_id = torch.where(done, pad_token_id, next_id)
                done |= next_id == eos_token_id
            tokens.append(next_id[:, None])
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = self(next_id[:, None], prefix_len=prefix_len, cache=cache).logits  # (B, 1, V)
        return torch.cat(tokens, dim=1)
