"""Masked scaled-dot-product attention: causal, prefix-LM and bidirectional masks, key padding,
additive bias, GQA/MQA, forward and backward, never materialising the N x N matrix in a kernel.

Public API (DESIGN.md): :func:`attention`. The mask rules and numerics are documented in
:mod:`fusedlm.reference.attention`, the ground truth.

Backends: ``reference`` (plain PyTorch), ``cpu`` (``csrc/cpu/attention.cpp``: float32 and bfloat16)
and ``triton`` (``kernels/attention.py``). Each returns the output and the per-row log-sum-exp
(float32, -inf for rows that see no key); the backward recomputes the probabilities from it.

Inputs: :func:`attention` checks its arguments and gathers them in one record,
:class:`AttentionInputs`, which the custom op's schema mirrors field for field (``ops/_records.py``);
the fake, ``setup_context``, the backward and every backend take it. The cpu backend passes its
fields by name to the C++ args struct (``csrc/common/args.h``: ``AttentionArgs``), the reference
backend to :func:`fusedlm.reference.attention.attention_lse` (same names).

Dropout on the probabilities (``dropout_p > 0``, training): the wrapper draws one seed per call
(:func:`fusedlm.ops._checks.dropout_seed`) and passes it to the op as a tensor; forward and backward
regenerate the same keep mask from it with
the counter-based recipe of :func:`fusedlm.reference.attention.dropout_keep`, so nothing of size
``Nq x Nk`` is saved. The reference and cpu backends implement it (the cpu kernel draws the same
Philox words, so the same keep decisions, tile by tile in both passes); triton reports dropout as
unsupported (a fallback to the reference with a warning, or an error when forced).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..reference import attention as ref
from . import _checks
from ._backends import Dispatcher, cpu_module
from ._records import record_op, save_for_backward, saved

MAX_HEAD_DIM = 256
_ATTENTION_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


class AttentionInputs(NamedTuple):
    """The inputs of ``fusedlm::attention``, as :func:`attention` checked them (its schema: these
    fields, then the backend). The reference's ``attention_lse`` and the cpu kernel's
    ``AttentionArgs`` (csrc/common/args.h) take them by these names."""

    q: torch.Tensor  # [B, Hq, Nq, D]
    k: torch.Tensor  # [B, Hkv, Nk, D]
    v: torch.Tensor  # [B, Hkv, Nk, D]
    mask_mode: int  # the public `mask` as reference.attention.MASK_MODES codes it: CAUSAL, PREFIX, BIDIRECTIONAL
    prefix_len: torch.Tensor | None  # int64 [B] (prefix mode only)
    key_padding_mask: torch.Tensor | None  # bool [B, Nk], True = a real token
    bias: torch.Tensor | None  # broadcastable to [B, Hq, Nq, Nk]
    scale: float
    dropout_p: float
    seed: torch.Tensor | None  # int64 scalar from _checks.dropout_seed; None when dropout_p == 0


class AttentionGradInputs(NamedTuple):
    """What ``fusedlm::attention_backward`` takes after the forward's :class:`AttentionInputs`."""

    grad_out: torch.Tensor  # [B, Hq, Nq, D]
    out: torch.Tensor  # the forward's output
    lse: torch.Tensor  # [B, Hq, Nq], the forward's log-sum-exp
    bias_grad: bool  # whether to return dbias (in _bias_grad_shape(bias))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_supports(dtype: torch.dtype, **facts) -> str | None:
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the cpu kernel supports float32 and bfloat16, got {dtype}"
    return None


def _triton_supports(dtype: torch.dtype, dropout: bool = False, **facts) -> str | None:
    if dtype not in _checks.FLOAT_DTYPES:
        return f"the triton kernel does not support {dtype}"
    return "the triton kernel does not implement dropout_p > 0 yet" if dropout else None


def _no_dropout(backend: str, dropout_p: float) -> None:
    """The kernels' guard until they implement the mask (choose() never picks them for dropout)."""
    if dropout_p > 0:
        raise NotImplementedError(f"the {backend} attention kernel does not implement dropout_p > 0 yet")


_forward = Dispatcher("attention")
_backward = Dispatcher("attention")


