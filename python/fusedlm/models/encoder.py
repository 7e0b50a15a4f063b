"""EncoderLM: a bidirectional encoder (BERT, RoBERTa) with an MLM head, a sequence classification
head, or no head (hidden states and the pooled first token).

    model = EncoderLM(get_config("bert-tiny"))
    out = model(ids, attention_mask=mask)          # out.logits (B, N, V), out.last_hidden_state (B, N, d)
    out = model(ids, return_logits=False)          # hidden states only (sentence embeddings)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .base import LanguageModel
from .cache import KVCache
from .inputs import ModelOutput, check_ids, token_inputs
from .logprobs import mean_token_loss
from .stack import Stack


class EncoderLM(LanguageModel):
    arch = "encoder"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        d = config.d_model
        self.encoder = Stack(config, config.n_layers, causal=False)
        if config.head == "lm":  # dense -> gelu -> LayerNorm -> decoder (tied) + bias
            self.mlm_dense = nn.Linear(d, d)
            self.mlm_norm = nn.LayerNorm(d, eps=config.norm_eps)
            self.mlm_decoder = self._output_layer()
            self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.pooler = nn.Linear(d, d) if config.pooler else None
        self.classifier = nn.Linear(d, config.n_labels) if config.head == "classifier" else None
        self.classifier_dropout = nn.Dropout(config.dropout)  # on the pooled vector, as BERT's classifier

    def vocab_head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, weight [V, d], bias) of the MLM head's vocabulary projection of hidden states h
        (..., d): the input is its transform (dense -> gelu -> LayerNorm); logits = F.linear(input, weight, bias)."""
        if self.config.head != "lm":
            raise ValueError(f"this EncoderLM has head={self.config.head!r}: no vocabulary projection")
        return self.mlm_norm(F.gelu(self.mlm_dense(h))), self._vocab_weight(self.mlm_decoder), self.mlm_bias

    def new_cache(self, batch: int, max_len: int, *, prefix_kv=None) -> KVCache:
        """A cache holding prefix keys/values (per layer (k, v), each (B, Hkv, P, D)) for a forward
        of up to `max_len` tokens after them."""
        return self._new_cache(self.config.n_layers, batch, max_len, prefix_kv=prefix_kv)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_logits: bool = True) -> ModelOutput:
        """input_ids (B, N) or inputs_embeds (B, N, d); labels: (B, N) token ids for the MLM head
        (IGNORE_INDEX ignored), (B,) classes for the classifier. cache: a KVCache holding prefix
        keys/values every token sees (prefix tuning; see :meth:`new_cache`). position_ids: as in
        DecoderLM.forward. return_logits=False: hidden states (and pooled) only."""
        cfg = self.config
        x, padding_mask = token_inputs(self, "input_ids", input_ids, inputs_embeds, "attention_mask", attention_mask)  # (B, N, d)
        if token_type_ids is not None:
            check_ids("token_type_ids", token_type_ids, max(cfg.type_vocab_size, 1))
        if labels is not None and not return_logits:
            raise ValueError("labels need logits: drop return_logits=False")
        h, hidden = self.encoder(x, padding_mask, attn_mode="bidirectional", token_type_ids=token_type_ids,
                                 position_ids=position_ids, cache=cache)
        pooled = torch.tanh(self.pooler(h[:, 0])) if self.pooler is not None else None  # (B, d)
        logits, loss = None, None
        if cfg.head == "lm" and return_logits:
            logits = F.linear(*self.vocab_head(h))  # (B, N, V)
            loss = mean_token_loss(logits, labels, shift=False)
        elif cfg.head == "classifier" and return_logits:
            logits = self.classifier(self.classifier_dropout(pooled))  # (B, n_labels)
            loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ModelOutput(logits=logits, last_hidden_state=h, loss=loss, pooled=pooled,
                           hidden_states=hidden if output_hidden_states else None)
