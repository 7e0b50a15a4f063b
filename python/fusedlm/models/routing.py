"""Routing: per-sequence adapter / task ids, visible to PEFT layers during a forward."""
from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """Which adapter (``adapter_ids``) and which task (``task_ids``) each sequence of the batch uses:
    LongTensor [B] or None; -1 = none. Models publish them; PEFT layers read them."""

    adapter_ids: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None


_ROUTING: contextvars.ContextVar[Routing] = contextvars.ContextVar("fusedlm_routing", default=Routing())


def _check_routing_ids(name: str, ids: torch.Tensor | None, batch: int) -> None:
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor [B], got {getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {list(ids.shape)}")
    if ids.numel() and int(ids.min()) < -1:
        raise ValueError(f"{name} must be >= -1 (-1 = none), got {int(ids.min())}")


@contextlib.contextmanager
def routing(batch: int, adapter_ids: torch.Tensor | None = None, task_ids: torch.Tensor | None = None):
    """Makes (adapter_ids, task_ids) of a batch of `batch` sequences the :func:`current_routing`
    inside the block. Models wrap their forward in it; nothing happens when both are None."""
    _check_routing_ids("adapter_ids", adapter_ids, batch)
    _check_routing_ids("task_ids", task_ids, batch)
    token = _ROUTING.set(Routing(adapter_ids, task_ids))
    try:
        yield
    finally:
        _ROUTING.reset(token)


def current_routing() -> Routing:
    """The (adapter_ids, task_ids) of the forward running now (both None outside one)."""
    return _ROUTING.get()
