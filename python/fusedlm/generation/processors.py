"""Score processors, as transformers' logits processors compute them, in transformers' order:
repetition penalty -> no-repeat n-grams -> minimum new tokens. (Temperature, top-k and top-p
come after them, inside ``ops.sample``.)

Each takes the float32 scores (R, V) of the next token (logits, or log-probabilities in beam
search) and the ids so far (R, T), prompt included, and returns new scores.
"""
from __future__ import annotations

import dataclasses

import torch


def repetition_penalty(scores: torch.Tensor, ids: torch.Tensor, penalty: float, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Every id present in `ids` (R, T): a positive score is divided by `penalty`, a negative one
    multiplied (once per id, however often it occurs). skip (R,): leading positions of each row
    not counted (the left padding of a decoder's prompt, as transformers 5 skips it)."""
    vocab = scores.shape[-1]
    if skip is not None:
        positions = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(positions[None, :] < skip[:, None], vocab)  # -> the spare column
    padded = torch.nn.functional.pad(scores, (0, 1))  # (R, V + 1): a spare column for skipped ids
    picked = padded.gather(1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, ids, picked)[:, :vocab]


def no_repeat_ngram(scores: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Bans (-inf) every token that would complete an n-gram already in `ids` (R, T): each window
    of n ids whose first n - 1 equal the last n - 1 ids bans its own last id."""
    t = ids.shape[1]
    if t < n:
        return scores
    suffix = ids[:, t + 1 - n:]  # (R, n - 1)
    windows = ids.unfold(1, n, 1)  # (R, T - n + 1, n)
    matches = (windows[..., :-1] == suffix[:, None]).all(-1)  # (R, T - n + 1)
    vocab = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab), True)  # non-matches -> the spare column
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


@dataclasses.dataclass
class Processors:
    """The processors one generate call applies, with their settings.

    prompt_len: ids of the prompt (a decoder's input length, 1 for a seq2seq's start token);
    eos: LongTensor of the eos ids (or None); skip (R,): leading pads the repetition penalty
    ignores. Rows of `skip` follow the rows of the generation (see :meth:`reorder`)."""

    prompt_len: int
    eos: torch.Tensor | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    skip: torch.Tensor | None = None

    def __call__(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """scores (R, V) float32, ids (R, T) so far -> processed scores (R, V)."""
        if self.repetition_penalty != 1.0:
            scores = repetition_penalty(scores, ids, self.repetition_penalty, self.skip)
        if self.no_repeat_ngram_size > 0:
            scores = no_repeat_ngram(scores, ids, self.no_repeat_ngram_size)
        if self.eos is not None and self.eos.numel() and ids.shape[1] - self.prompt_len < self.min_new_tokens:
            scores = scores.index_fill(1, self.eos, float("-inf"))
        return scores

    def repeat(self, times: int) -> None:
        """Each row becomes `times` consecutive rows (beams, return sequences)."""
        if self.skip is not None:
            self.skip = self.skip.repeat_interleave(times)
