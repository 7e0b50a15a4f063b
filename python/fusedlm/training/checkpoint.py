"""Trainer checkpoints: a folder per step holding everything an exact resume needs, written so
that nothing is lost (DESIGN.md rule 8).

    checkpoint-<step>/
      model.safetensors     the model's full state dict (rank 0 writes it)
      optimizer.pt          AdamW state (rank 0: the full state; FSDP: see below)
      trainer_state.pt      step, scheduler, loader position, the model's parameter names and
                            shapes (to refuse another model's checkpoint)
      rng-<rank>.pt         each rank's RNG states (torch, python, CUDA): dropout resumes exactly
      dcp/                  FSDP only: model + optimizer as a torch.distributed.checkpoint (each
                            rank writes its shards), instead of optimizer.pt; model.safetensors is
                            still written (gathered to rank 0) for use outside training
      fusedlm_complete.json the completion marker, written last: every file's size and SHA-256

Saving writes the files into ``.checkpoint-<step>.partial`` beside the final folder, then swaps
it in whole (``fusedlm._io``): a crash at any moment leaves the previous checkpoints untouched
and no folder named checkpoint-<step> that is incomplete. Weights holding NaN or inf are never
written (FloatingPointError). Loading checks the whole folder before it changes anything: the
marker (every file there, of its size and checksum: a truncated file or finite garbage is
caught), every file readable, the parameter names and shapes of the model and of the optimizer's
state; only then are the model, optimizer, scheduler and RNG states set. :func:`latest` returns
the newest complete checkpoint of a run.
"""
from __future__ import annotations

import os
import random
import re

import torch
import torch.nn as nn

from .. import _io
from . import distributed

_NAME = re.compile(r"checkpoint-(\d+)")
_REPLACED = re.compile(r"\.checkpoint-(\d+)\.replaced")
_MODEL, _OPTIMIZER, _STATE = "model.safetensors", "optimizer.pt", "trainer_state.pt"


def latest(out_dir: str) -> str | None:
    """The newest complete ``checkpoint-<step>`` folder in `out_dir` (its completion marker there and
    every file it lists of the listed size), or None. Folders a crash left incomplete are skipped."""
    if not os.path.isdir(out_dir):
        return None
    steps = set()
    for name in os.listdir(out_dir):
        m = _NAME.fullmatch(name) or _REPLACED.fullmatch(name)  # .replaced: a swap killed midway left the old one beside it
        if m:
            steps.add(int(m.group(1)))
    for step in sorted(steps, reverse=True):
        path = _io.resolve(os.path.join(out_dir, f"checkpoint-{step}"))
        if _io.is_complete(path):
            return path
    return None


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


def _nonfinite(model: nn.Module) -> list[str]:
    """Names of the model's floating tensors (this rank's shards under FSDP) holding NaN or inf."""
    bad = []
    for name, t in distributed.unwrap(model).state_dict().items():
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, step: int, loader_state: dict,
         extra: dict | None = None) -> None:
    """Writes checkpoint folder `path` (collective under DDP/FSDP: every rank calls it), atomically:
    see the module docstring. Raises FloatingPointError, writing nothing, when a weight holds NaN or inf."""
    bad = _nonfinite(model)
    if distributed.any_rank(bool(bad)):
        raise FloatingPointError(f"not writing checkpoint {path}: weights hold NaN or inf"
                                 + (f" ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})" if bad else " (on another rank)"))
    fsdp = distributed.is_fsdp(model)
    if distributed.is_main():
        _io.begin_folder(path)
    distributed.barrier()
    tmp = _io.partial_folder(path)
    state = full_state_dict(model)
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(tmp, "dcp"))
    if distributed.is_main():
        _save_safetensors(state, os.path.join(tmp, _MODEL))
        if not fsdp:
            torch.save(optimizer.state_dict(), os.path.join(tmp, _OPTIMIZER))
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "loader": loader_state,
                    "params": _named_shapes(model), **(extra or {})}, os.path.join(tmp, _STATE))
    torch.save(_rng_state(), os.path.join(tmp, f"rng-{distributed.rank_and_world()[0]}.pt"))
    distributed.barrier()
    if distributed.is_main():
        _io.commit_folder(tmp, path, marker=True, carry_over=False)
    distributed.barrier()


