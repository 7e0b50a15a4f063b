"""HF ``generate(do_sample=True, temperature, top_k, top_p)`` drawing through :func:`fusedlm.ops.sample`.

transformers samples in ``_sample``: its logits processors end with the Temperature -> TopK ->
TopP warpers, then ``softmax`` and ``torch.multinomial`` draw. On a patched model those warpers
become one :class:`FusedSampler` that filters and draws in one ``ops.sample`` call (same kept set
as the warpers) and hands back scores that keep only the drawn token, so the softmax and
multinomial that follow return exactly it. Draws use torch's default generator, so
``torch.manual_seed`` makes them repeatable.

Left to transformers (the warpers stay): beam sampling, assisted / prompt-lookup generation,
``output_scores`` (the scores would be the one-hot draw), and processor lists where anything but
those three warpers follows the other processors (min_p, typical_p, epsilon / eta cutoffs, top_h,
watermarking, renormalisation), with a one-time warning naming the processor.
"""
from __future__ import annotations

import contextvars
import inspect
import types

import torch
from transformers import GenerationMixin
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.configuration_utils import GenerationMode

from .. import ops
from .._warn import warn_once

_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)  # in transformers' order
_plain_generate = contextvars.ContextVar("fusedlm_plain_generate", default=False)  # no assistant, no custom loop


class FusedSampler(LogitsProcessor):
    """Temperature -> top-k -> top-p -> one draw, by ops.sample; returns 0 at the drawn token, -inf elsewhere."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = ops.sample(scores, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)  # [B]
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens[:, None], 0.0)


def fuse_warpers(processors: LogitsProcessorList) -> LogitsProcessorList | str:
    """`processors` with its trailing Temperature / TopK / TopP warpers replaced by one FusedSampler,
    or the reason it cannot be done."""
    n_warpers = 0
    while n_warpers < len(processors) and type(processors[-1 - n_warpers]) in _WARPERS:
        n_warpers += 1
    others, tail = list(processors)[:len(processors) - n_warpers], list(processors)[len(processors) - n_warpers:]
    stray = [i for i, p in enumerate(others) if type(p).__name__.endswith("LogitsWarper")]
    if stray:
        names = ", ".join(type(p).__name__ for p in others[stray[0]:])
        return f"{names} at the end of the processors (fusedlm fuses a trailing temperature -> top-k -> top-p)"
    if [type(w) for w in tail] != [t for t in _WARPERS if any(type(w) is t for w in tail)]:
        return "the temperature / top-k / top-p warpers out of transformers' order"
    params = {}
    for w in tail:
        if getattr(w, "filter_value", -float("inf")) != -float("inf") or getattr(w, "min_tokens_to_keep", 1) != 1:
            return f"{type(w).__name__} with a filter_value or min_tokens_to_keep of its own"
        if isinstance(w, TemperatureLogitsWarper):
            params["temperature"] = w.temperature
        elif isinstance(w, TopKLogitsWarper):
            params["top_k"] = w.top_k
        else:
            params["top_p"] = w.top_p
    return LogitsProcessorList(others + [FusedSampler(**params)])


def _get_logits_processor(self, generation_config, *args, **kwargs) -> LogitsProcessorList:
    processors = type(self)._get_logits_processor(self, generation_config, *args, **kwargs)
    if not (_plain_generate.get() and generation_config.do_sample
            and generation_config.get_generation_mode() == GenerationMode.SAMPLE):
        return processors
    if generation_config.output_scores:
        warn_once("sampling: output_scores", "fusedlm sampling: output_scores=True keeps transformers' warpers and "
                  "multinomial (fusedlm's scores would be the one-hot draw) (shown once)")
        return processors
    fused = fuse_warpers(processors)
    if isinstance(fused, str):
        warn_once(f"sampling: {fused}", f"fusedlm sampling: {fused}; such calls sample with transformers' "
                  "warpers (shown once)")
        return processors
    return fused


def _generate(self, *args, **kwargs):
    bound = inspect.signature(GenerationMixin.generate).bind(self, *args, **kwargs).arguments
    plain = bound.get("assistant_model") is None and bound.get("custom_generate") is None
    token = _plain_generate.set(plain)
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        _plain_generate.reset(token)


def patch(model: GenerationMixin) -> None:
    model._get_logits_processor = types.MethodType(_get_logits_processor, model)
    model.generate = types.MethodType(_generate, model)


def unpatch(model: GenerationMixin) -> None:
    del model._get_logits_processor
    del model.generate
