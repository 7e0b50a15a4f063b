"""Greedy decoding and sampling: one ``ops.sample`` call per step for the whole batch.

Greedy is ``ops.sample(scores, temperature=0)`` (the first argmax); sampling draws with the
per-row temperature / top-k / top-p, seeded from `generator` (one seed per step, row r of the batch
drawing from its own stream), so a row's tokens do not depend on the other rows.
"""
from __future__ import annotations

import torch

from .. import ops
from .processors import Processors
from .sequences import Sequences, expand
from .step import ModelStep


def greedy_or_sample(step: ModelStep, prompt: torch.Tensor, *, max_new_tokens: int, processors: Processors,
           eos: torch.Tensor | None, pad: int | None, do_sample: bool, temperature, top_k, top_p,
           generator: torch.Generator | None, num_return_sequences: int, output_scores: bool):
    """Greedy (do_sample=False) or sampling. prompt (B, N): the ids the output starts with (a
    decoder's prompt, a seq2seq's start token). Returns (ids (B * num_return_sequences, N + new),
    per-step scores or None)."""
    logits, _ = step.prefill()  # (B, V)
    if num_return_sequences > 1:  # each row -> num_return_sequences consecutive rows
        index = expand(prompt.shape[0], num_return_sequences, prompt.device)
        step.reorder(index)
        logits, prompt = logits.index_select(0, index), prompt.index_select(0, index)
        processors.repeat(num_return_sequences)
    seqs = Sequences(prompt, max_new_tokens, eos, pad)
    scores_out = [] if output_scores else None
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else dict(temperature=0.0)
    if not do_sample:  # greedy draws nothing: keep the caller's random state untouched
        generator = torch.Generator(prompt.device)
    for t in range(max_new_tokens):
        scores = processors(logits, seqs.so_far())  # (R, V)
        tokens = ops.sample(scores, generator=generator, **params)  # (R,)
        if output_scores:
            scores_out.append(ops.filter_logits(scores, **params) if do_sample else scores)
        tokens = seqs.push(tokens)
        if t == max_new_tokens - 1 or seqs.all_done():
            break
        logits, _ = step(tokens[:, None])
    ids = seqs.result()
    return ids, None if scores_out is None else tuple(scores_out[: ids.shape[1] - seqs.prompt_len])
