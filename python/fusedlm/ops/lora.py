"""The fused LoRA linear layer: ``y = x Wᵀ + b + scaling · g · (dropout(x) Aᵀ) Bᵀ``.

Public API (DESIGN.md): :func:`lora_linear`. The math, the multi-adapter rules and the dropout
mask are documented in :mod:`fusedlm.reference.lora`, the ground truth.

Backends (forward):

* ``reference``: plain PyTorch.
* ``cpu`` (``csrc/cpu/lora.cpp``): the base product is torch's GEMM (MKL/oneDNN), which nothing of
  ours beats on a dense matmul; the C++ kernel does the adapter part, rows grouped by adapter:
  shrink ``h = x Aᵀ`` ([M, r], float32) and expand ``s · h Bᵀ`` plus the bias, written to the output,
  onto which an ``addmm`` with ``beta=1`` then accumulates the base product (MKL's beta=1 GEMM
  measured as fast as beta=0, and this skips a pass over y that adding after the GEMM costs).
* ``triton`` (``kernels/lora.py``): one kernel per output tile computes the base tile ``x Wᵀ`` and
  adds the adapter term (and bias) before the store.

Inputs: :func:`lora_linear` checks its arguments and gathers them in one record,
:class:`LoraInputs`, which the custom op's schema mirrors field for field (``ops/_records.py``); the
fake, ``setup_context``, the backward and every backend take it.

Every backend also returns ``h = dropout(x) A_{id}ᵀ`` (float32 ``[M, r]``, zeros for rows without an
adapter). The backward (plain PyTorch, shared by all backends) saves only x, h and the parameters,
never an ``M x N`` tensor. Multi-adapter gradients use one GEMM over all adapters' ranks at once
(``[M, N] x [N, A·r]``), so they cost about A times the single-adapter adapter work, without
data-dependent shapes (``torch.compile``-friendly).

Dropout (training only; pass ``dropout_p=0`` in eval, as peft's ``nn.Dropout`` does in eval mode):
the wrapper draws one 62-bit seed from `generator` (or torch's default generator;
:func:`fusedlm.ops._checks.dropout_seed`, as attention does) and the mask is
regenerated from that seed by :func:`fusedlm.reference.lora.dropout_mask`, in the forward and again in
the backward, so nothing of size ``M x K`` is saved for it.

NF4 weights (QLoRA): the base product is :func:`fusedlm.ops.nf4_matmul` (its fused kernels where they
exist; its reference path dequantises the weight first), and the adapter term is added onto that
output by this op's kernels; the 4-bit weight gets no gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..reference import lora as ref
from . import _checks, _gemm
from ._backends import Dispatcher
from ._records import record_op, save_for_backward, saved
from .nf4 import Nf4DequantizeInputs, NF4Weight, _nf4_dequantize_op, nf4_matmul

_forward = Dispatcher("lora_linear")
# float64 runs on the reference backend only (for gradcheck).
_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


class LoraInputs(NamedTuple):
    """The inputs of ``fusedlm::lora_linear``, as :func:`lora_linear` checked them (its schema: these
    fields, then the backend). Exactly one of weight, base and nf4_data is given."""

    x: torch.Tensor  # [M, K]
    weight: torch.Tensor | None  # dense [N, K]
    base: torch.Tensor | None  # [M, N]: the base product already computed (NF4 weights: nf4_matmul)
    lora_a: torch.Tensor  # [A, r, K]
    lora_b: torch.Tensor  # [A, N, r]
    scaling: float
    bias: torch.Tensor | None  # [N]
    adapter_ids: torch.Tensor | None  # int64 [M] in [-1, A); None: every row adapter 0
    gates: torch.Tensor  # [A]
    dropout_p: float
    seed: torch.Tensor | None  # int64 scalar from _checks.dropout_seed; None when dropout_p == 0
    nf4_data: torch.Tensor | None  # or the NF4 base weight [N, K] the op multiplies itself: packed bytes,
    nf4_absmax: torch.Tensor | None  # float32 [n_blocks] (double quantisation undone),
    nf4_blocksize: int  # and its blocksize
    compute_bf16: bool  # the base and adapter products on bf16 operands (float32 sums)


def _cpu_supports(dtype: torch.dtype, **facts) -> str | None:
    return None if dtype in _checks.FLOAT_DTYPES else f"the cpu kernel does not support {dtype}"


# ---------------------------------------------------------------------------------------------
# helpers shared by the backends
# ---------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _row_scales(a: LoraInputs, m: int) -> torch.Tensor:
    """Per-row factor scaling * g[id] (0 for rows without an adapter), float32 [M]."""
    g = a.scaling * a.gates.float()
    if a.adapter_ids is None:
        return g.expand(m)
    ids = a.adapter_ids
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
def _dropout_mask_op(x: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """The float32 [M, K] dropout mask for x [M, K] (a custom op so the backward traces under fake tensors)."""
    return ref.dropout_mask(x.shape[0], x.shape[1], dropout_p, _checks.seed_value(seed), x.device)


@_dropout_mask_op.register_fake
def _(x, dropout_p, seed):
    return x.new_empty(x.shape, dtype=torch.float32)


def _adapter_input(a: LoraInputs, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dropout(x), its float32 mask), or (x, None) without dropout."""
    if a.dropout_p == 0.0:
        return x, None
    mask = _dropout_mask_op(x, a.dropout_p, a.seed)
    return x.to(_acc(x.dtype)) * mask, mask


