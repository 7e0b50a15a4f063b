"""Which adapter and which task each sequence of a batch uses, for the PEFT layers of a forward.

    peft.apply_lora(model, ...); peft.apply_lora(model, ..., name="math")
    model(ids, adapter_ids=torch.tensor([0, 1, -1]))     # row 0 "default", row 1 "math", row 2 the base

The models know nothing of routing. A PEFT method that routes installs a forward pre-hook on the
model (:func:`install`), as peft does for its ``adapter_names``: the hook takes ``adapter_ids`` /
``task_ids`` (LongTensor [B], -1 = none) out of the call's keyword arguments, checks them, and
publishes them (:func:`current_routing`) until the forward returns; the PEFT layers read them
there. ``Seq2SeqLM.encode`` is a method, not a forward: run it inside :func:`routing` to route it.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch
from torch import nn

KEYS = ("adapter_ids", "task_ids")
# the keyword arguments a model's batch size can be read from, after its first positional one
_BATCHED = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "encoder_out")


class Routing(NamedTuple):
    """Which adapter (``adapter_ids``) and which task (``task_ids``) each sequence of the batch uses:
    LongTensor [B] or None; -1 = none."""

    adapter_ids: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None


_ROUTING: contextvars.ContextVar[Routing] = contextvars.ContextVar("fusedlm_routing", default=Routing())


def _check_ids(name: str, ids: torch.Tensor | None, batch: int) -> None:
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
    inside the block."""
    _check_ids("adapter_ids", adapter_ids, batch)
    _check_ids("task_ids", task_ids, batch)
    token = _ROUTING.set(Routing(adapter_ids, task_ids))
    try:
        yield
    finally:
        _ROUTING.reset(token)


def current_routing() -> Routing:
    """The (adapter_ids, task_ids) of the forward running now (both None outside one)."""
    return _ROUTING.get()


def _batch_size(args: tuple, kwargs: dict) -> int:
    batched = [args[0]] if args else []
    batched += [kwargs.get(k) for k in _BATCHED]
    first = next((t for t in batched if isinstance(t, torch.Tensor)), None)
    if first is None:
        raise ValueError(f"adapter_ids / task_ids need the batch: pass one of {', '.join(_BATCHED)}")
    return first.shape[0]


def _enter(model: nn.Module, args: tuple, kwargs: dict):
    ids = {k: kwargs.pop(k) for k in KEYS if k in kwargs}
    scopes = model._fusedlm_routing_scopes
    scopes.append(None)  # what _exit pops, also when the checks below raise
    if any(v is not None for v in ids.values()):
        scope = routing(_batch_size(args, kwargs), **ids)
        scope.__enter__()
        scopes[-1] = scope
    return args, kwargs


def _exit(model: nn.Module, args: tuple, output):
    scopes = model._fusedlm_routing_scopes
    scope = scopes.pop() if scopes else None
    if scope is not None:
        scope.__exit__(None, None, None)


def install(model: nn.Module) -> nn.Module:
    """Lets `model` take ``adapter_ids`` / ``task_ids`` keyword arguments in its forward (once per
    model; a second call does nothing). Returns the model."""
    if not hasattr(model, "_fusedlm_routing_scopes"):
        model._fusedlm_routing_scopes = []
        model.register_forward_pre_hook(_enter, with_kwargs=True)
        model.register_forward_hook(_exit, always_call=True)
    return model
