"""Reference linear cross-entropy (an LM head and its loss), in plain PyTorch.

``logits = h Wᵀ + b`` (``[M, V]``), then for every row m whose target is not ``ignore_index``:

    loss_m = logsumexp(logits_m) - logits_m[targets_m]        (-log p(target))

* ``h [M, d]``, ``weight [V, d]``, ``bias [V]`` or None, ``targets`` int64 ``[M]`` in ``[0, V)`` or
  ``ignore_index``.
* ``reduction``: ``"mean"`` over the rows with a target (0 when there is none), ``"sum"``, or
  ``"none"``: ``[M]`` with 0 on the ignored rows.
* Also returned: the argmax of each row's logits (int64 ``[M]``, -1 on the ignored rows): the
  accuracy of a language model is ``(argmax == targets)`` over the kept rows. Ties go to the
  lowest index (``torch.argmax``).

Math in float32 (float64 for float64 inputs); the logits are rounded to h's dtype first, as a
``torch.nn.functional.linear`` in that dtype would round them. This module imports nothing of
fusedlm: it is the ground truth the fused op (:mod:`fusedlm.ops.linear_cross_entropy`) is tested
against, outputs and gradients.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: torch.Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, argmax) as the module docstring defines them; differentiable in h, weight and bias."""
    acc = torch.promote_types(h.dtype, torch.float32)
    logits = torch.nn.functional.linear(h, weight, bias).to(acc)  # (M, V), rounded to h's dtype first
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    rows = torch.where(keep, lse - picked, torch.zeros_like(lse))  # (M,)
    argmax = torch.where(keep, logits.detach().argmax(-1), torch.full_like(targets, -1))
    if reduction == "none":
        return rows, argmax
    total = rows.sum()
    if reduction == "sum":
        return total, argmax
    return total / keep.sum().clamp(min=1).to(acc), argmax
