"""Batches for the Trainer: a seeded, resumable, per-rank sharded loader over any sequence of
examples, and a padding collate.

Every epoch is a permutation drawn from (seed, epoch); step i of an epoch takes the global batch
perm[i·G : (i+1)·G], G = batch_size · world_size, and rank r keeps its slice
[r·batch_size : (r+1)·batch_size]. So one process with batch_size G sees exactly the examples
that W processes with batch_size G / W see together, and the position (epoch, step) is the
whole state (exact resume).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .. import _validate as check
from ..models.logprobs import IGNORE_INDEX


class Loader:
    """Infinite iterator of collated micro-batches (epochs wrap around)."""

    def __init__(self, dataset: Sequence, batch_size: int, collate: Callable[[list], Any], *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must be a sequence (len and indexing), got {type(dataset).__name__}")
        check.integer("batch_size", batch_size, low=1)
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.global_batch = batch_size * world_size
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if len(dataset) < self.global_batch:
            raise ValueError(f"the dataset has {len(dataset)} examples, fewer than one global batch "
                             f"(batch_size {batch_size} x {world_size} ranks = {self.global_batch})")
        self.steps_per_epoch = len(dataset) // self.global_batch  # the last partial batch is dropped
        self.epoch, self.step = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self):
        return self

    def __next__(self):
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        start = self.step * self.global_batch + self.rank * self.batch_size
        idx = self._order(self.epoch)[start : start + self.batch_size].tolist()
        self.step += 1
        return self.collate([self.dataset[i] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def eval_batches(dataset: Sequence, batch_size: int, collate: Callable[[list], Any], *, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None):
    """The evaluation set once, in order, rank r taking every world_size-th batch (the last one may be short)."""
    n_batches = -(-len(dataset) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(rank, n_batches, world_size):
        yield collate([dataset[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))])


def pad_collate(examples: list[dict], *, pad_token_id: int = 0, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Stacks examples (dicts of equal keys; 1-D token lists/tensors are padded to the longest:
    keys ending in "input_ids" with pad_token_id, "labels" with -100, "attention_mask" / "_mask"
    with 0); an "attention_mask" is added for each "...input_ids" that has none. Scalars stack."""
    if not examples:
        raise ValueError("pad_collate needs at least one example")
    check.choice("padding_side", padding_side, ("right", "left"))
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        values = [torch.as_tensor(e[key]) for e in examples]
        if values[0].dim() == 0:
            batch[key] = torch.stack(values)
            continue
        fill = pad_token_id if key.endswith("input_ids") else IGNORE_INDEX if key.endswith("labels") else 0
        batch[key] = pad_rows(values, fill, padding_side)
        mask_key = key.replace("input_ids", "attention_mask")
        if key.endswith("input_ids") and mask_key not in examples[0]:
            batch[mask_key] = pad_rows([torch.ones(len(v), dtype=torch.long) for v in values], 0, padding_side)
    return batch


def pad_rows(values: list[torch.Tensor], fill, side: str) -> torch.Tensor:
    """The 1-D (or more) tensors `values` stacked (B, N, ...), padded with `fill` on `side` ("right" | "left") to the longest."""
    n = max(v.shape[0] for v in values)
    out = values[0].new_full((len(values), n, *values[0].shape[1:]), fill)
    for i, v in enumerate(values):
        if side == "right":
            out[i, : v.shape[0]] = v
        else:
            out[i, n - v.shape[0] :] = v
    return out
