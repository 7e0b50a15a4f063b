"""The fused LoRA linear layer: ``y = x Wᵀ + b + scaling · g · (dropout(x) Aᵀ) Bᵀ``.

Public API (DESIGN.md): :func:`lora_linear`. The math, the multi-adapter rules and the dropout
mask are documented in :mod:`fusedlm.reference.lora`, the ground truth.

Backends (forward):

* ``reference``: plain PyTorch.
* ``cpu`` (``csrc/cpu/lora.cpp``): the base product is torch's GEMM (MKL/oneDNN), which nothing of
  ours beats on a dense matmul; the C++ kernel does the adapter part, rows grouped by adapter:
  shrink ``h = x Aᵀ`` ([M, r], float32) and expand ``s · h Bᵀ``, added to the bias and to the base
  product in one pass over the output (see :data:`CPU_BASE_FIRST`).
* ``triton`` (``kernels/lora.py``): one kernel per output tile computes the base tile ``x Wᵀ`` and
  adds the adapter term (and bias) before the store.

Every backend also returns ``h = dropout(x) A_{id}ᵀ`` (float32 ``[M, r]``, zeros for rows without an
adapter). The backward (plain PyTorch, shared by all backends) saves only x, h and the parameters,
never an ``M x N`` tensor. Multi-adapter gradients use one GEMM over all adapters' ranks at once
(``[M, N] x [N, A·r]``), so they cost about A times the single-adapter adapter work, without
data-dependent shapes (``torch.compile``-friendly).

Dropout (training only; pass ``dropout_p=0`` in eval, as peft's ``nn.Dropout`` does in eval mode):
the wrapper draws one 62-bit seed from `generator` (or torch's default generator) and the mask is
regenerated from that seed by :func:`fusedlm.reference.lora.dropout_mask`, in the forward and again in
the backward, so nothing of size ``M x K`` is saved for it.

NF4 weights (QLoRA): the base product is :func:`fusedlm.ops.nf4_matmul` (its fused kernels where they
exist; its reference path dequantises the weight first), and the adapter term is added onto that
output by this op's kernels; the 4-bit weight gets no gradient.
"""
from __future__ import annotations

import numbers

import torch

from ..reference import lora as ref
from . import _checks
from ._backends import Dispatcher, cpu_module
from .nf4 import NF4Weight, nf4_matmul

# cpu backend: True = torch GEMM first, then the adapter kernel adds bias + adapter term onto it
# (read-modify-write of y); False = the adapter kernel writes bias + adapter term, then an addmm
# with beta=1 accumulates the base product onto it (MKL's beta=1 GEMM measured as fast as beta=0).
# `fusedlm bench --suite lora --full` prints both; they measured within noise of each other at
# M=512, K=N=4096 (89.8 vs 90.2 ms, 2 threads), so the default skips the extra pass over y.
CPU_BASE_FIRST = False

_forward = Dispatcher("lora_linear")
# float64 runs on the reference backend only (for gradcheck).
_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _cpu_supports(dtype: torch.dtype, **facts) -> str | None:
    return None if dtype in _checks.FLOAT_DTYPES else f"the cpu kernel does not support {dtype}"


# ---------------------------------------------------------------------------------------------
# helpers shared by the backends
# ---------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _row_scales(scaling: float, gates: torch.Tensor, ids: torch.Tensor | None, m: int) -> torch.Tensor:
    """Per-row factor scaling * g[id] (0 for rows without an adapter), float32 [M]."""
    g = scaling * gates.float()
    if ids is None:
        return g.expand(m)
    return torch.where(ids >= 0, g[ids.clamp(min=0)], torch.zeros((), device=g.device))


def _one_hot(ids: torch.Tensor | None, n_adapters: int, m: int, device) -> torch.Tensor:
    """float32 [M, A]: 1 where row m uses adapter a (all ones for a single adapter without ids)."""
    if ids is None:
        return torch.ones((m, n_adapters), dtype=torch.float32, device=device)
    return (ids[:, None] == torch.arange(n_adapters, device=device)).float()