def _nf4(a: LoraInputs) -> NF4Weight | None:
    """The NF4 base weight of the record (its absmax already float32), or None."""
    if a.nf4_data is None:
        return None
    shape = torch.Size((a.lora_b.shape[1], a.x.shape[1]))
    return NF4Weight(a.nf4_data, a.nf4_absmax, a.nf4_blocksize, shape, torch.float32)


def _dense_weight(a: LoraInputs) -> torch.Tensor | None:
    """The base weight as a dense tensor (an NF4 one dequantised: the reference path), or None."""
    if a.nf4_data is not None:  # through the dequantise custom op, so fake tensors (torch.compile, opcheck) trace it
        return _nf4_dequantize_op(Nf4DequantizeInputs(a.nf4_data, a.nf4_absmax, a.nf4_blocksize,
                                                      [a.lora_b.shape[1], a.x.shape[1]], torch.float32), "reference")
    return a.weight


def _bf16_operand(t: torch.Tensor | None, a: LoraInputs) -> torch.Tensor | None:
    """t rounded to bf16 (and back to its dtype) when the record computes on bf16 operands."""
    if t is None or not a.compute_bf16 or t.dtype == torch.bfloat16:
        return t
    return t.to(torch.bfloat16).to(t.dtype)


def _engine(a: LoraInputs) -> bool:
    """Whether the cpu backend runs this record on the fused GEMM (csrc/cpu/lora_gemm.cpp): one
    adapter for every row, x float32 or bf16, the base weight dense float32 / bf16 or NF4."""
    if a.adapter_ids is not None or a.lora_a.shape[0] != 1 or a.x.dtype not in (torch.float32, torch.bfloat16):
        return False
    weight = _nf4(a) if a.nf4_data is not None else a.weight
    return weight is not None and _gemm.supports(weight) is None


def _engine_operand(t: torch.Tensor, a: LoraInputs) -> torch.Tensor:
    return t.to(torch.bfloat16) if a.compute_bf16 else t


# ---------------------------------------------------------------------------------------------
# Backends: LoraInputs -> (y [M, N] in x's dtype, h [M, r] float32)
# ---------------------------------------------------------------------------------------------
@_forward.register("reference")
def _forward_reference(a: LoraInputs):
    if a.nf4_data is not None or a.compute_bf16:  # the products' operands as the kernels see them
        a = a._replace(x=_bf16_operand(a.x, a), weight=_bf16_operand(_dense_weight(a), a), nf4_data=None, nf4_absmax=None,
                       lora_a=_bf16_operand(a.lora_a, a), lora_b=_bf16_operand(a.lora_b, a), compute_bf16=False)
    xd, mask = _adapter_input(a, a.x)
    h = _shrink(xd, a.lora_a, a.adapter_ids)
    ids = a.adapter_ids
    if ids is None:
        ids = torch.zeros(a.x.shape[0], dtype=torch.long, device=a.x.device)
    common = dict(adapter_ids=ids, gates=a.gates, dropout_mask=mask)
    if a.base is None:
        y = ref.lora_linear(a.x, a.weight.to(a.x.dtype), a.lora_a, a.lora_b, a.scaling, bias=a.bias, **common)
    else:
        zero = torch.zeros((a.base.shape[1], a.x.shape[1]), dtype=a.x.dtype, device=a.x.device)
        delta = ref.lora_linear(a.x, zero, a.lora_a, a.lora_b, a.scaling, **common)
        y = (a.base.to(_acc(a.x.dtype)) + delta.to(_acc(a.x.dtype))).to(a.x.dtype)
    return y, h


