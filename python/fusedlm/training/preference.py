"""Preference pairs (a prompt, a chosen and a rejected response) as token ids, shared by the
reward model and DPO.

    ex = preference_example(prompt_ids, chosen_ids, rejected_ids, eos_token_id=2)
    # {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    batch = pad_collate([ex, ...])          # + "chosen_attention_mask", "rejected_attention_mask"
    ids, mask, labels = stack_pairs(batch)  # (2B, N): the chosen rows, then the rejected ones
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..models.logprobs import IGNORE_INDEX
from .sft import sft_example


def preference_example(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int], *,
                       eos_token_id: int | None = None, bos_token_id: int | None = None, max_len: int | None = None,
                       margin: float | None = None) -> dict:
    """Both sequences (prompt + response [+ eos]), labels on the response tokens only."""
    out = {}
    for side, response in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        ex = sft_example(prompt_ids, response, eos_token_id=eos_token_id, bos_token_id=bos_token_id, max_len=max_len)
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ex["input_ids"], ex["labels"]
    if margin is not None:
        out["margin"] = float(margin)
    return out


def _pad_to(t: torch.Tensor, n: int, fill) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, n - t.shape[1]), value=fill)


def stack_pairs(batch: dict, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One (2B, N) batch of the chosen rows then the rejected rows (right-padded to a common N),
    their attention masks, and their labels when the batch has them (trl's concatenated forward)."""
    for key in ("chosen_input_ids", "rejected_input_ids"):
        if key not in batch:
            raise ValueError(f"a preference batch needs {key!r} (see preference_example), got keys {sorted(batch)}")
    c, r = batch["chosen_input_ids"], batch["rejected_input_ids"]
    if c.shape[0] != r.shape[0]:
        raise ValueError(f"a preference batch needs as many chosen as rejected sequences, got {c.shape[0]} and {r.shape[0]}")
    cm = batch.get("chosen_attention_mask", torch.ones_like(c))
    rm = batch.get("rejected_attention_mask", torch.ones_like(r))
    n = max(c.shape[1], r.shape[1])
    ids = torch.cat([_pad_to(c, n, pad_token_id), _pad_to(r, n, pad_token_id)])
    mask = torch.cat([_pad_to(cm, n, 0), _pad_to(rm, n, 0)]).bool()
    labels = None
    if "chosen_labels" in batch and "rejected_labels" in batch:
        for side in ("chosen", "rejected"):
            if batch[f"{side}_labels"].shape != batch[f"{side}_input_ids"].shape:
                raise ValueError(f"{side}_labels must have the shape of {side}_input_ids "
                                 f"{list(batch[f'{side}_input_ids'].shape)}, got {list(batch[f'{side}_labels'].shape)}")
        labels = torch.cat([_pad_to(batch["chosen_labels"], n, IGNORE_INDEX), _pad_to(batch["rejected_labels"], n, IGNORE_INDEX)])
    return ids, mask, labels
