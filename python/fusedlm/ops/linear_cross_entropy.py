"""Fused linear cross-entropy: an LM head and its token loss without the ``[tokens, vocab]`` logits.

Public API (DESIGN.md): :func:`linear_cross_entropy`. The math and its edges are
:mod:`fusedlm.reference.linear_cross_entropy`'s, the ground truth.

How (Liger-Kernel's and Cut Cross-Entropy's idea, on torch's GEMMs):

1. the wrapper keeps only the rows that have a target (SFT prompts and padding, label -100, cost
   no head GEMM);
2. the kept rows go through the head in chunks of :func:`chunk_rows` rows: one GEMM gives the
   chunk's logits ``h_c Wᵀ (+ b)`` into one reused buffer, then the backend's row pass (``cpu``:
   ``csrc/cpu/linear_cross_entropy.cpp``; ``triton``: ``kernels/linear_cross_entropy.py``;
   ``reference``: torch ops) computes each row's loss, logsumexp and argmax and writes the row's
   gradient ``s_m (softmax - onehot)`` over its logits;
3. while the chunk is still in cache, the gradient GEMMs run in the forward: ``dh_c = G_c W``
   and ``dW += G_cᵀ h_c`` (``db += Σ G_c``) for the inputs that need one.

So the loss's memory is one chunk of logits plus the gradients the backward returns anyway, and
the backward of a scalar loss (``reduction="mean"`` / ``"sum"``) is a multiplication by the
incoming gradient. With ``reduction="none"`` (per-token losses: DPO's and PPO's log-probs) the
per-row gradients depend on the incoming one: when only h needs a gradient, its rows
``d loss_m / d h_m`` are still computed in the forward (the backward scales each by its row's
incoming gradient); when the weight or bias needs one too, the backward runs the chunks again
(one more logits GEMM per chunk) with each row's gradient as its scale.

Dtypes: h and the weight share one dtype (float32, bfloat16 or float16), the logits chunk and its
gradient have it, the row math is float32, losses are float32. Under ``torch.autocast`` h, weight
and bias are cast to the autocast dtype first, as ``F.linear`` would be. The weight gradient is
accumulated over the chunks in float32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..reference import linear_cross_entropy as ref
from . import _checks
from ._backends import Dispatcher
from ._records import record_op, save_for_backward, saved

REDUCTIONS = ref.REDUCTIONS
# The logits buffer of one chunk is at most this many bytes (and at least one row).
CHUNK_BYTES = 64 << 20


class LinearCrossEntropyInputs(NamedTuple):
    """The inputs of ``fusedlm::linear_cross_entropy`` (its schema: these fields, then the backend)."""

    h: torch.Tensor  # [M, d]
    weight: torch.Tensor  # [V, d], h's dtype
    bias: torch.Tensor | None  # [V], h's dtype
    targets: torch.Tensor  # int64 [M], in [0, V) or ignore_index
    ignore_index: int
    scale: float  # each row's loss enters the scalar total times this (1 / n for a mean, 1 for a sum)
    per_row: bool  # reduction "none": the output is the [M] row losses
    grad_h: bool  # which gradients the forward prepares (autograd wants them)
    grad_weight: bool
    grad_bias: bool
    chunk_rows: int


def chunk_rows(n_vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: as many as fit :data:`CHUNK_BYTES` of logits (at least 1)."""
    return max(1, CHUNK_BYTES // (n_vocab * torch.empty((), dtype=dtype).element_size()))


# ---------------------------------------------------------------------------------------------
# Backends of the row pass: (logits [C, V], targets [C], ignore_index, scales [C] | None)
#   -> (loss [C], lse [C], argmax [C]); with scales, logits <- scales (softmax - onehot).
# ---------------------------------------------------------------------------------------------
_rows = Dispatcher("linear_cross_entropy")
# float64 runs on the reference backend only (for gradcheck).
_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _kernel_supports(dtype: torch.dtype, **facts) -> str | None:
    return None if dtype in _checks.FLOAT_DTYPES else f"the kernel does not support {dtype}"


@_rows.register("reference")
def _rows_reference(logits, targets, ignore_index, scales):
    x = logits.to(_acc(logits.dtype))
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.where(keep, lse - x.gather(1, safe[:, None]).squeeze(1), torch.zeros_like(lse))
    argmax = torch.where(keep, x.argmax(-1), torch.full_like(targets, -1))
    if scales is not None:
        grad = torch.exp(x - lse[:, None])
        grad[torch.arange(x.shape[0], device=x.device), safe] -= 1.0
        logits.copy_(grad * torch.where(keep, scales.to(x.dtype), torch.zeros_like(x[:, 0]))[:, None])
    return loss, torch.where(keep, lse, torch.zeros_like(lse)), argmax


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the row math and of the losses: float32 (float64 for float64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def _outputs(logits):
    c = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    return torch.empty(c, **f32), torch.empty(c, **f32), torch.empty(c, dtype=torch.long, device=logits.device)


@_rows.register("cpu", supports=_kernel_supports)
def _rows_cpu(logits, targets, ignore_index, scales):
    loss, lse, argmax = _outputs(logits)
    _checks.launch("linear_cross_entropy_rows", "LinearCrossEntropyArgs", logits.device, logits=logits, targets=targets,
                   ignore_index=ignore_index, scales=scales, loss=loss, lse=lse, argmax=argmax)
    return loss, lse, argmax


@_rows.register("triton", supports=_kernel_supports)
def _rows_triton(logits, targets, ignore_index, scales):
    from ..kernels import linear_cross_entropy as kernels

    loss, lse, argmax = _outputs(logits)
    kernels.rows(logits, targets, ignore_index, scales, loss, lse, argmax)
    return loss, lse, argmax


# ---------------------------------------------------------------------------------------------
# the chunk loop, shared by the backends
# ---------------------------------------------------------------------------------------------
def _chunks(a: LinearCrossEntropyInputs, backend: str, row_scales: torch.Tensor | None, want_h: bool, want_weight: bool,
            want_bias: bool):
    """Runs the chunks: per-row (loss, lse, argmax) [M] and, for the wanted inputs, the gradients
    of ``Σ_m row_scales[m] loss_m`` (dh in h's dtype, dW and db in float32), or None."""
    with torch.autocast(a.h.device.type, enabled=False):  # the wrapper cast the operands already
        return _run_chunks(a, backend, row_scales, want_h, want_weight, want_bias)


def _run_chunks(a, backend, row_scales, want_h, want_weight, want_bias):
    h, weight, bias = a.h, a.weight, a.bias
    m, n_vocab = h.shape[0], weight.shape[0]
    acc = dict(dtype=_acc(h.dtype), device=h.device)
    loss, lse, argmax = torch.empty(m, **acc), torch.empty(m, **acc), torch.empty(m, dtype=torch.long, device=h.device)
    dh = torch.empty_like(h) if want_h else None
    dw = torch.zeros(weight.shape, **acc) if want_weight else None
    db = torch.zeros(n_vocab, **acc) if want_bias else None
    rows = min(m, a.chunk_rows)
    buffer = torch.empty((rows, n_vocab), dtype=h.dtype, device=h.device)
    w_t = weight.T
    for c0 in range(0, m, rows):
        c1 = min(m, c0 + rows)
        hc, logits = h[c0:c1], buffer[: c1 - c0]
        if bias is None:
            torch.mm(hc, w_t, out=logits)
        else:
            torch.addmm(bias, hc, w_t, out=logits)
        scales = None if row_scales is None else row_scales[c0:c1]
        loss[c0:c1], lse[c0:c1], argmax[c0:c1] = _rows(backend, logits, a.targets[c0:c1], a.ignore_index, scales)
        if dh is not None:
            torch.mm(logits, weight, out=dh[c0:c1])
        if dw is not None:
            if logits.dtype == dw.dtype:
                dw.addmm_(logits.T, hc)
            else:  # float32 accumulation across the chunks
                dw.addmm_(logits.T.to(dw.dtype), hc.to(dw.dtype))
        if db is not None:
            db += logits.sum(0, dtype=db.dtype)
    return loss, lse, argmax, dh, dw, db


def _or_empty(grad: torch.Tensor | None, like: torch.Tensor, dtype_of=None) -> torch.Tensor:
    """`grad` in the dtype of `dtype_of` (a dtype or a tensor), or a fresh empty tensor (outputs of a
    custom op must not alias one another)."""
    if grad is None:
        return like.new_empty(0)
    dtype = dtype_of.dtype if isinstance(dtype_of, torch.Tensor) else dtype_of
    return grad if dtype is None else grad.to(dtype)


def _precomputes(a: LinearCrossEntropyInputs) -> bool:
    """Whether the forward computes the gradients: always for a scalar loss; per-row losses only
    when h alone needs one (its rows' gradients are scaled in the backward)."""
    return not a.per_row or not (a.grad_weight or a.grad_bias)


@record_op("fusedlm::linear_cross_entropy", LinearCrossEntropyInputs)
def _linear_cross_entropy_op(a: LinearCrossEntropyInputs, backend: str) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss: scalar or [M], argmax [M], dh, dweight, dbias, lse [M]); the gradients prepared in the
    forward (empty when not), of the total (scalar) or unscaled per row (per_row: dh only)."""
    pre = _precomputes(a)
    want = dict(want_h=a.grad_h and pre, want_weight=a.grad_weight and pre, want_bias=a.grad_bias and pre)
    scales = None
    if any(want.values()):
        scales = torch.full((a.h.shape[0],), 1.0 if a.per_row else a.scale, dtype=_acc(a.h.dtype), device=a.h.device)
    loss, lse, argmax, dh, dw, db = _chunks(a, backend, scales, **want)
    total = loss if a.per_row else (loss.sum() * a.scale)
    return (total, argmax, _or_empty(dh, a.h), _or_empty(dw, a.h, a.weight.dtype), _or_empty(db, a.h, a.bias), lse)


@_linear_cross_entropy_op.register_fake
def _(a: LinearCrossEntropyInputs, backend: str):
    m = a.h.shape[0]
    pre = _precomputes(a)
    f32 = dict(dtype=_acc(a.h.dtype))
    return (a.h.new_empty((m,) if a.per_row else (), **f32), a.h.new_empty(m, dtype=torch.long),
            a.h.new_empty(a.h.shape) if a.grad_h and pre else a.h.new_empty(0),
            a.h.new_empty(a.weight.shape) if a.grad_weight and pre else a.h.new_empty(0),
            a.h.new_empty(a.weight.shape[:1]) if a.grad_bias and pre else a.h.new_empty(0),
            a.h.new_empty(m, **f32))


def _setup_context(ctx, a: LinearCrossEntropyInputs, backend: str, output):
    _, _, dh, dw, db, _ = output
    # the inputs (a second pass needs them; they are alive anyway) and the gradients prepared in the forward
    save_for_backward(ctx, a, dh, dw, db)
    ctx.backend = backend
    ctx.mark_non_differentiable(*output[1:])  # argmax, and the prepared gradients / lse the backward reads


def _backward(ctx, grad_loss, *_unused):
    a, dh, dw, db = saved(ctx)
    g = grad_loss.to(_acc(grad_loss.dtype))
    grads, missing = {}, set()
    pre = _precomputes(a)
    for name, flag, prepared in (("h", a.grad_h, dh), ("weight", a.grad_weight, dw), ("bias", a.grad_bias, db)):
        if not _linear_cross_entropy_op.needs_grad(ctx, name):
            continue
        if pre and flag:  # prepared in the forward: scale by the incoming gradient
            grads[name] = (prepared * (g[:, None] if a.per_row and name == "h" else g)).to(prepared.dtype)
        else:
            missing.add(name)
    if missing:  # a second pass with each row's incoming gradient as its scale
        rows = g if a.per_row else (g * a.scale).expand(a.h.shape[0])
        again = a._replace(grad_h="h" in missing, grad_weight="weight" in missing, grad_bias="bias" in missing)
        got = _backward_op(again, _Grads(rows.contiguous()), ctx.backend)
        grads.update({name: t for name, t in zip(("h", "weight", "bias"), got) if name in missing})
    return _linear_cross_entropy_op.grads(**grads)


class _Grads(NamedTuple):
    """The incoming per-row gradients of a second pass (reduction "none" with weight / bias grads)."""

    grad_rows: torch.Tensor  # float32 [M] (float64 for float64 inputs)


@record_op("fusedlm::linear_cross_entropy_backward", LinearCrossEntropyInputs, _Grads)
def _backward_op(a: LinearCrossEntropyInputs, g: _Grads, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second pass: (dh, dweight, dbias) of ``Σ_m grad_rows[m] loss_m`` (empty where not wanted)."""
    _, _, _, dh, dw, db = _chunks(a, backend, g.grad_rows, a.grad_h, a.grad_weight, a.grad_bias)
    return _or_empty(dh, a.h), _or_empty(dw, a.h, a.weight.dtype), _or_empty(db, a.h, a.bias)


@_backward_op.register_fake
def _(a: LinearCrossEntropyInputs, g: _Grads, backend: str):
    return (a.h.new_empty(a.h.shape) if a.grad_h else a.h.new_empty(0),
            a.h.new_empty(a.weight.shape) if a.grad_weight else a.h.new_empty(0),
            a.h.new_empty(a.weight.shape[:1]) if a.grad_bias else a.h.new_empty(0))


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: torch.Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean", return_argmax: bool = False,
                         chunk_size: int | None = None):
    """Cross-entropy of ``h Wᵀ + b`` against `targets`, without materialising the logits.

    Args:
        h: ``[..., d]`` hidden states (float32, bfloat16 or float16; float64: reference backend only).
        weight: ``[V, d]`` the LM head (or the tied embedding), h's dtype.
        targets: int64 ``[...]`` (h's leading shape), each in ``[0, V)`` or `ignore_index`.
        bias: ``[V]`` or None.
        ignore_index: the target value that takes no loss (and costs no head GEMM).
        reduction: ``"mean"`` over the rows with a target (0 when there is none), ``"sum"``, or
            ``"none"``: float32 ``[...]``, 0 on ignored rows.
        return_argmax: also return each row's argmax (int64 ``[...]``, -1 on ignored rows).
        chunk_size: rows per chunk (default: :func:`chunk_rows`, 64 MiB of logits).

    Returns the float32 loss (and the argmax). Differentiable in h, weight and bias; the peak memory
    of the loss is one chunk of logits. Edge cases: no target in the batch gives 0 (mean and sum);
    a row with NaN or +inf logits gets a NaN loss.
    """
    _checks.tensor("h", h, dtypes=_DTYPES)
    if h.dim() == 0:
        raise ValueError("h must have at least 1 dimension [..., d], got a 0-d tensor")
    _checks.tensor("weight", weight, dtypes=_DTYPES, ndim=2)
    d = h.shape[-1]
    n_vocab = weight.shape[0]
    if weight.shape[1] != d or n_vocab == 0:
        raise ValueError(f"weight must have shape [V >= 1, d={d}] (h has shape {list(h.shape)}), got {list(weight.shape)}")
    _checks.tensor("targets", targets, dtypes=[torch.int64])
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"targets must have shape {list(h.shape[:-1])} (h's leading dimensions), got {list(targets.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=_DTYPES)
        _checks.shape("bias", bias, (n_vocab,))
    ignore_index = _checks.integer("ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(return_argmax, bool):
        raise TypeError(f"return_argmax must be a bool, got {type(return_argmax).__name__}")
    if chunk_size is not None:
        chunk_size = _checks.integer("chunk_size", chunk_size, low=1)
    _checks.same_device(h=h, weight=weight, targets=targets, bias=bias)
    device = h.device
    if device.type in ("cpu", "cuda") and h.dtype != torch.float64 and torch.is_autocast_enabled(device.type):  # as F.linear
        dtype = torch.get_autocast_dtype(device.type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    _checks.same_dtype(h=h, weight=weight, bias=bias)

    lead = targets.shape
    h2, t2 = h.reshape(-1, d), targets.reshape(-1)
    keep = t2 != ignore_index
    if t2.numel() and bool(((t2 < 0) | (t2 >= n_vocab))[keep].any()):
        bad = t2[keep & ((t2 < 0) | (t2 >= n_vocab))][0].item()
        raise ValueError(f"targets must lie in [0, {n_vocab}) or equal ignore_index={ignore_index}, got {bad}")
    kept = keep.nonzero().squeeze(1)
    all_kept = kept.numel() == t2.numel()
    hk, tk = (h2, t2) if all_kept else (h2.index_select(0, kept), t2.index_select(0, kept))  # the head skips the rest
    n = hk.shape[0]
    grad = torch.is_grad_enabled()
    inputs = LinearCrossEntropyInputs(
        h=hk if hk.stride(-1) == 1 else hk.contiguous(), weight=weight, bias=bias, targets=tk, ignore_index=ignore_index,
        scale=1.0 / max(n, 1) if reduction == "mean" else 1.0, per_row=reduction == "none",
        grad_h=grad and h.requires_grad, grad_weight=grad and weight.requires_grad,
        grad_bias=grad and bias is not None and bias.requires_grad,
        chunk_rows=chunk_size or chunk_rows(n_vocab, h.dtype))
    backend = _rows.choose(device, dtype=h.dtype)
    if n == 0:  # nothing to learn: a zero that keeps the graph (DDP's reducer expects every parameter)
        loss = (hk.sum() * 0.0).float() + (weight.sum() * 0.0).float()
        argmax = torch.full(lead, -1, dtype=torch.long, device=device)
        if reduction == "none":
            loss = torch.zeros(lead, dtype=torch.float32, device=device) + loss
        return (loss, argmax) if return_argmax else loss
    loss, argmax_k, *_ = _linear_cross_entropy_op(inputs, backend)
    argmax = argmax_k
    if not all_kept:
        argmax = torch.full((t2.numel(),), -1, dtype=torch.long, device=device).index_copy(0, kept, argmax_k)
        if reduction == "none":
            loss = loss.new_zeros(t2.numel()).index_copy(0, kept, loss)
    if reduction == "none":
        loss = loss.view(lead)
    argmax = argmax.view(lead)
    return (loss, argmax) if return_argmax else loss