def _expanded_bias(a: AttentionInputs) -> torch.Tensor | None:
    """bias as a float32 view broadcast to [B, Hq, Nq, Nk] (zero strides where it broadcasts)."""
    if a.bias is None:
        return None
    b, hq, nq, _ = a.q.shape
    return a.bias.to(torch.float32).expand(b, hq, nq, a.k.shape[2])


def _bias_grad_shape(bias: torch.Tensor) -> list[int]:
    """The shape of the bias gradient the backward op returns: bias's shape as four dims, with 1
    along every dim the bias is broadcast along (size 1, or stride 0 as in an expanded view)."""
    pad = 4 - bias.dim()
    return [1] * pad + [n if n > 1 and st != 0 else 1 for n, st in zip(bias.shape, bias.stride())]


def _reduce_bias_grad(dbias: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sums a full [B, Hq, Nq, Nk] gradient over the dims bias is broadcast along (reference, cpu)."""
    shape = _bias_grad_shape(bias)
    dims = [i for i in range(4) if shape[i] == 1 and dbias.shape[i] != 1]
    return dbias.sum(dim=dims, keepdim=True) if dims else dbias


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of D contiguous elements; any other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _reference_inputs(a: AttentionInputs) -> dict:
    """The record as keyword arguments of the reference functions (the seed as an int)."""
    return a._replace(seed=_checks.seed_value(a.seed))._asdict()


# ---------------------------------------------------------------------------------------------
# Forward backends: AttentionInputs -> (out, lse)
# ---------------------------------------------------------------------------------------------
@_forward.register("reference")
def _forward_reference(a: AttentionInputs):
    out, lse = ref.attention_lse(**_reference_inputs(a))
    return out.contiguous(), lse.to(_lse_dtype(a.q.dtype)).contiguous()


def _cpu_attention(entry: str, a: AttentionInputs, **buffers) -> None:
    """Runs csrc/cpu/attention.cpp `entry`: the record's fields by name, laid out as the kernel
    reads them (csrc/common/args.h: AttentionArgs), and the output buffers."""
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    a = a._replace(q=_unit_last_stride(a.q), k=_unit_last_stride(a.k), v=_unit_last_stride(a.v),
                   prefix_len=contiguous(a.prefix_len), key_padding_mask=contiguous(a.key_padding_mask),
                   bias=_expanded_bias(a), seed=_checks.seed_value(a.seed))
    _checks.launch(entry, "AttentionArgs", a.q.device, **a._asdict(), **buffers)


@_forward.register("cpu", supports=_cpu_supports)
def _forward_cpu(a: AttentionInputs):
    b, hq, nq, _ = a.q.shape
    out = torch.empty_like(a.q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, nq), dtype=torch.float32)
    _cpu_attention("attention_forward", a, out=out, lse=lse)
    return out, lse


@_forward.register("triton", supports=_triton_supports)
def _forward_triton(a: AttentionInputs):
    from ..kernels import attention as kernels

    _no_dropout("triton", a.dropout_p)
    return kernels.forward(a.q, a.k, a.v, a.mask_mode, a.prefix_len, a.key_padding_mask, _expanded_bias(a), a.scale)


@record_op("fusedlm::attention", AttentionInputs)
def _attention_op(a: AttentionInputs, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(backend, a)


@_attention_op.register_fake
def _(a: AttentionInputs, backend: str):
    return torch.empty_like(a.q, memory_format=torch.contiguous_format), a.q.new_empty(a.q.shape[:3], dtype=_lse_dtype(a.q.dtype))


# ---------------------------------------------------------------------------------------------
# Backward backends: (AttentionInputs, AttentionGradInputs) -> (dq, dk, dv, dbias in _bias_grad_shape(bias), or an
# empty tensor when not wanted)
# ---------------------------------------------------------------------------------------------
@_backward.register("reference")
def _backward_reference(a: AttentionInputs, g: AttentionGradInputs):
    dq, dk, dv, ds = ref.attention_backward(g.grad_out, out=g.out, lse=g.lse, **_reference_inputs(a))
    return dq, dk, dv, _reduce_bias_grad(ds, a.bias) if g.bias_grad else a.q.new_empty(0)


# The CPU backward runs one task per (batch, key/value head, split of the key range); each split
# accumulates dq in its own float32 buffer (summed afterwards). Splits are only added when there
# are fewer (batch, head) pairs than about twice the thread count.
def _cpu_splits(b: int, hkv: int, nk: int, threads: int, key_tile: int = 128) -> int:
    tiles = -(-nk // key_tile)
    return max(1, min(tiles, -(-2 * threads // (b * hkv))))


@_backward.register("cpu", supports=_cpu_supports)
def _backward_cpu(a: AttentionInputs, g: AttentionGradInputs):
    b, hq, nq, d = a.q.shape
    hkv, nk = a.k.shape[1], a.k.shape[2]
    splits = _cpu_splits(b, hkv, nk, _checks.num_threads())
    dq = torch.zeros((splits, b, hq, nq, -(-d // 16) * 16), dtype=torch.float32)
    dk = torch.empty((b, hkv, nk, d), dtype=torch.float32)
    dv = torch.empty((b, hkv, nk, d), dtype=torch.float32)
    dbias = torch.zeros((b, hq, nq, nk), dtype=torch.float32) if g.bias_grad else None
    _cpu_attention("attention_backward", a, grad_out=g.grad_out.contiguous(), out=g.out.contiguous(),
                   lse=g.lse.contiguous(), dq=dq, dk=dk, dv=dv, dbias=dbias)
    dq = dq.sum(0) if splits > 1 else dq[0]
    return (dq[..., :d].to(a.q.dtype), dk.to(a.k.dtype), dv.to(a.v.dtype),
            _reduce_bias_grad(dbias, a.bias) if g.bias_grad else a.q.new_empty(0))


@_backward.register("triton", supports=_triton_supports)
def _backward_triton(a: AttentionInputs, g: AttentionGradInputs):
    from ..kernels import attention as kernels

    _no_dropout("triton", a.dropout_p)
    # The kernel computes the bias gradient only when it is wanted, already summed over the dims
    # the bias is broadcast along (ALiBi's [1, H, 1, Nk] never costs a [B, H, Nq, Nk] buffer).
    dq, dk, dv, dbias = kernels.backward(
        g.grad_out.contiguous(), a.q, a.k, a.v, g.out, g.lse, a.mask_mode, a.prefix_len, a.key_padding_mask,
        _expanded_bias(a), a.scale, bias_grad_shape=_bias_grad_shape(a.bias) if g.bias_grad else None,
    )
    return dq, dk, dv, dbias if g.bias_grad else a.q.new_empty(0)


@record_op("fusedlm::attention_backward", AttentionInputs, AttentionGradInputs)
def _attention_backward_op(
    a: AttentionInputs, g: AttentionGradInputs, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.contiguous() for t in _backward(backend, a, g))


@_attention_backward_op.register_fake
def _(a: AttentionInputs, g: AttentionGradInputs, backend: str):
    dbias = a.q.new_empty(_bias_grad_shape(a.bias), dtype=_lse_dtype(a.q.dtype)) if g.bias_grad else a.q.new_empty(0)
    c = torch.contiguous_format
    return (torch.empty_like(a.q, memory_format=c), torch.empty_like(a.k, memory_format=c),
            torch.empty_like(a.v, memory_format=c), dbias)


def _setup_context(ctx, a: AttentionInputs, backend: str, output):
    save_for_backward(ctx, a, *output)  # output: out, lse
    ctx.backend = backend


def _attention_backward(ctx, grad_out, grad_lse):
    # lse is an internal output (the public op returns only `out`): its gradient is ignored.
    a, out, lse = saved(ctx)
    bias_grad = a.bias is not None and _attention_op.needs_grad(ctx, "bias")
    dq, dk, dv, dbias = _attention_backward_op(a, AttentionGradInputs(grad_out, out, lse, bias_grad), ctx.backend)
    grad_bias = None
    if bias_grad:  # [B|1, Hq|1, Nq|1, Nk|1] -> bias's shape (an expanded bias gets an expanded gradient)
        grad_bias = dbias.to(a.bias.dtype).expand((1,) * (4 - a.bias.dim()) + tuple(a.bias.shape)).reshape(a.bias.shape)
    return _attention_op.grads(q=dq, k=dk, v=dv, bias=grad_bias)


_attention_op.register_autograd(_attention_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _check_prefix_len(prefix_len, mask: str, b: int, nk: int, device: torch.device) -> torch.Tensor | None:
    """prefix_len (int or integer tensor [B]) checked and normalised to int64 [B], or None."""
    if mask != "prefix":
        if prefix_len is not None:
            raise ValueError(f"prefix_len is only used with mask='prefix', got mask={mask!r}")
        return None
    if prefix_len is None:
        raise ValueError("mask='prefix' needs prefix_len (an int or a LongTensor [B])")
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"prefix_len must be an integer tensor, got dtype {prefix_len.dtype}")
        if prefix_len.dim() == 0:
            prefix_len = prefix_len.expand(b)
        _checks.shape("prefix_len", prefix_len, (b,))
        if prefix_len.device != device:
            raise ValueError(f"prefix_len is on {prefix_len.device} but q is on {device}; move them to one device")
        low, high = int(prefix_len.min()), int(prefix_len.max())
        if low < 0 or high > nk:
            raise ValueError(f"prefix_len must be in [0, Nk={nk}], got values in [{low}, {high}]")
        return prefix_len.to(torch.int64).contiguous()
    _checks.integer("prefix_len", prefix_len, low=0, high=nk)
    return torch.full((b,), prefix_len, dtype=torch.int64, device=device)


_FAST_MASKS = {"causal": ref.MASK_MODES["causal"], "bidirectional": ref.MASK_MODES["bidirectional"]}


def _fast_forward(q, k, v, mask: str, key_padding_mask, scale) -> torch.Tensor | None:
    """The inference fast path of :func:`attention` (``_checks.inference_fast_path``: no autograd,
    not traced, CPU tensors): the cpu forward kernel called directly after the checks that the kernel
    needs, for float32 / bfloat16 q, k, v, a causal or bidirectional mask, an optional key padding
    mask, no bias, prefix or dropout -- a decode step's attention over its cache. The same kernel
    and arguments as the op path, so the same bits. None where any condition fails: the op path
    runs (and raises what it raises)."""
    mode = _FAST_MASKS.get(mask)
    dtype = q.dtype
    if mode is None or dtype not in (torch.float32, torch.bfloat16) or k.dtype != dtype or v.dtype != dtype:
        return None
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return None
    b, hq, nq, d = q.shape
    _, hkv, nk, dk = k.shape
    if k.shape[0] != b or dk != d or min(b, hq, nq, d, hkv, nk) < 1 or hq % hkv or d > MAX_HEAD_DIM:
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif type(scale) is not float or not math.isfinite(scale):
        return None
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (b, nk):
            return None
        key_padding_mask = key_padding_mask.contiguous()
    module = cpu_module()
    args = module.AttentionArgs()
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)  # alive until the kernel returns
    args.q, args.k, args.v = _checks.cpu_view(module, q), _checks.cpu_view(module, k), _checks.cpu_view(module, v)
    out = torch.empty((b, hq, nq, d), dtype=dtype)
    lse = torch.empty((b, hq, nq), dtype=torch.float32)
    args.mask_mode, args.scale = mode, scale
    if key_padding_mask is not None:
        args.key_padding_mask = _checks.cpu_view(module, key_padding_mask)
    args.out, args.lse = _checks.cpu_view(module, out), _checks.cpu_view(module, lse)
    args.num_threads = torch.get_num_threads()
    module.attention_forward(args)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: str = "causal",
    prefix_len: int | torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masked scaled-dot-product attention, ``softmax(scale * q k^T + bias + mask) v``.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA: query
            head h reads key/value head ``h // (Hq // Hkv)``, nothing is copied); ``D <= 256``;
            float32, bfloat16 or float16 (float64 on the reference backend), all one dtype and device.
        mask: ``"causal"`` (query i sees key j when ``j <= i + Nk - Nq``, aligned bottom-right),
            ``"prefix"`` (keys ``j < prefix_len`` visible to every query, the rest causal) or
            ``"bidirectional"``.
        prefix_len: for ``mask="prefix"`` only: an int or an integer tensor ``[B]``, each in ``[0, Nk]``.
        key_padding_mask: bool ``[B, Nk]``, True where the key is a real token.
        bias: additive float scores broadcastable to ``[B, Hq, Nq, Nk]`` (T5 relative position
            bias, ALiBi); differentiable.
        scale: multiplies ``q k^T``; defaults to ``1 / sqrt(D)``.
        dropout_p: dropout on the attention probabilities, in [0, 1) (training only: pass 0 in eval,
            as with torch's SDPA). The normalised probabilities are zeroed with probability p and the
            kept ones scaled by ``1 / (1 - p)``, after the softmax. 0 (the default) is the exact
            no-dropout path. The reference and cpu backends implement it (triton falls back).
        generator: the torch.Generator one 62-bit dropout seed is drawn from per call (default: torch's
            CPU generator); the same generator state gives the same mask, output and gradients. Under
            ``torch.compile(fullgraph=True)`` pass None: dynamo cannot trace a Generator argument.

    Returns ``[B, Hq, Nq, D]`` in q's dtype. Accumulation is float32 for bfloat16/float16. A query
    row that sees no key (or whose visible scores are all -inf) returns zeros and zero gradients,
    with or without dropout. NaN in, NaN out, the same on every backend: a row whose q, or the k or
    bias of a key it sees, holds a NaN (or whose score is +inf) is NaN in every entry, never zeros;
    a NaN in the v of a key it sees makes the entries it reaches NaN; other rows are unaffected
    (details: :mod:`fusedlm.reference.attention`).
    """
    if (prefix_len is None and bias is None and generator is None and type(dropout_p) in (int, float) and dropout_p == 0
            and type(mask) is str
            and _checks.inference_fast_path(q, k, v, key_padding_mask)):
        out = _fast_forward(q, k, v, mask, key_padding_mask, scale)
        if out is not None:
            return out
    _checks.tensor("q", q, dtypes=_ATTENTION_DTYPES, ndim=4)
    _checks.tensor("k", k, dtypes=_ATTENTION_DTYPES, ndim=4)
    _checks.tensor("v", v, dtypes=_ATTENTION_DTYPES, ndim=4)
    _checks.same_dtype(q=q, k=k, v=v)
    device = _checks.same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask, bias=bias)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if min(b, hq, nq, d, hkv, nk) < 1:
        raise ValueError(f"q and k must have non-empty dimensions, got q {list(q.shape)} and k {list(k.shape)}")
    _checks.shape("k", k, (b, None, None, d))
    _checks.shape("v", v, tuple(k.shape))
    if hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv})")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be <= {MAX_HEAD_DIM}, got {d}")
    if not isinstance(mask, str):
        raise TypeError(f"mask must be a str, got {type(mask).__name__}")
    if mask not in ref.MASK_MODES:
        raise ValueError(f"mask must be one of {tuple(ref.MASK_MODES)}, got {mask!r}")
    prefix = _check_prefix_len(prefix_len, mask, b, nk, device)
    if key_padding_mask is not None:
        _checks.tensor("key_padding_mask", key_padding_mask, dtypes=[torch.bool], ndim=2)
        _checks.shape("key_padding_mask", key_padding_mask, (b, nk))
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=_ATTENTION_DTYPES)
        target = (b, hq, nq, nk)
        if bias.dim() > 4 or any(s not in (1, t) for s, t in zip(reversed(bias.shape), reversed(target))):
            raise ValueError(f"bias must be broadcastable to [B, Hq, Nq, Nk] = {list(target)}, got {list(bias.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    dropout_p = _checks.dropout_p(dropout_p)
    seed = _checks.dropout_seed(dropout_p, _checks.generator(generator))
    inputs = AttentionInputs(q=q, k=k, v=v, mask_mode=ref.MASK_MODES[mask], prefix_len=prefix,
                             key_padding_mask=key_padding_mask, bias=bias, scale=float(scale),
                             dropout_p=dropout_p, seed=seed)
    backend = _forward.choose(device, dtype=q.dtype, head_dim=d, dropout=dropout_p > 0)
    out, _ = _attention_op(inputs, backend)
    return out