@_forward.register("cpu", supports=_cpu_supports)
def _forward_cpu(a: LoraInputs):
    """One adapter (float32 / bf16 x): the adapter's shrink h = xd Aᵀ, then the fused GEMM
    ``x Wᵀ + (s h) Bᵀ`` (csrc/cpu/lora_gemm.cpp: the adapter's term in the base product's
    accumulators, an NF4 W decoded panel by panel). Otherwise csrc/cpu/lora.cpp writes bias + the
    adapter term (with h) and the base product is accumulated onto it."""
    x = a.x if a.x.stride(1) == 1 else a.x.contiguous()
    m = x.shape[0]
    if _engine(a):
        return _forward_engine(a, x)
    xd, _ = _adapter_input(a, x)
    n_adapters, r, _ = a.lora_a.shape
    out = torch.empty((m, a.lora_b.shape[1]), dtype=x.dtype)
    h = torch.empty((m, r), dtype=torch.float32)
    if m == 0:
        return out, h
    base = a.base
    if a.nf4_data is not None:  # the NF4 base product first (the kernel adds the adapter term onto it)
        base = _gemm.lora_gemm(_engine_operand(x, a), _nf4(a), transposed=False, out_dtype=x.dtype)
    if a.adapter_ids is None:
        rows, segments = None, torch.tensor([0, 0, m], dtype=torch.long)
    else:  # rows grouped by adapter: segment 0 = rows without one, segment 1 + a = adapter a
        rows = torch.argsort(a.adapter_ids, stable=True)
        counts = torch.bincount(a.adapter_ids + 1, minlength=n_adapters + 1)
        segments = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    _checks.launch(
        "lora_forward", "LoraArgs", x.device, x=xd, lora_a=a.lora_a.float().contiguous(),  # [A, r, K]
        lora_bt=a.lora_b.float().transpose(1, 2).contiguous(),  # [A, r, N]: the expand streams along N
        rows=rows, segments=segments, scales=(a.scaling * a.gates.float()).contiguous(),
        bias=None if a.bias is None else a.bias.float().contiguous(), h=h,
        init=None if base is None else base.contiguous(), out=out,
    )
    if base is None:
        out.addmm_(x, a.weight.T)
    return out, h


def _forward_engine(a: LoraInputs, x: torch.Tensor):
    """y = x Wᵀ + b + s (xd Aᵀ) Bᵀ for one adapter on the fused GEMM; h float32 [M, r]."""
    xd, _ = _adapter_input(a, x)
    lora_a, lora_b = a.lora_a[0], a.lora_b[0]
    h = (xd @ lora_a.to(xd.dtype).T).float()  # [M, r], a rank-r GEMM
    s = a.scaling * a.gates[0].float()
    weight = _nf4(a) if a.nf4_data is not None else a.weight
    init = None if a.bias is None else a.bias.to(x.dtype).expand(x.shape[0], -1)
    out = _gemm.lora_gemm(_engine_operand(x, a), weight, transposed=False, a2=_engine_operand(s * h, a), w2=lora_b, init=init,
                          out_dtype=x.dtype)
    return out, h


def _triton_supports(dtype: torch.dtype, **facts) -> str | None:
    return None if dtype in _checks.FLOAT_DTYPES else f"the triton kernel does not support {dtype}"