def _shrink(xd: torch.Tensor, lora_a: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """h = xd A_{id}ᵀ, float32 [M, r], zeros for rows without an adapter (dense over all adapters)."""
    m = xd.shape[0]
    n_adapters, r, k = lora_a.shape
    acc = _acc(lora_a.dtype)
    every = (xd.to(acc) @ lora_a.to(acc).reshape(n_adapters * r, k).T).view(m, n_adapters, r)
    return (every * _one_hot(ids, n_adapters, m, xd.device).to(acc)[:, :, None]).sum(1)


@torch.library.custom_op("fusedlm::lora_dropout_mask", mutates_args=())
def _dropout_mask_op(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """The float32 [M, K] dropout mask for x [M, K] (a custom op so the backward traces under fake tensors)."""
    return ref.dropout_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)


@_dropout_mask_op.register_fake
def _(x, dropout_p, seed):
    return x.new_empty(x.shape, dtype=torch.float32)


def _adapter_input(x2: torch.Tensor, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if dropout_p == 0.0:
        return x2, None
    mask = _dropout_mask_op(x2, dropout_p, seed)
    return x2.to(_acc(x2.dtype)) * mask, mask


# ---------------------------------------------------------------------------------------------
# Backends. Each gets x2 [M, K], a dense weight [N, K] or base [M, N] (exactly one), lora_a
# [A, r, K], lora_b [A, N, r], bias [N] or None, ids [M] or None (None: every row adapter 0),
# gates [A], and returns (y [M, N] in x's dtype, h [M, r] float32).
# ---------------------------------------------------------------------------------------------
@_forward.register("reference")
def _forward_reference(x2, weight, base, lora_a, lora_b, scaling, bias, ids, gates, dropout_p, seed):
    xd, mask = _adapter_input(x2, dropout_p, seed)
    h = _shrink(xd, lora_a, ids)
    if ids is None:
        ids = torch.zeros(x2.shape[0], dtype=torch.long, device=x2.device)
    if base is None:
        y = ref.lora_linear(x2, weight, lora_a, lora_b, scaling, bias=bias, adapter_ids=ids, gates=gates, dropout_mask=mask)
    else:
        zero = torch.zeros((base.shape[1], x2.shape[1]), dtype=x2.dtype, device=x2.device)
        delta = ref.lora_linear(x2, zero, lora_a, lora_b, scaling, adapter_ids=ids, gates=gates, dropout_mask=mask)
        y = (base.to(_acc(x2.dtype)) + delta.to(_acc(x2.dtype))).to(x2.dtype)
    return y, h


def _cpu_adapter(xd, lora_a, lora_b, scaling, bias, ids, gates, out, init):
    """Runs csrc/cpu/lora.cpp: h = xd A_{id}ᵀ, then out = init + bias + s · h Bᵀ per row."""
    m, k = xd.shape
    n_adapters, r, _ = lora_a.shape
    a32 = lora_a.float().contiguous()  # [A, r, K]
    bt32 = lora_b.float().transpose(1, 2).contiguous()  # [A, r, N]: the expand streams along N
    scales = (scaling * gates.float()).contiguous()
    if ids is None:
        rows = None
        segments = torch.tensor([0, 0, m], dtype=torch.long)
    else:  # rows grouped by adapter: segment 0 = rows without one, segment 1 + a = adapter a
        rows = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids + 1, minlength=n_adapters + 1)
        segments = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    bias32 = None if bias is None else bias.float().contiguous()
    h = torch.empty((m, r), dtype=torch.float32)
    if m == 0:
        return h
    cpu_module().lora_forward(_checks.cpu_args(
        "LoraArgs", x=xd, lora_a=a32, lora_bt=bt32, rows=rows, segments=segments, scales=scales, bias=bias32, h=h,
        init=init, out=out, num_threads=_checks.num_threads(),
    ))
    return h


@_forward.register("cpu", supports=_cpu_supports)
def _forward_cpu(x2, weight, base, lora_a, lora_b, scaling, bias, ids, gates, dropout_p, seed):
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    xd, _ = _adapter_input(x2, dropout_p, seed)
    m, n_out = x2.shape[0], lora_b.shape[1]
    if base is not None:  # NF4: the adapter kernel reads the base output and writes y
        out = torch.empty((m, n_out), dtype=x2.dtype)
        h = _cpu_adapter(xd, lora_a, lora_b, scaling, bias, ids, gates, out, base.contiguous())
    elif CPU_BASE_FIRST:
        out = torch.mm(x2, weight.T)
        h = _cpu_adapter(xd, lora_a, lora_b, scaling, bias, ids, gates, out, out)
    else:
        out = torch.empty((m, n_out), dtype=x2.dtype)
        h = _cpu_adapter(xd, lora_a, lora_b, scaling, bias, ids, gates, out, None)
        out.addmm_(x2, weight.T)
    return out, h


def _triton_supports(dtype: torch.dtype, **facts) -> str | None:
    return None if dtype in _checks.FLOAT_DTYPES else f"the triton kernel does not support {dtype}"


@_forward.register("triton", supports=_triton_supports)
def _forward_triton(x2, weight, base, lora_a, lora_b, scaling, bias, ids, gates, dropout_p, seed):
    from ..kernels import lora as kernels

    xd, _ = _adapter_input(x2, dropout_p, seed)
    h = _shrink(xd, lora_a, ids)  # [M, r], a tiny GEMM next to the base product
    scales = _row_scales(scaling, gates, ids, x2.shape[0]).contiguous()
    if ids is None:
        ids = torch.zeros(x2.shape[0], dtype=torch.long, device=x2.device)
    y = kernels.lora_linear(x2, weight, base, h, lora_b, ids, scales, bias)
    return y, h


# ---------------------------------------------------------------------------------------------
# the custom op and its backward
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fusedlm::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor, weight: torch.Tensor | None, base: torch.Tensor | None, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scaling: float, bias: torch.Tensor | None, adapter_ids: torch.Tensor | None,
    gates: torch.Tensor, dropout_p: float, seed: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(backend, x, weight, base, lora_a, lora_b, scaling, bias, adapter_ids, gates, dropout_p, seed)


@_lora_linear_op.register_fake
def _(x, weight, base, lora_a, lora_b, scaling, bias, adapter_ids, gates, dropout_p, seed, backend):
    m, r, n_out = x.shape[0], lora_a.shape[1], lora_b.shape[1]
    return x.new_empty((m, n_out)), x.new_empty((m, r), dtype=_acc(x.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, base, lora_a, lora_b, scaling, bias, adapter_ids, gates, dropout_p, seed, backend = inputs
    _, h = output
    # x, h and the parameters: never an M x N tensor.
    ctx.save_for_backward(x, weight, lora_a, lora_b, adapter_ids, gates, h)
    ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y, grad_h):
    """dy -> dx, dW, dbase, dA, dB, db, dgates (float32 math, cast back to each input's dtype).

    With u = dy B_{id} [M, r] and s = scaling · g_{id} per row:
    dB_a = s_a Σ_{rows of a} dyᵀ h,  dh = s u,  dA_a = Σ_{rows of a} dhᵀ xd,  dx = dy W + (dh A_{id}) ⊙ mask,
    dg_a = scaling Σ_{rows of a} u · h.  All adapters at once: the rows' h and dh are scattered into
    [M, A·r] blocks (zeros outside the row's adapter), so each sum over rows is one GEMM.
    """
    x, weight, lora_a, lora_b, ids, gates, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    m, k = x.shape
    n_adapters, r, _ = lora_a.shape
    n_out = lora_b.shape[1]
    acc = _acc(x.dtype)
    dy = grad_y.to(acc)
    onehot = _one_hot(ids, n_adapters, m, x.device).to(acc)  # [M, A]
    g = gates.to(acc)
    b_cat = lora_b.to(acc).permute(1, 0, 2).reshape(n_out, n_adapters * r)  # [N, A·r]
    u = ((dy @ b_cat).view(m, n_adapters, r) * onehot[:, :, None]).sum(1)  # [M, r]
    row_s = (onehot * (ctx.scaling * g)).sum(1, keepdim=True)  # [M, 1]
    dh = row_s * u
    h_blocks = (onehot[:, :, None] * h[:, None, :]).reshape(m, n_adapters * r)  # [M, A·r]
    dh_blocks = (onehot[:, :, None] * dh[:, None, :]).reshape(m, n_adapters * r)
    xd, mask = _adapter_input(x, ctx.dropout_p, ctx.seed)

    grad_x = grad_w = grad_base = grad_a = grad_b = grad_bias = grad_g = None
    if need[0]:
        dx = dh_blocks @ lora_a.to(acc).reshape(n_adapters * r, k)  # [M, K]
        if mask is not None:
            dx = dx * mask
        if weight is not None:
            dx = torch.addmm(dx, dy, weight.to(acc))  # the base GEMM accumulates onto the adapter part
        grad_x = dx.to(x.dtype)
    if weight is not None and need[1]:
        grad_w = (dy.T @ x.to(acc)).to(weight.dtype)
    if need[2]:
        grad_base = grad_y
    if need[3]:
        grad_a = (dh_blocks.T @ xd.to(acc)).view(n_adapters, r, k).to(lora_a.dtype)
    if need[4]:
        db = (dy.T @ h_blocks).view(n_out, n_adapters, r).permute(1, 0, 2)  # [A, N, r], unscaled
        grad_b = (db * (ctx.scaling * g)[:, None, None]).to(lora_b.dtype)
    if need[6]:
        grad_bias = dy.sum(0).to(ctx.bias_dtype)
    if need[8]:
        grad_g = (ctx.scaling * (onehot[:, :, None] * (u * h)[:, None, :]).sum((0, 2))).to(gates.dtype)
    return grad_x, grad_w, grad_base, grad_a, grad_b, None, grad_bias, None, grad_g, None, None, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    gates: float | torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scaling · g · (dropout(x) Aᵀ) Bᵀ``: a linear layer with one LoRA adapter or many.

    Args:
        x: ``[..., K]`` float32, bfloat16 or float16 (float64: reference backend only).
        weight: ``[N, K]`` in x's dtype, or an :class:`NF4Weight` of shape ``[N, K]`` (QLoRA; frozen).
        lora_a: ``[r, K]`` (one adapter; peft's ``lora_A.weight``) or ``[A, r, K]`` (many), x's dtype.
        lora_b: ``[N, r]`` or ``[A, N, r]`` (peft's ``lora_B.weight``), x's dtype.
        scaling: the adapter's scale (peft: ``lora_alpha / r``).
        bias: ``[N]`` in x's dtype, or None.
        adapter_ids: int64 ``[M]`` over the flattened rows of x (``M = x.numel() // K``), values in
            ``[-1, A)``, -1 = no adapter. Required with many adapters; optional with one.
        gates: None, a float, or a tensor ``[A]`` (``[1]`` with one adapter): per-adapter factor on
            the adapter term; differentiable.
        dropout_p: dropout probability on the adapter's input, in [0, 1). Training only: pass 0 in
            eval. The mask comes from a seed drawn from `generator` and is regenerated in backward.
        generator: the torch.Generator the dropout seed is drawn from (default: torch's).

    Returns ``[..., N]`` in x's dtype; accumulation is float32. Edge cases: M = 0 gives an empty
    output; rows with id -1 are the base layer alone.
    """
    _checks.tensor("x", x, dtypes=_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension [..., K], got a 0-d tensor")
    k = x.shape[-1]
    dtype = x.dtype
    if isinstance(weight, NF4Weight):
        weight.validate("weight")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be a 2-D weight [N, K], got shape {list(weight.shape)}")
        n_out = weight.shape[0]
        dense = None
    else:
        _checks.tensor("weight", weight, dtypes=_DTYPES, ndim=2)
        _checks.same_dtype(x=x, weight=weight)
        n_out = weight.shape[0]
        dense = weight
    if weight.shape[1] != k:
        raise ValueError(f"x must have last dimension K={weight.shape[1]} (weight [N, K] = {list(weight.shape)}), got shape {list(x.shape)}")

    _checks.tensor("lora_a", lora_a, dtypes=_DTYPES, ndim=(2, 3))
    _checks.tensor("lora_b", lora_b, dtypes=_DTYPES, ndim=lora_a.dim())
    _checks.same_dtype(x=x, lora_a=lora_a, lora_b=lora_b)
    many = lora_a.dim() == 3
    n_adapters = lora_a.shape[0] if many else 1
    r = lora_a.shape[-2]
    if lora_b.shape[-1] != r:
        raise ValueError(f"rank mismatch: lora_a has rank r={r} (shape {list(lora_a.shape)}) but lora_b has {lora_b.shape[-1]} (shape {list(lora_b.shape)})")
    if many and lora_b.shape[0] != n_adapters:
        raise ValueError(f"lora_a holds {n_adapters} adapters but lora_b holds {lora_b.shape[0]}; they must match")
    _checks.shape("lora_a", lora_a, (n_adapters, r, k) if many else (r, k))
    _checks.shape("lora_b", lora_b, (n_adapters, n_out, r) if many else (n_out, r))
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=_DTYPES)
        _checks.same_dtype(x=x, bias=bias)
        _checks.shape("bias", bias, (n_out,))
    scaling = _number("scaling", scaling)

    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if adapter_ids is None:
        if many:
            raise ValueError(f"adapter_ids is required with many adapters (lora_a has shape {list(lora_a.shape)})")
    else:
        _checks.tensor("adapter_ids", adapter_ids, dtypes=[torch.int64], ndim=1)
        _checks.shape("adapter_ids", adapter_ids, (m,))
        if m and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= n_adapters):
            raise ValueError(
                f"adapter_ids must lie in [-1, {n_adapters}) (-1 = no adapter), got values in "
                f"[{int(adapter_ids.min())}, {int(adapter_ids.max())}]"
            )

    if gates is None:
        gate_t = torch.ones(n_adapters, dtype=torch.float32, device=x.device)
    elif isinstance(gates, torch.Tensor):
        _checks.tensor("gates", gates, dtypes=_DTYPES)
        if gates.numel() != n_adapters or gates.dim() > 1:
            raise ValueError(f"gates must have shape [{n_adapters}] (one per adapter), got {list(gates.shape)}")
        gate_t = gates.reshape(n_adapters)
    else:
        gate_t = torch.full((n_adapters,), _number("gates", gates), dtype=torch.float32, device=x.device)

    dropout_p = _number("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _checks.same_device(x=x, weight=dense if dense is not None else weight.data, lora_a=lora_a, lora_b=lora_b,
                        bias=bias, adapter_ids=adapter_ids, gates=gate_t)
    seed = 0
    if dropout_p > 0.0:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))

    a3 = lora_a if many else lora_a.unsqueeze(0)
    b3 = lora_b if many else lora_b.unsqueeze(0)
    backend = _forward.choose(x.device, dtype=dtype)
    if dense is None:  # NF4: base product by nf4_matmul (bias there), adapter term here
        base = nf4_matmul(x2, weight, bias)
        y, _ = _lora_linear_op(x2, None, base, a3, b3, scaling, None, adapter_ids, gate_t, dropout_p, seed, backend)
    else:
        y, _ = _lora_linear_op(x2, dense, None, a3, b3, scaling, bias, adapter_ids, gate_t, dropout_p, seed, backend)
    return y.reshape(*x.shape[:-1], n_out)