def _check_weights(model: nn.Module, weights: dict[str, torch.Tensor], file: str) -> None:
    """Raises ValueError naming `file` when its tensors are not the model's state dict (tied
    entries, written once, may be missing) or hold NaN / inf."""
    inner = distributed.unwrap(model)
    ours = inner.state_dict()
    missing = sorted(k for k in set(ours) - set(weights) if not _is_tied(inner, k))
    unexpected = sorted(set(weights) - set(ours))
    shapes = [f"{k}: file {list(weights[k].shape)} vs model {list(ours[k].shape)}" for k in sorted(set(weights) & set(ours))
              if weights[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                         + (f", shapes differ: {'; '.join(shapes[:5])}" if shapes else ""))
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{file}: tensor(s) {bad[:5]} hold NaN or inf values")


def _check_optimizer(optimizer: torch.optim.Optimizer, saved, file: str) -> None:
    """Raises ValueError naming `file` when the saved optimizer state does not fit `optimizer`:
    the groups, their sizes, and every state tensor's shape against its parameter's."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(saved.get("param_groups"), list):
        raise ValueError(f"{file} is not an optimizer state dict ('state' and 'param_groups')")
    groups = optimizer.param_groups
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g.get("params", ())) for g in saved["param_groups"]]
    if sizes != saved_sizes:
        raise ValueError(f"{file} is the optimizer of another model: parameter groups of sizes {saved_sizes}, this optimizer's {sizes}")
    params = [p for g in groups for p in g["params"]]
    for index, entry in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise ValueError(f"{file} has a state entry for parameter {index!r}, this optimizer has {len(params)} parameters")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(f"{file}: state {key!r} of parameter {index} has shape {list(value.shape)}, the parameter "
                                 f"{list(params[index].shape)}")
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{file}: state {key!r} of parameter {index} holds NaN or inf values")


def _clone(tree):
    return torch.utils._pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restores a checkpoint written by :func:`save` into model, optimizer and scheduler, and the
    RNG states; returns the trainer state (step, loader position, ...). The whole folder is checked
    first (module docstring): a missing, incomplete, truncated, corrupted or mismatched checkpoint
    raises (FileNotFoundError / ValueError naming the file) with nothing changed."""
    path = _io.resolve(path)
    if os.path.isdir(path) and _io.marker_files(path) is None and not os.path.exists(os.path.join(path, _STATE)):
        newest = latest(path)
        raise FileNotFoundError(f"{path} is not a fusedlm training checkpoint (no {_STATE}, no {_io.MARKER})"
                                + (f"; it is a run folder whose newest complete checkpoint is {newest}" if newest else ""))
    _io.verify_folder(path, "checkpoint")
    state = _io.read_torch(os.path.join(path, _STATE), "trainer state")
    if not isinstance(state, dict) or not {"step", "scheduler", "loader", "params"} <= set(state):
        raise ValueError(f"trainer state {os.path.join(path, _STATE)} lacks step / scheduler / loader / params")
    check_compatible(model, state["params"], path)
    rank = distributed.rank_and_world()[0]
    rng_path = os.path.join(path, f"rng-{rank}.pt")
    rng = _io.read_torch(rng_path if os.path.isfile(rng_path) else os.path.join(path, "rng-0.pt"), "RNG state")
    if distributed.is_fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        loaded = _clone({"model": model_sd, "optimizer": optim_sd})  # read into copies: nothing changes if it fails
        try:
            dcp.load(loaded, checkpoint_id=os.path.join(path, "dcp"))
        except Exception as e:
            raise ValueError(f"distributed checkpoint {os.path.join(path, 'dcp')} cannot be read: {type(e).__name__}: {e}") from None
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    else:
        weights = _io.read_safetensors(os.path.join(path, _MODEL), "model weights")
        _check_weights(model, weights, os.path.join(path, _MODEL))
        optim = _io.read_torch(os.path.join(path, _OPTIMIZER), "optimizer state")
        _check_optimizer(optimizer, optim, os.path.join(path, _OPTIMIZER))
        distributed.unwrap(model).load_state_dict(weights, strict=False)
        optimizer.load_state_dict(optim)
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(rng)
    return state


def load_weights(model: nn.Module, file: str) -> nn.Module:
    """Loads a model.safetensors written by fusedlm (a checkpoint's, or save_pretrained's under
    fusedlm's names) into `model`, strictly: every tensor must be one of the model's with its
    shape, and every model tensor must be there (tied copies excepted); checked before the model
    changes. A file inside a checkpoint folder is checked against its completion marker."""
    folder = os.path.dirname(os.path.abspath(file))
    if _io.marker_files(folder) is not None:
        _io.verify_folder(folder, "checkpoint")
    weights = _io.read_safetensors(file, "weights file")
    _check_weights(model, weights, file)
    distributed.unwrap(model).load_state_dict(weights, strict=False)
    return model


def _is_tied(model: nn.Module, key: str) -> bool:
    """True when the state-dict entry `key` shares its storage with another entry (written once)."""
    sd = model.state_dict()
    t = sd[key]
    return any(k != key and v.data_ptr() == t.data_ptr() and v.shape == t.shape for k, v in sd.items())
