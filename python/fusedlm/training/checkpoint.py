"""Trainer checkpoints: a folder per step holding everything an exact resume needs.

    checkpoint-<step>/
      model.safetensors     the model's full state dict (rank 0 writes it)
      optimizer.pt          AdamW state (rank 0: the full state; FSDP: see below)
      trainer_state.pt      step, scheduler, loader position, the model's parameter names and
                            shapes (to refuse another model's checkpoint)
      rng-<rank>.pt         each rank's RNG states (torch, python, CUDA): dropout resumes exactly
      dcp/                  FSDP only: model + optimizer as a torch.distributed.checkpoint (each
                            rank writes its shards), instead of optimizer.pt; model.safetensors is
                            still written (gathered to rank 0) for use outside training
"""
from __future__ import annotations

import os
import random

import torch
import torch.nn as nn

from . import distributed


def _named_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in distributed.unwrap(model).named_parameters()}


def check_compatible(model: nn.Module, saved: dict[str, list[int]], path: str) -> None:
    """Raises ValueError naming the differences when a checkpoint's parameters are not the model's."""
    ours = _named_shapes(model)
    missing, unexpected = sorted(set(saved) - set(ours)), sorted(set(ours) - set(saved))
    shapes = [f"{k}: checkpoint {saved[k]} vs model {ours[k]}" for k in sorted(set(saved) & set(ours)) if saved[k] != ours[k]]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"only in the checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"only in the model: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shapes differ: " + "; ".join(shapes[:5]))
        raise ValueError(f"checkpoint {path} is from another model: " + " | ".join(parts))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict as plain CPU tensors on rank 0 (gathered under FSDP; the other ranks get {})."""
    if distributed.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if distributed.is_main() else {}
    return {k: v.detach().cpu() for k, v in distributed.unwrap(model).state_dict().items()}


def _save_safetensors(state: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    tensors = {}
    for k, v in state.items():  # safetensors refuses shared storage: keep each tensor once
        key = (v.data_ptr(), v.shape, v.dtype)
        if v.numel() and key in seen:
            continue
        seen[key] = k
        tensors[k] = v.contiguous()
    save_file(tensors, path)


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, step: int, loader_state: dict,
         extra: dict | None = None) -> None:
    """Writes a checkpoint folder (collective under DDP/FSDP: every rank calls it)."""
    fsdp = distributed.is_fsdp(model)
    if distributed.is_main():
        os.makedirs(path, exist_ok=True)
    distributed.barrier()
    state = full_state_dict(model)
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(path, "dcp"))
    if distributed.is_main():
        _save_safetensors(state, os.path.join(path, "model.safetensors"))
        if not fsdp:
            torch.save(optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "loader": loader_state,
                    "params": _named_shapes(model), **(extra or {})}, os.path.join(path, "trainer_state.pt"))
    torch.save(_rng_state(), os.path.join(path, f"rng-{distributed.rank_and_world()[0]}.pt"))
    distributed.barrier()


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restores a checkpoint written by :func:`save` into model, optimizer and scheduler, and the
    RNG states; returns the trainer state (step, loader position, ...)."""
    state_path = os.path.join(path, "trainer_state.pt")
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{path} is not a fusedlm training checkpoint (no trainer_state.pt)")
    state = torch.load(state_path, weights_only=False)
    check_compatible(model, state["params"], path)
    if distributed.is_fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        loaded = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(loaded, checkpoint_id=os.path.join(path, "dcp"))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    else:
        from safetensors.torch import load_file

        weights = load_file(os.path.join(path, "model.safetensors"))
        inner = distributed.unwrap(model)
        missing, unexpected = inner.load_state_dict(weights, strict=False)
        # tied weights were written once; anything else missing is an error
        tied = {k for k in missing if _is_tied(inner, k)}
        if set(missing) - tied or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=False))
    scheduler.load_state_dict(state["scheduler"])
    rng_path = os.path.join(path, f"rng-{distributed.rank_and_world()[0]}.pt")
    _set_rng_state(torch.load(rng_path if os.path.isfile(rng_path) else os.path.join(path, "rng-0.pt"), weights_only=False))
    return state


def _is_tied(model: nn.Module, key: str) -> bool:
    """True when the state-dict entry `key` shares its storage with another entry (written once)."""
    sd = model.state_dict()
    t = sd[key]
    return any(k != key and v.data_ptr() == t.data_ptr() and v.shape == t.shape for k, v in sd.items())
