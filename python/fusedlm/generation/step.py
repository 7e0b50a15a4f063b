"""ModelStep: one forward of a DecoderLM or Seq2SeqLM over new tokens, with its KV cache.

Every strategy (greedy, sampling, beam, contrastive) is a loop over this one call:

    step = ModelStep(model, input_ids, attention_mask, max_new_tokens, model_kwargs)
    logits, hidden = step.prefill()           # the prompt: (B, V) float32, (B, N, d)
    step.reorder(index)                       # keep / repeat rows (beams, candidates)
    logits, hidden = step(tokens)             # tokens (R, 1) -> (R, V) float32, (R, 1, d)

The step owns what is per row besides the cache — the encoder output and source mask of a
Seq2SeqLM, and the `model_kwargs` tensors with a leading batch dimension (``adapter_ids``,
``task_ids`` of a mixed PEFT batch, a per-row ``prefix_len``) — and reorders them with it. Every
model call gets `model_kwargs`; a Seq2SeqLM's prefill encodes the source in the same forward.
"""
from __future__ import annotations

import torch


def is_seq2seq(model) -> bool:
    arch = getattr(getattr(model, "config", None), "arch", None)
    if arch not in ("decoder", "encoder-decoder") or not hasattr(model, "new_cache"):
        raise TypeError(f"model must be a fusedlm DecoderLM or Seq2SeqLM, got {type(model).__name__}")
    return arch == "encoder-decoder"


class ModelStep:
    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 model_kwargs: dict, decoder_start_token_id: int | None = None):
        self.model, self.seq2seq = model, is_seq2seq(model)
        b = input_ids.shape[0]
        # tensors with a leading batch dim follow the rows; everything else is passed as it is
        self.rows = {k: v for k, v in model_kwargs.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b}
        self.const = {k: v for k, v in model_kwargs.items() if k not in self.rows}
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.memory = None  # a Seq2SeqLM's encoder output, from the prefill on
        if self.seq2seq:
            self.start = torch.full((b, 1), decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        n = 1 if self.seq2seq else input_ids.shape[1]
        self.cache = model.new_cache(b, n + max_new_tokens)  # a prefix-tuned model's holds its prefix too

    def _call(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = dict(cache=self.cache, last_logits_only=True, **self.const, **self.rows)
        if not self.seq2seq:
            out = self.model(tokens, attention_mask=mask, **kwargs)
        elif self.memory is None:  # the prefill: encode the source, then the first decoder step
            out = self.model(self.input_ids, attention_mask=self.attention_mask, decoder_input_ids=tokens, **kwargs)
            self.memory = out.encoder_last_hidden_state
        else:
            out = self.model(decoder_input_ids=tokens, encoder_out=self.memory, attention_mask=self.attention_mask, **kwargs)
        return out.logits[:, -1].float(), out.last_hidden_state  # (R, V), (R, N, d)

    @torch.no_grad()
    def prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt (a decoder's input_ids, a seq2seq's source and decoder start token): next-token
        logits (B, V) float32 and the hidden states (B, N, d) of the prompt's tokens."""
        if self.seq2seq:
            return self._call(self.start, None)
        return self._call(self.input_ids, self.attention_mask)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (R, 1), one new token per row -> logits (R, V) float32, hidden (R, 1, d)."""
        return self._call(tokens, None)

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps rows `index` (LongTensor [R']) of the cache and of every per-row input."""
        self.cache.reorder(index)
        self.rows = {k: v.index_select(0, index) for k, v in self.rows.items()}
        if self.seq2seq:
            self.memory = self.memory.index_select(0, index)
            self.attention_mask = self.attention_mask.index_select(0, index)
