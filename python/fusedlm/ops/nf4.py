"""NF4 (4-bit NormalFloat) quantisation and the NF4 dequant-matmul.

Public API (DESIGN.md): :func:`nf4_quantize`, :func:`nf4_dequantize`, :func:`nf4_matmul` and the
:class:`NF4Weight` they pass around. The packed bytes and absmax are identical to
``bitsandbytes.functional.quantize_4bit(w, blocksize=..., quant_type="nf4")``; the layout and the
rounding rules are documented in :mod:`fusedlm.reference.nf4`, the ground truth.

Backends: quantise/dequantise run on ``reference``, ``cpu`` (``csrc/cpu/nf4.cpp``), ``triton``
(``kernels/nf4.py``) and ``cuda`` (``csrc/cuda/nf4.cu``). Double quantisation of absmax (8-bit,
blocks of 256) is computed by the reference code on every backend: it touches 1/blocksize of the
data.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..reference import nf4 as ref
from . import _checks
from ._backends import Dispatcher, cpu_module, cuda_module


@dataclasses.dataclass
class NF4Weight:
    """A weight quantised to NF4, laid out as bitsandbytes lays it out.

    data: uint8 ``[ceil(numel / 2), 1]``, two 4-bit code indices per byte (element 2j high nibble).
    absmax: float32 ``[n_blocks]`` per-block scales; or, when double-quantised, uint8 codes into
        the 8-bit dynamic map, with ``nested_absmax`` (float32 ``[ceil(n_blocks / 256)]``) and
        ``offset`` (float32 scalar tensor) to undo them.
    blocksize: elements per absmax block (32 ... 4096, a power of two).
    shape: shape of the original weight; dtype: its dtype (what dequantisation returns).
    """

    data: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def float_absmax(self) -> torch.Tensor:
        """Per-block scales as float32, undoing double quantisation if it was applied."""
        if self.nested_absmax is None:
            return self.absmax
        return ref.dequantize_absmax(self.absmax, self.nested_absmax, self.offset)

    def to(self, device) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, data=move(self.data), absmax=move(self.absmax),
            nested_absmax=move(self.nested_absmax), offset=move(self.offset),
        )

    def validate(self, name: str = "qw") -> None:
        """Checks the fields against each other, so no kernel can read past a buffer."""
        if not isinstance(self, NF4Weight):
            raise TypeError(f"{name} must be an NF4Weight, got {type(self).__name__}")
        _checks.integer(f"{name}.blocksize", self.blocksize)
        if self.blocksize not in ref.BLOCKSIZES:
            raise ValueError(f"{name}.blocksize must be one of {ref.BLOCKSIZES}, got {self.blocksize}")
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{name}.dtype must be float32, bfloat16 or float16, got {self.dtype}")
        n = self.numel()
        n_blocks = -(-n // self.blocksize)
        _checks.tensor(f"{name}.data", self.data, dtypes=[torch.uint8])
        if self.data.numel() != (n + 1) // 2:
            raise ValueError(f"{name}.data must hold {(n + 1) // 2} bytes for shape {list(self.shape)}, got {self.data.numel()}")
        if self.nested_absmax is None:
            _checks.tensor(f"{name}.absmax", self.absmax, dtypes=[torch.float32])
        else:
            _checks.tensor(f"{name}.absmax", self.absmax, dtypes=[torch.uint8])
            _checks.tensor(f"{name}.nested_absmax", self.nested_absmax, dtypes=[torch.float32], ndim=1)
            _checks.tensor(f"{name}.offset", self.offset, dtypes=[torch.float32])
            n_nested = -(-n_blocks // ref.NESTED_BLOCKSIZE)
            if self.nested_absmax.numel() != n_nested or self.offset.numel() != 1:
                raise ValueError(
                    f"{name}.nested_absmax must have {n_nested} entries and {name}.offset 1, "
                    f"got {self.nested_absmax.numel()} and {self.offset.numel()}"
                )
        if self.absmax.numel() != n_blocks:
            raise ValueError(f"{name}.absmax must have {n_blocks} entries (one per block of {self.blocksize}), got {self.absmax.numel()}")
        _checks.same_device(**{f"{name}.data": self.data, f"{name}.absmax": self.absmax,
                               f"{name}.nested_absmax": self.nested_absmax, f"{name}.offset": self.offset})


# ---------------------------------------------------------------------------------------------
# Backends: quantise  w -> (data, absmax)
# ---------------------------------------------------------------------------------------------
_quantize = Dispatcher("nf4_quantize")


@_quantize.register("reference")
def _quantize_reference(w: torch.Tensor, blocksize: int):
    return ref.quantize(w, blocksize)


def _empty_packed(w: torch.Tensor, blocksize: int):
    n = w.numel()
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    return data, absmax


@_quantize.register("cpu")
def _quantize_cpu(w: torch.Tensor, blocksize: int):
    w = w.contiguous()
    data, absmax = _empty_packed(w, blocksize)
    cpu_module().nf4_quantize(
        w.data_ptr(), _checks.DTYPE_CODES[w.dtype], w.numel(), blocksize,
        ref.NF4_MIDPOINTS.data_ptr(), data.data_ptr(), absmax.data_ptr(), _checks.num_threads(),
    )
    return data, absmax


@_quantize.register("triton")
def _quantize_triton(w: torch.Tensor, blocksize: int):
    from ..kernels import nf4 as kernels

    data, absmax = _empty_packed(w, blocksize)
    kernels.quantize(w.contiguous().view(-1), blocksize, ref.NF4_MIDPOINTS.to(w.device), data.view(-1), absmax)
    return data, absmax


@_quantize.register("cuda")
def _quantize_cuda(w: torch.Tensor, blocksize: int):
    w = w.contiguous()
    data, absmax = _empty_packed(w, blocksize)
    cuda_module().nf4_quantize(
        w.data_ptr(), _checks.DTYPE_CODES[w.dtype], w.numel(), blocksize,
        ref.NF4_MIDPOINTS.to(w.device).data_ptr(), data.data_ptr(), absmax.data_ptr(),
        torch.cuda.current_stream(w.device).cuda_stream,
    )
    return data, absmax


@torch.library.custom_op("fusedlm::nf4_quantize", mutates_args=())
def _nf4_quantize_op(w: torch.Tensor, blocksize: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize(backend, w, blocksize)


@_nf4_quantize_op.register_fake
def _(w, blocksize, backend):
    n = w.numel()
    return w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), w.new_empty(-(-n // blocksize), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Backends: dequantise  (data, float32 absmax) -> w
# ---------------------------------------------------------------------------------------------
_dequantize = Dispatcher("nf4_dequantize")


@_dequantize.register("reference")
def _dequantize_reference(data, absmax, blocksize, shape, dtype):
    return ref.dequantize(data, absmax, blocksize, shape, dtype)


@_dequantize.register("cpu")
def _dequantize_cpu(data, absmax, blocksize, shape, dtype):
    out = torch.empty(shape, dtype=dtype, device=data.device)
    cpu_module().nf4_dequantize(
        data.data_ptr(), absmax.data_ptr(), out.numel(), blocksize, ref.NF4_CODE.data_ptr(),
        out.data_ptr(), _checks.DTYPE_CODES[dtype], _checks.num_threads(),
    )
    return out


@_dequantize.register("triton")
def _dequantize_triton(data, absmax, blocksize, shape, dtype):
    from ..kernels import nf4 as kernels

    out = torch.empty(shape, dtype=dtype, device=data.device)
    kernels.dequantize(data.view(-1), absmax, blocksize, ref.NF4_CODE.to(data.device), out.view(-1))
    return out


@_dequantize.register("cuda")
def _dequantize_cuda(data, absmax, blocksize, shape, dtype):
    out = torch.empty(shape, dtype=dtype, device=data.device)
    cuda_module().nf4_dequantize(
        data.data_ptr(), absmax.data_ptr(), out.numel(), blocksize, ref.NF4_CODE.to(data.device).data_ptr(),
        out.data_ptr(), _checks.DTYPE_CODES[dtype], torch.cuda.current_stream(data.device).cuda_stream,
    )
    return out


@torch.library.custom_op("fusedlm::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(
    data: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: list[int], dtype: torch.dtype, backend: str
) -> torch.Tensor:
    return _dequantize(backend, data.contiguous(), absmax.contiguous(), blocksize, shape, dtype)


@_nf4_dequantize_op.register_fake
def _(data, absmax, blocksize, shape, dtype, backend):
    return data.new_empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def nf4_quantize(w: torch.Tensor, *, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantises a float tensor to NF4, byte-identical to bitsandbytes' ``quantize_4bit(quant_type="nf4")``.

    Args:
        w: float32, bfloat16 or float16 tensor of any shape; must be finite.
        blocksize: elements per absmax block, one of 32, 64, ..., 4096. The last block may be
            shorter when ``w.numel()`` is not a multiple (as in bitsandbytes).
        double_quant: also quantise the per-block absmax to 8 bits (QLoRA's double quantisation,
            bitsandbytes' ``compress_statistics=True``).

    Edge cases: an all-zero block has absmax 0 and dequantises to zeros; an odd element count pads
    the last byte's low nibble with the code of 0.0.
    """
    _checks.tensor("w", w, dtypes=_checks.FLOAT_DTYPES)
    _checks.integer("blocksize", blocksize)
    if blocksize not in ref.BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ref.BLOCKSIZES}, got {blocksize}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if w.numel() == 0:
        raise ValueError(f"w must have at least one element, got shape {list(w.shape)}")
    _checks.finite("w", w)
    backend = _quantize.choose(w.device, dtype=w.dtype)
    data, absmax = _nf4_quantize_op(w.detach(), blocksize, backend)
    qw = NF4Weight(data=data, absmax=absmax, blocksize=blocksize, shape=w.shape, dtype=w.dtype)
    if double_quant:
        qw.absmax, qw.nested_absmax, qw.offset = ref.quantize_absmax(absmax)
    return qw


