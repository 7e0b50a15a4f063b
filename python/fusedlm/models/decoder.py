"""DecoderLM: a decoder-only language model (GPT-2, LLaMA, Qwen2 and their kin), causal or prefix-LM.

    model = DecoderLM(get_config("llama-tiny"))
    out = model(ids, attention_mask=mask)                 # out.logits (B, N, V)
    out = model(ids, prefix_len=torch.tensor([3, 5]))     # prefix-LM: the first 3 / 5 keys bidirectional
    out = model(inputs_embeds=x, attention_mask=mask)     # embeddings in (soft prompts)
    ids = model.generate(ids, max_new_tokens=20)          # greedy, with the KV cache

Batches are left-padded: attention_mask (B, N) marks real tokens, and positions count real tokens
only, as Hugging Face's generate does.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .base import LanguageModel
from .cache import KVCache
from .inputs import ModelOutput, token_inputs
from .logprobs import fused_token_loss, mean_token_loss
from .stack import Stack


class DecoderLM(LanguageModel):
    arch = "decoder"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.decoder = Stack(config, config.n_layers, causal=True)
        self.lm_head = self._output_layer()

    def new_cache(self, batch: int, max_len: int, *, prefix_kv=None) -> KVCache:
        """An empty cache for `max_len` tokens, or one holding prefix keys/values (per layer (k, v),
        each (B, Hkv, P, D): prefix tuning) and room for `max_len` tokens after them."""
        return self._new_cache(self.config.n_layers, batch, max_len, prefix_kv=prefix_kv)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """LM logits (..., V) of hidden states (..., d) (the tied embedding or lm_head)."""
        return self._to_vocab(h, self.lm_head)

    def vocab_head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input, weight [V, d], bias) of the vocabulary projection of hidden states h (..., d):
        ``head(h) = F.linear(input, weight, bias)``; what a fused loss takes (ops.linear_cross_entropy)."""
        return h, self._vocab_weight(self.lm_head), None

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, prefix_len=None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None,
                output_hidden_states: bool = False, last_logits_only: bool = False, return_logits: bool = True) -> ModelOutput:
        """input_ids (B, N) — or inputs_embeds (B, N, d) — the new tokens (all of them, or those
        after the cache's); attention_mask (B, N) for these tokens (the cache remembers earlier
        ones). position_ids (B, N): explicit positions (default: pad-aware counting, see the module
        docstring). prefix_len (int or (B,)): keys before it are seen by every query (attn_mode "prefix");
        required when config.attn_mode is "prefix". cache: the keys/values before these tokens (see
        :meth:`new_cache`: earlier calls, a prefix that counts as P past tokens); written to.

        last_logits_only: logits (B, 1, V) of the last position only (all generation needs);
        return_logits=False: no logits (hidden states only; with labels, the loss is computed by the
        fused LM head + loss, ops.linear_cross_entropy, and the (B, N, V) logits are never stored)."""
        cfg = self.config
        x, padding_mask = token_inputs(self, "input_ids", input_ids, inputs_embeds, "attention_mask", attention_mask)  # (B, N, d)
        if cfg.attn_mode == "prefix" and prefix_len is None:
            raise ValueError("this model's config.attn_mode is 'prefix': pass prefix_len (an int or a LongTensor [B])")
        if last_logits_only and labels is not None:
            raise ValueError("labels need the logits of every position: drop last_logits_only")
        h, hidden = self.decoder(x, padding_mask, attn_mode="causal" if prefix_len is None else "prefix", prefix_len=prefix_len,
                                 position_ids=position_ids, cache=cache)
        logits = loss = None
        if return_logits:
            logits = self.head(h[:, -1:] if last_logits_only else h)  # (B, N or 1, V)
            loss = mean_token_loss(logits, labels, shift=True)
        elif labels is not None:
            loss = fused_token_loss(self.vocab_head, h, labels, shift=True)
        return ModelOutput(logits=logits, last_hidden_state=h, loss=loss,
                           hidden_states=hidden if output_hidden_states else None)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """``fusedlm.generation.generate(self, input_ids, max_new_tokens=..., **kwargs)``: greedy,
        sampling, beam or contrastive search with transformers' arguments (see there)."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
