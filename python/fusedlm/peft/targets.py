"""Which linear layers of a fusedlm model a PEFT method adapts.

Seven target names, one per projection of a block (the same names on every architecture, because
the model layer names its projections the same way everywhere; a Seq2SeqLM's cross-attention
counts as attention):

    q -> attn.q_proj    k -> attn.k_proj    v -> attn.v_proj    o -> attn.o_proj
    gate -> mlp.gate_proj    up -> mlp.up_proj    down -> mlp.down_proj

GPT-2's c_attn / c_proj / c_fc / mlp.c_proj, BERT's query / key / value / output.dense /
intermediate.dense / output.dense, T5's q / k / v / o / wi / wo and BART's q_proj ... fc2 are these
same modules once loaded (``fusedlm.interop.hf`` maps the names). ``"all"`` = every linear of the
blocks; the LM head, embeddings and norms are never targets.
"""
from __future__ import annotations

import re

from torch import nn

TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

# blocks.{i}.attn.q_proj, blocks.{i}.cross_attn.k_proj, blocks.{i}.mlp.down_proj, ... in any stack
_BLOCK_LINEAR = re.compile(r"(^|.*\.)blocks\.\d+\.(attn|cross_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$")


def normalize_targets(targets) -> tuple[str, ...]:
    """targets: "all", one name, or an iterable of names out of TARGETS -> a sorted tuple of names."""
    if isinstance(targets, str):
        targets = tuple(TARGETS) if targets == "all" else (targets,)
    try:
        names = tuple(targets)
    except TypeError:
        raise TypeError(f"targets must be 'all' or names out of {sorted(TARGETS)}, got {type(targets).__name__}") from None
    if not names:
        raise ValueError(f"targets must name at least one of {sorted(TARGETS)} (or be 'all'), got none")
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target name(s) {unknown}; targets must be 'all' or names out of {list(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def target_of(module_name: str) -> str | None:
    """The target name ("q", ..., "down") of a block linear's module path, or None."""
    match = _BLOCK_LINEAR.match(module_name)
    return None if match is None else match.group(3)


def find_targets(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """(module path, module) of every block linear of `model` that `targets` selects, in model order.

    Raises ValueError when a requested target matches no module of the model (e.g. "gate" on
    GPT-2, whose MLP is not gated), as peft does for a target_modules entry that matches nothing."""
    names = normalize_targets(targets)
    found = [(path, m) for path, m in model.named_modules() if target_of(path) in names]
    missing = [t for t in names if not any(target_of(path) == t for path, _ in found)]
    explicit = not (isinstance(targets, str) and targets == "all")
    if explicit and missing:
        raise ValueError(f"target(s) {missing} match no linear layer of this {type(model).__name__} "
                         f"(its block linears: {sorted({target_of(p) for p, _ in model.named_modules() if target_of(p)})})")
    if not found:
        raise ValueError(f"no block linear of this {type(model).__name__} matches targets {list(names)}")
    return found


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replaces the submodule at dotted `path` with `module`."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