def nf4_dequantize(qw: NF4Weight) -> torch.Tensor:
    """The float tensor an :class:`NF4Weight` stands for (``qw.shape``, ``qw.dtype``)."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"qw must be an NF4Weight, got {type(qw).__name__}")
    qw.validate("qw")
    backend = _dequantize.choose(qw.device, dtype=qw.dtype)
    return _nf4_dequantize_op(qw.data, qw.float_absmax(), qw.blocksize, list(qw.shape), qw.dtype, backend)


def nf4_matmul(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(qw).T + bias`` for a 2-D NF4 weight ``[N, K]``; x is ``[..., K]``.

    Accumulates in float32 and returns x.dtype. The reference path dequantises; the fused
    kernels (NF4 issue) never materialise the float weight.
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"qw must be an NF4Weight, got {type(qw).__name__}")
    qw.validate("qw")
    if len(qw.shape) != 2:
        raise ValueError(f"qw must be a 2-D weight [N, K], got shape {list(qw.shape)}")
    n_out, k = qw.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have last dimension K={k} (qw.shape={list(qw.shape)}), got shape {list(x.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=_checks.FLOAT_DTYPES)
        _checks.shape("bias", bias, (n_out,))
    _checks.same_device(x=x, **{"qw.data": qw.data}, bias=bias)
    backend = _matmul.choose(x.device, dtype=x.dtype)
    return _nf4_matmul_op(x, qw.data, qw.float_absmax(), qw.blocksize, list(qw.shape), bias, backend)


_matmul = Dispatcher("nf4_matmul")


@_matmul.register("reference")
def _matmul_reference(x, data, absmax, blocksize, shape, bias):
    return ref.matmul(x, data, absmax, blocksize, shape, bias)


@torch.library.custom_op("fusedlm::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: list[int],
    bias: torch.Tensor | None, backend: str,
) -> torch.Tensor:
    return _matmul(backend, x, data, absmax, blocksize, shape, bias)


@_nf4_matmul_op.register_fake
def _(x, data, absmax, blocksize, shape, bias, backend):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _matmul_setup_context(ctx, inputs, output):
    x, data, absmax, blocksize, shape, bias, backend = inputs
    ctx.save_for_backward(data, absmax)
    ctx.meta = (blocksize, shape, x.dtype, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _matmul_backward(ctx, grad_out):
    # The 4-bit weight is frozen: gradients flow to x (QLoRA) and to the bias.
    data, absmax = ctx.saved_tensors
    blocksize, shape, x_dtype, backend = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = ref.dequantize(data, absmax, blocksize, shape, torch.float32)
        grad_x = (grad_out.float() @ w).to(x_dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad_out.float().reshape(-1, shape[0]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None


_nf4_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)
