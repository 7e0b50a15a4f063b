"""Greedy decoding and sampling: one ``ops.sample`` call per step for the whole batch.

Greedy is ``ops.sample(scores, temperature=0)`` (the first argmax); sampling draws with the
per-row temperature / top-k / top-p, seeded from `generator` (one seed per step, row r of the batch
drawing from its own stream), so a row's tokens do not depend on the other rows.
"""
from __future__ import annotations

import torch

from .. import ops
from .processors import Processors
from .step import ModelStep


class Sequences:
    """The ids generated so far (R, prompt + new), and which rows are finished.

    After a row emits an eos id, it gets `pad` (as transformers does). Whether every row is done
    is a host sync: on a GPU it is asked only every `check_every` steps; the steps run past the
    end are cut off at the end (their tokens are pads), so the result does not depend on it."""

    def __init__(self, prompt: torch.Tensor, max_new_tokens: int, eos: torch.Tensor | None, pad: int | None):
        r, n = prompt.shape
        self.ids = torch.full((r, n + max_new_tokens), pad if pad is not None else 0, dtype=torch.long, device=prompt.device)
        self.ids[:, :n] = prompt
        self.length, self.prompt_len = n, n
        self.eos = eos if eos is not None and eos.numel() else None
        self.pad = pad
        self.unfinished = torch.ones(r, dtype=torch.bool, device=prompt.device)
        self.kept = torch.zeros((), dtype=torch.long, device=prompt.device)  # steps that had a live row
        self.check_every = 1 if prompt.device.type == "cpu" else 8

    def so_far(self) -> torch.Tensor:
        return self.ids[:, : self.length]  # (R, T)

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends tokens (R,) (pad where a row is finished); returns what was appended."""
        if self.eos is not None:
            self.kept += self.unfinished.any()
            tokens = torch.where(self.unfinished, tokens, self.pad)
            self.unfinished &= ~torch.isin(tokens, self.eos)
        self.ids[:, self.length] = tokens
        self.length += 1
        return tokens

    def all_done(self) -> bool:
        steps = self.length - self.prompt_len
        return self.eos is not None and steps % self.check_every == 0 and not bool(self.unfinished.any())

    def result(self) -> torch.Tensor:
        if self.eos is None:
            return self.so_far()
        return self.ids[:, : self.prompt_len + int(self.kept)]


def expand(rows: int, times: int, device) -> torch.Tensor:
    """The row index that repeats each of `rows` rows `times` times in a row: 0,0,1,1,... (LongTensor)."""
    return torch.arange(rows, device=device).repeat_interleave(times)


def decode(step: ModelStep, prompt: torch.Tensor, *, max_new_tokens: int, processors: Processors,
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
