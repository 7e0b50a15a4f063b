"""Reference LoRA linear layer, in plain PyTorch.

``y = x Wᵀ + b + scaling · g · (dropout(x) Aᵀ) Bᵀ``, computed in float32 (float64 for float64 x)
and returned in x's dtype.

* ``x [..., K]``; ``weight [N, K]`` (a dense tensor here; the op dequantises NF4 weights first);
  ``bias [N]`` or None.
* One adapter: ``lora_a [r, K]``, ``lora_b [N, r]`` (peft's ``lora_A.weight`` / ``lora_B.weight``);
  ``adapter_ids`` must be None and every row uses the adapter.
* Many adapters: ``lora_a [A, r, K]``, ``lora_b [A, N, r]`` and ``adapter_ids`` LongTensor ``[M]``
  over the flattened rows of x (``M = x.numel() // K``). Row m uses adapter ``adapter_ids[m]``;
  ``-1`` means no adapter (the row is the base output alone). Ids must lie in ``[-1, A)``.
* ``gates``: None (1), a float, or a tensor ``[A]`` (``[1]`` with one adapter): the adapter term of
  a row using adapter a is multiplied by ``scaling * gates[a]``.
* ``dropout_mask``: None (no dropout), or a float tensor ``[M, K]`` that multiplies x on the
  adapter's input only (peft applies dropout there); :func:`dropout_mask` draws it. The mask
  already holds the ``1 / (1 - p)`` rescaling, so ``E[mask] = 1``.

Edge cases: ``M = 0`` returns an empty ``[..., N]``; rank r = 0 adds nothing.

This module imports nothing of fusedlm: it is the ground truth the kernels are tested against,
and the one place the dropout mask is drawn.
"""
from __future__ import annotations

import torch


def dropout_mask(rows: int, k: int, p: float, seed: int, device: torch.device) -> torch.Tensor | None:
    """The adapter-input dropout mask for ``[rows, K]``: 0 with probability p, else ``1 / (1 - p)``.

    Drawn from a fresh generator seeded with `seed` on `device`, so the backward (or a test) gets
    the same mask back from the seed alone. None when ``p == 0``.
    """
    if p == 0.0:
        return None
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = torch.rand((rows, k), generator=gen, device=device) >= p
    return keep.to(torch.float32) / (1.0 - p)


def _gate_tensor(gates, n_adapters: int, acc: torch.dtype, device) -> torch.Tensor:
    if gates is None:
        return torch.ones(n_adapters, dtype=acc, device=device)
    if isinstance(gates, torch.Tensor):
        return gates.to(acc).reshape(n_adapters)
    return torch.full((n_adapters,), float(gates), dtype=acc, device=device)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    gates: float | torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scaling · g · (dropout(x) Aᵀ) Bᵀ`` (see the module docstring); differentiable."""
    k = x.shape[-1]
    n_out = weight.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)  # accumulation dtype
    x2 = x.reshape(-1, k).to(acc)  # (M, K)
    y = x2 @ weight.to(acc).T  # (M, N)
    if bias is not None:
        y = y + bias.to(acc)
    xd = x2 if dropout_mask is None else x2 * dropout_mask  # adapter input

    if lora_a.dim() == 2:  # one adapter
        g = _gate_tensor(gates, 1, acc, x.device)[0]
        y = y + scaling * g * ((xd @ lora_a.to(acc).T) @ lora_b.to(acc).T)
    else:  # many: each adapter adds its term to the rows that chose it
        g = _gate_tensor(gates, lora_a.shape[0], acc, x.device)
        for a in range(lora_a.shape[0]):
            rows = (adapter_ids == a).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            delta = scaling * g[a] * ((xd[rows] @ lora_a[a].to(acc).T) @ lora_b[a].to(acc).T)
            y = y.index_add(0, rows, delta)
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)