@_forward.register("triton", supports=_triton_supports)
def _forward_triton(a: LoraInputs):
    from ..kernels import lora as kernels

    xd, _ = _adapter_input(a, a.x)
    h = _shrink(xd, a.lora_a, a.adapter_ids)  # [M, r], a tiny GEMM next to the base product
    m = a.x.shape[0]
    ids = a.adapter_ids if a.adapter_ids is not None else torch.zeros(m, dtype=torch.long, device=a.x.device)
    y = kernels.lora_linear(a.x, a.weight, a.base, h, a.lora_b, ids, _row_scales(a, m).contiguous(), a.bias)
    return y, h


# ---------------------------------------------------------------------------------------------
# the custom op and its backward
# ---------------------------------------------------------------------------------------------
@record_op("fusedlm::lora_linear", LoraInputs)
def _lora_linear_op(a: LoraInputs, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(a.x.device.type, enabled=False):  # the wrapper cast the operands already
        return _forward(backend, a)


@_lora_linear_op.register_fake
def _(a: LoraInputs, backend: str):
    m, r, n_out = a.x.shape[0], a.lora_a.shape[1], a.lora_b.shape[1]
    return a.x.new_empty((m, n_out)), a.x.new_empty((m, r), dtype=_acc(a.x.dtype))


def _setup_context(ctx, a: LoraInputs, backend: str, output):
    _, h = output
    # x, h and the parameters: never an M x N tensor (base is not kept; of bias only its dtype).
    save_for_backward(ctx, a._replace(base=None, bias=None), h)
    ctx.bias_dtype = None if a.bias is None else a.bias.dtype
    ctx.backend = backend


def _backward(ctx, grad_y, grad_h):
    """dy -> dx, dW, dbase, dA, dB, db, dgates (cast back to each input's dtype).

    With u = dy B_{id} [M, r] and s = scaling · g_{id} per row:
    dB_a = s_a Σ_{rows of a} dyᵀ h,  dh = s u,  dA_a = Σ_{rows of a} dhᵀ xd,  dx = dy W + (dh A_{id}) ⊙ mask,
    dg_a = scaling Σ_{rows of a} u · h.

    The M x N and M x K products (dy W, dh A) run in x's dtype, as autograd would run them (one
    bf16 GEMM for bf16 x, not a float32 copy of dy and W); the rank-r quantities (u, dh, h) are
    float32. One adapter without ids takes the direct path (:func:`_backward_one`); many adapters
    scatter the rows' h and dh into [M, A·r] blocks (zeros outside the row's adapter), so each sum
    over rows is one GEMM without data-dependent shapes.
    """
    a, h = saved(ctx)
    need = lambda field: _lora_linear_op.needs_grad(ctx, field)  # noqa: E731
    cpu = ctx.backend == "cpu"
    engine = cpu and _engine(a)
    if not cpu and (a.nf4_data is not None or a.compute_bf16):  # the operands the reference multiplied
        a = a._replace(x=_bf16_operand(a.x, a), weight=_bf16_operand(_dense_weight(a), a), nf4_data=None, nf4_absmax=None,
                       lora_a=_bf16_operand(a.lora_a, a), lora_b=_bf16_operand(a.lora_b, a))
        grad_y = _bf16_operand(grad_y, a)
    if a.adapter_ids is None and a.lora_a.shape[0] == 1:
        grads = _backward_one(a, h, grad_y, need, engine)
    else:
        grads = _backward_many(a, h, grad_y, need)
    if need("base"):
        grads["base"] = grad_y
    if need("bias"):
        grads["bias"] = grad_y.sum(0, dtype=_acc(grad_y.dtype)).to(ctx.bias_dtype)
    return _lora_linear_op.grads(**grads)


def _backward_one(a: LoraInputs, h: torch.Tensor, dy: torch.Tensor, need, engine: bool) -> dict:
    """One adapter, every row: three rank-r GEMMs (u, dA, dB) and dx. On the fused GEMM (engine)
    dx = dy W + dh A is one product (the adapter's part in the base's accumulators; with dropout the
    masked part is added after); otherwise dh A, then the base GEMM accumulating onto it."""
    x, weight, lora_a, lora_b = a.x, a.weight, a.lora_a[0], a.lora_b[0]
    dtype, acc = x.dtype, _acc(x.dtype)
    s = a.scaling * a.gates[0].to(acc)
    u = (dy @ lora_b.to(dtype)).to(acc)  # [M, r]
    dh = s * u
    xd, mask = _adapter_input(a, x)
    grads = {}
    if need("x") and engine:
        base = _nf4(a) if a.nf4_data is not None else weight
        fold = mask is None  # the adapter's part rides in the GEMM unless dropout masks it
        dx = _gemm.lora_gemm(_engine_operand(dy, a), base, transposed=True, a2=_engine_operand(dh, a) if fold else None,
                             w2=lora_a if fold else None, out_dtype=dtype)
        if not fold:
            dx += ((dh.to(dtype) @ lora_a.to(dtype)) * mask.to(dtype)).to(dtype)
        grads["x"] = dx
    elif need("x"):
        dx = dh.to(dtype) @ lora_a.to(dtype)  # [M, K]
        if mask is not None:
            dx = dx * mask.to(dtype)
        if weight is not None:
            dx.addmm_(dy, weight.to(dtype))  # the base GEMM accumulates onto the adapter part
        grads["x"] = dx
    if weight is not None and need("weight"):
        grads["weight"] = (dy.T @ x).to(weight.dtype)
    if need("lora_a"):
        grads["lora_a"] = (dh.to(dtype).T @ xd.to(dtype)).to(lora_a.dtype)[None]  # [1, r, K]
    if need("lora_b"):
        grads["lora_b"] = (s * (dy.T @ h.to(dtype)).to(acc)).to(lora_b.dtype)[None]  # [1, N, r]
    if need("gates"):
        grads["gates"] = (a.scaling * (u * h).sum()).reshape(1).to(a.gates.dtype)
    return grads


def _backward_many(a: LoraInputs, h: torch.Tensor, grad_y: torch.Tensor, need) -> dict:
    x, weight, lora_a, lora_b, gates = a.x, a.weight, a.lora_a, a.lora_b, a.gates
    m, k = x.shape
    n_adapters, r, _ = lora_a.shape
    n_out = lora_b.shape[1]
    dtype, acc = x.dtype, _acc(x.dtype)
    dy = grad_y.to(acc)
    onehot = _one_hot(a.adapter_ids, n_adapters, m, x.device).to(acc)  # [M, A]
    g = gates.to(acc)
    b_cat = lora_b.to(acc).permute(1, 0, 2).reshape(n_out, n_adapters * r)  # [N, A·r]
    u = ((dy @ b_cat).view(m, n_adapters, r) * onehot[:, :, None]).sum(1)  # [M, r]
    row_s = (onehot * (a.scaling * g)).sum(1, keepdim=True)  # [M, 1]
    dh = row_s * u
    h_blocks = (onehot[:, :, None] * h[:, None, :]).reshape(m, n_adapters * r)  # [M, A·r]
    dh_blocks = (onehot[:, :, None] * dh[:, None, :]).reshape(m, n_adapters * r)
    xd, mask = _adapter_input(a, x)

    grads = {}
    if need("x"):
        dx = dh_blocks @ lora_a.to(acc).reshape(n_adapters * r, k)  # [M, K]
        if mask is not None:
            dx = dx * mask
        dx = dx.to(dtype)
        if a.nf4_data is not None:  # the cpu backend: the NF4 base on the fused GEMM
            dx = _gemm.lora_gemm(_engine_operand(grad_y, a), _nf4(a), transposed=True, init=dx, out_dtype=dtype)
        elif weight is not None:
            dx.addmm_(grad_y, weight.to(dtype))  # the base GEMM, in x's dtype, onto the adapter part
        grads["x"] = dx
    if weight is not None and need("weight"):
        grads["weight"] = (grad_y.T @ x).to(weight.dtype)
    if need("lora_a"):
        grads["lora_a"] = (dh_blocks.T @ xd.to(acc)).view(n_adapters, r, k).to(lora_a.dtype)
    if need("lora_b"):
        db = (dy.T @ h_blocks).view(n_out, n_adapters, r).permute(1, 0, 2)  # [A, N, r], unscaled
        grads["lora_b"] = (db * (a.scaling * g)[:, None, None]).to(lora_b.dtype)
    if need("gates"):
        grads["gates"] = (a.scaling * (onehot[:, :, None] * (u * h)[:, None, :]).sum((0, 2))).to(gates.dtype)
    return grads


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _autocast(x, weight, lora_a, lora_b, bias):
    """Under torch.autocast, the float operands in the autocast dtype, as F.linear's would be (a
    dense weight already in that dtype, e.g. a frozen base kept in bf16, is used as it is)."""
    if x.device.type not in ("cpu", "cuda") or x.dtype == torch.float64 or not torch.is_autocast_enabled(x.device.type):
        return x, weight, lora_a, lora_b, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return cast(x), cast(weight), cast(lora_a), cast(lora_b), cast(bias)


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
    compute_dtype: torch.dtype | None = None,
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
        compute_dtype: None (x's dtype) or torch.bfloat16: the base and adapter products multiply
            bf16-rounded operands with float32 sums (bitsandbytes' compute_dtype; QLoRA's default
            where the CPU has bf16 dot products); x, the output and the gradients keep their dtype.

    Returns ``[..., N]`` in x's dtype; accumulation is float32. Under ``torch.autocast`` x, the
    dense weight, lora_a, lora_b and bias are first cast to the autocast dtype (F.linear's rule), so
    the base GEMMs of forward and backward run in it. Edge cases: M = 0 gives an empty output; rows
    with id -1 are the base layer alone.
    """
    _checks.tensor("x", x, dtypes=_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension [..., K], got a 0-d tensor")
    x, weight, lora_a, lora_b, bias = _autocast(x, weight, lora_a, lora_b, bias)
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
    scaling = _checks.number("scaling", scaling)

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
        gate_t = torch.full((n_adapters,), _checks.number("gates", gates), dtype=torch.float32, device=x.device)

    dropout_p = _checks.dropout_p(dropout_p)
    _checks.generator(generator)
    if compute_dtype not in (None, torch.float32, torch.bfloat16) or (compute_dtype is not None and x.dtype == torch.float64):
        raise ValueError(f"compute_dtype must be None, torch.float32 or torch.bfloat16 (with a float32 / bfloat16 / "
                         f"float16 x), got {compute_dtype} (x is {x.dtype})")
    _checks.same_device(x=x, weight=dense if dense is not None else weight.data, lora_a=lora_a, lora_b=lora_b,
                        bias=bias, adapter_ids=adapter_ids, gates=gate_t)
    seed = _checks.dropout_seed(dropout_p, generator)

    backend = _forward.choose(x.device, dtype=dtype)
    bf16 = compute_dtype == torch.bfloat16 and dtype != torch.bfloat16
    inputs = LoraInputs(
        x=x2, weight=dense, base=None, lora_a=lora_a if many else lora_a.unsqueeze(0),
        lora_b=lora_b if many else lora_b.unsqueeze(0), scaling=scaling, bias=bias, adapter_ids=adapter_ids,
        gates=gate_t, dropout_p=dropout_p, seed=seed, nf4_data=None, nf4_absmax=None, nf4_blocksize=0, compute_bf16=bf16,
    )
    if dense is None and (backend == "reference" or (backend == "cpu" and _gemm.supports(weight) is None)):
        # NF4 multiplied by the op itself: the cpu backend's fused GEMM decodes it panel by panel
        inputs = inputs._replace(nf4_data=weight.data.view(-1), nf4_absmax=weight.float_absmax(), nf4_blocksize=weight.blocksize)
    elif dense is None:  # NF4 on the other backends: the base product by nf4_matmul (bias there), the adapter term here
        xb = x2.to(torch.bfloat16) if bf16 else x2
        inputs = inputs._replace(base=nf4_matmul(xb, weight, None if bias is None else bias.to(xb.dtype)).to(dtype), bias=None,
                                 compute_bf16=False)
    y, _ = _lora_linear_op(inputs, backend)
    return y.reshape(*x.shape[:-1], n_out)
