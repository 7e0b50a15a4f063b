"""Seq2SeqLM: an encoder-decoder (T5, BART): bidirectional encoder, causal decoder with
cross-attention, LM head over the shared token embedding.

    model = Seq2SeqLM(get_config("t5-tiny"))
    out = model(src, attention_mask=src_mask, labels=tgt)      # decoder inputs = labels shifted right
    ids = model.generate(src, max_new_tokens=20, attention_mask=src_mask)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .base import LanguageModel
from .cache import KVCache
from .inputs import ModelOutput, token_inputs
from .logprobs import IGNORE_INDEX, mean_token_loss
from .stack import Stack


class Seq2SeqLM(LanguageModel):
    arch = "encoder-decoder"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.encoder = Stack(config, config.n_layers, causal=False)
        self.decoder = Stack(config, config.n_decoder_layers, causal=True, cross=True)
        self.lm_head = self._output_layer()
        if config.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(config.vocab_size))



    def head(self, h: torch.Tensor) -> torch.Tensor:
        """LM logits (..., V) of decoder hidden states (..., d): T5's rescale, the (tied) head, BART's bias."""
        x, weight, bias = self.vocab_head(h)
        logits = F.linear(x, weight)
        return logits + bias if bias is not None else logits

    def vocab_head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input, weight [V, d], bias) of the vocabulary projection of decoder hidden states h (..., d):
        T5's rescale of a tied head on the input, BART's final_logits_bias as the bias (see :meth:`head`)."""
        if self.config.rescale_tied_head:
            h = h * self.config.d_model**-0.5
        return h, self._vocab_weight(self.lm_head), self.final_logits_bias if self.config.final_logits_bias else None

    def encode(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
               inputs_embeds: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """(B, M) source ids (or inputs_embeds (B, M, d)) -> (B, M, d) encoder output. cache: a
        KVCache of the encoder's layers holding prefix keys/values every source token sees
        (:meth:`new_cache` with ``encoder=True``)."""
        x, padding_mask = token_inputs(self, "input_ids", input_ids, inputs_embeds, "attention_mask", attention_mask)
        return self.encoder(x, padding_mask, attn_mode="bidirectional", cache=cache)[0]

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: decoder_start_token_id, then labels[:, :-1] (IGNORE_INDEX -> pad)."""
        start = self.config.decoder_start_token_id
        shifted = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def new_cache(self, batch: int, max_len: int, *, prefix_kv=None, cross_prefix_kv=None, encoder: bool = False) -> KVCache:
        """The decoder's cache for `max_len` tokens, or (encoder=True) the encoder's. prefix_kv:
        per layer (k, v), each (B, Hkv, P, D), before the keys of self-attention (P past tokens);
        cross_prefix_kv: per decoder layer, before the encoder output's keys in cross-attention."""
        n_layers = self.config.n_layers if encoder else self.config.n_decoder_layers
        return self._new_cache(n_layers, batch, max_len, prefix_kv=prefix_kv, cross_prefix_kv=cross_prefix_kv)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                decoder_inputs_embeds: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, encoder_out: torch.Tensor | None = None, cache: KVCache | None = None,
                output_hidden_states: bool = False, last_logits_only: bool = False, return_logits: bool = True) -> ModelOutput:
        """Either input_ids / inputs_embeds (encoded here) or encoder_out (B, M, d) from :meth:`encode`;
        attention_mask (B, M) is the source's. decoder_input_ids (or decoder_inputs_embeds) default
        to labels shifted right. cache: the decoder's (:meth:`new_cache`: earlier steps, prefixes of
        self- and cross-attention)."""
        if encoder_out is None:
            if input_ids is None and inputs_embeds is None:
                raise ValueError("pass input_ids, inputs_embeds or encoder_out")
            encoder_out = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids, decoder_inputs_embeds or labels")
            decoder_input_ids = self.shift_right(labels)
        x, padding_mask = token_inputs(self, "decoder_input_ids", decoder_input_ids, decoder_inputs_embeds,
                               "decoder_attention_mask", decoder_attention_mask)  # (B, N, d)
        if last_logits_only and labels is not None:
            raise ValueError("labels need the logits of every position: drop last_logits_only")
        if labels is not None and not return_logits:
            raise ValueError("labels need logits: drop return_logits=False")
        h, hidden = self.decoder(x, padding_mask, attn_mode="causal", cache=cache, memory=encoder_out,
                                 memory_padding_mask=attention_mask)
        logits = self.head(h[:, -1:] if last_logits_only else h) if return_logits else None  # (B, N or 1, V)
        return ModelOutput(logits=logits, last_hidden_state=h, loss=mean_token_loss(logits, labels, shift=False),
                           hidden_states=hidden if output_hidden_states else None, encoder_last_hidden_state=encoder_out)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """``fusedlm.generation.generate(self, input_ids, max_new_tokens=..., **kwargs)``: greedy,
        sampling, beam or contrastive search with transformers' arguments (see there)."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
