"""The rows a decoding strategy builds: the ids generated so far and which rows are finished
(:class:`Sequences`), and the index that repeats each row for beams, samples or candidates
(:func:`expand`). Every strategy (sampling.py, beam.py, contrastive.py) uses them."""
from __future__ import annotations

import torch


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
