"""NF4 (4-bit NormalFloat) quantisation and the NF4 dequant-matmul.

Public API (DESIGN.md): :func:`nf4_quantize`, :func:`nf4_dequantize`, :func:`nf4_matmul` and the
:class:`NF4Weight` they pass around. The packed bytes and absmax are identical to
``bitsandbytes.functional.quantize_4bit(w, blocksize=..., quant_type="nf4")``; the layout and the
rounding rules are documented in :mod:`fusedlm.reference.nf4`, the ground truth.

Backends: quantise/dequantise run on ``reference``, ``cpu`` (``csrc/cpu/nf4.cpp``), ``triton``
(``kernels/nf4.py``) and ``cuda`` (``csrc/cuda/nf4.cu``). Double quantisation of absmax (8-bit,
blocks of 256) is computed by the reference code on every backend: it touches 1/blocksize of the
data; the matmuls receive the absmax it stands for (float32, undone once per call).

``nf4_matmul`` backends:

* ``cpu``: a fused kernel over the weight's tiles (:meth:`NF4Weight.cpu_tiles`: rows interleaved
  16 at a time with their absmax, made once and cached), so that each thread streams one
  contiguous run of memory and every 64-byte load feeds 16 rows: a 16-entry ``vpermps`` lookup per
  nibble position (two 8-entry ones + blend on AVX2) and FMAs with x broadcast, or, with bf16 dot
  products (below), ``vpermw`` + ``vdpbf16ps`` on 16-row x 2-element pairs; each decoded vector
  serves up to 6 rows of x, so for many rows (prefill) it is a GEMM. Weights with
  ``K % blocksize != 0`` are read from the flat bytes, up to :data:`CPU_GEMV_MAX_ROWS` rows. Where
  the fused kernel does not run (see :data:`CPU_FUSED_MAX_ROWS_AVX2`), a tiled path decodes
  :data:`CPU_TILE_BYTES` of W at a time (bf16 for bf16 x on avx512_bf16, else float32) and
  multiplies each tile with torch's GEMM, so the extra memory is one tile, never the whole
  weight. Needs K % 32 == 0; other K fall back to ``reference`` (with a one-time warning) or raise
  when cpu is forced.
* ``triton``: a GEMV for up to 8 rows (split-K when there are few output tiles) and a tiled
  ``tl.dot`` GEMM, both decoding W tile by tile from the flat layout: any K.
* ``cuda``: the decode GEMV (one warp per output feature and row of x, 16-byte loads, float32
  accumulation) up to :data:`CPU_GEMV_MAX_ROWS` rows; above that, dequantise + cuBLAS. Needs
  K % 32 == 0 (else the next backend).

Inputs: each op's arguments are one record (:class:`Nf4QuantizeInputs`, :class:`Nf4DequantizeInputs`,
:class:`Nf4MatmulInputs`) mirrored by its custom op's schema (``ops/_records.py``). The cpu and cuda
backends are one function each: ``fusedlm._C`` and ``fusedlm._cuda`` take the same args struct
(``csrc/common/args.h``: ``Nf4Args``), picked by the tensors' device (``_checks.launch``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import torch

from ..reference import nf4 as ref
from . import _checks
from ._backends import Dispatcher, cpu_module
from ._records import record_op, save_for_backward, saved


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
        """Per-block scales as float32, undoing double quantisation if it was applied (decoded once
        and cached, like :meth:`cpu_tiles`)."""
        if self.nested_absmax is None:
            return self.absmax
        if torch.compiler.is_compiling():
            return ref.dequantize_absmax(self.absmax, self.nested_absmax, self.offset)
        cache = self._cache()
        if "float_absmax" not in cache:
            cache["float_absmax"] = ref.dequantize_absmax(self.absmax, self.nested_absmax, self.offset)
        return cache["float_absmax"]

    def cpu_tiles(self) -> torch.Tensor | None:
        """The weight laid out as the CPU GEMV streams it: rows interleaved in tiles of 16 with their
        absmax (``csrc/common/args.h``: ``Nf4Args``), made from the bitsandbytes bytes on first use
        and cached on this object (made again if ``data`` or ``absmax`` change, in place or
        replaced). None off the CPU, for a weight that is not 2-D, when ``K % blocksize != 0`` (the
        GEMV then reads the flat bytes) and while ``torch.compile`` traces. The cache holds one more
        copy of the packed weight in memory; what is saved and loaded stays the bitsandbytes bytes.
        """
        if self.data.device.type != "cpu" or len(self.shape) != 2 or self.shape[1] % self.blocksize:
            return None
        if torch.compiler.is_compiling():
            return None
        cache = self._cache()
        if "tiles" not in cache:
            n, k = self.shape
            tiles = torch.empty((-(-n // 16), k // self.blocksize, self.blocksize * 8 + 64), dtype=torch.uint8)
            _checks.launch("nf4_repack", "Nf4Args", tiles.device, data=self.data.contiguous().view(-1),
                           absmax=self.float_absmax().contiguous(), blocksize=self.blocksize, tiles=tiles)
            cache["tiles"] = tiles
        return cache["tiles"]

    def _gemv_views(self) -> dict | None:
        """What the inference fast path of :func:`nf4_matmul` hands the cpu GEMV for this weight:
        its fields checked once (:meth:`validate`) and laid out as fusedlm._C views. Kept while the
        fields are the same objects and values and no tensor was written in place (as :meth:`_cache`
        sees it, more cheaply: a decode step asks 154 times); the views point into the cached tiles
        and absmax, which the entry keeps alive. None where the fast path does not apply (not a valid
        2-D CPU weight with K % 32 == 0): the op path runs."""
        tensors = (self.data, self.absmax, self.nested_absmax, self.offset)
        facts = (self.blocksize, self.shape, self.dtype)
        try:
            versions = tuple(-1 if t is None or t.is_inference() else t._version for t in tensors)
        except AttributeError:  # a field that is not a tensor: validate() says so on the op path
            return None
        entry = self.__dict__.get("_gemv_entry")
        if (entry is not None and all(a is b for a, b in zip(entry[0], tensors)) and entry[1] == versions
                and entry[2] == facts):
            return entry[3]
        self.__dict__.pop("_gemv_entry", None)
        try:
            self.validate("qw")
        except (TypeError, ValueError):
            return None
        if not self.data.is_cpu or len(self.shape) != 2 or self.shape[1] % 32:
            return None
        module = cpu_module()
        keep = {"data": self.data.contiguous().view(-1), "absmax": self.float_absmax().contiguous(),
                "code": _code(self.data.device), "tiles": self.cpu_tiles()}
        views = {name: _checks.cpu_view(module, t) for name, t in keep.items() if t is not None}
        self.__dict__["_gemv_entry"] = (tensors, versions, facts, views, keep)
        return views

    def _cache(self) -> dict:
        """What this weight derives once (float absmax, CPU tiles), dropped when data, absmax,
        nested_absmax or offset change (another tensor, or the same written in place). Inference
        tensors (made under ``torch.inference_mode``) have no version counter: for them only
        another tensor is seen, not a write in place."""
        sources = [t for t in (self.data, self.absmax, self.nested_absmax, self.offset) if t is not None]
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in sources)
        cached = self.__dict__.get("_derived")
        if cached is None or cached[0] != key:
            cached = (key, {})
            self.__dict__["_derived"] = cached
        return cached[1]

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


class Nf4QuantizeInputs(NamedTuple):
    """The inputs of ``fusedlm::nf4_quantize`` (its schema: these fields, then the backend)."""

    w: torch.Tensor  # float, any shape
    blocksize: int


class Nf4DequantizeInputs(NamedTuple):
    """The inputs of ``fusedlm::nf4_dequantize`` (its schema: these fields, then the backend)."""

    data: torch.Tensor  # uint8 [ceil(n / 2), 1], NF4Weight.data
    absmax: torch.Tensor  # float32 [n_blocks] (double quantisation undone)
    blocksize: int
    shape: list[int]  # of the weight
    dtype: torch.dtype  # of the result


class Nf4MatmulInputs(NamedTuple):
    """The inputs of ``fusedlm::nf4_matmul`` (its schema: these fields, then the backend)."""

    x: torch.Tensor  # [..., K]
    data: torch.Tensor  # uint8, the weight [N, K] packed
    absmax: torch.Tensor  # float32 [n_blocks]
    blocksize: int
    shape: list[int]  # [N, K]
    bias: torch.Tensor | None  # [N]
    tiles: torch.Tensor | None = None  # uint8, NF4Weight.cpu_tiles(): the same weight as the cpu GEMV streams it


@functools.lru_cache(maxsize=None)
def _on_device(table: str, device: torch.device) -> torch.Tensor:
    """reference.nf4's NF4_CODE or NF4_MIDPOINTS (the one place they live) on `device`, copied
    there once: a copy per call is a pageable host-to-device copy and a sync on every decode step."""
    return getattr(ref, table).to(device)


def _code(device: torch.device) -> torch.Tensor:
    """The NF4 code table on `device`."""
    return _on_device("NF4_CODE", device)


# ---------------------------------------------------------------------------------------------
# Backends: quantise  Nf4QuantizeInputs -> (data, absmax)
# ---------------------------------------------------------------------------------------------
_quantize = Dispatcher("nf4_quantize")


@_quantize.register("reference")
def _quantize_reference(a: Nf4QuantizeInputs):
    return ref.quantize(a.w, a.blocksize)


def _empty_packed(w: torch.Tensor, blocksize: int):
    n = w.numel()
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    return data, absmax


@_quantize.register("cpu")
@_quantize.register("cuda")
def _quantize_compiled(a: Nf4QuantizeInputs):
    w = a.w.contiguous()
    data, absmax = _empty_packed(w, a.blocksize)
    _checks.launch("nf4_quantize", "Nf4Args", w.device, w=w.view(-1), data=data.view(-1), absmax=absmax,
                   midpoints=_on_device("NF4_MIDPOINTS", w.device), blocksize=a.blocksize)
    return data, absmax


@_quantize.register("triton")
def _quantize_triton(a: Nf4QuantizeInputs):
    from ..kernels import nf4 as kernels

    data, absmax = _empty_packed(a.w, a.blocksize)
    kernels.quantize(a.w.contiguous().view(-1), a.blocksize, _on_device("NF4_MIDPOINTS", a.w.device), data.view(-1), absmax)
    return data, absmax


@record_op("fusedlm::nf4_quantize", Nf4QuantizeInputs)
def _nf4_quantize_op(a: Nf4QuantizeInputs, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize(backend, a)


@_nf4_quantize_op.register_fake
def _(a: Nf4QuantizeInputs, backend: str):
    n = a.w.numel()
    return a.w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), a.w.new_empty(-(-n // a.blocksize), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Backends: dequantise  Nf4DequantizeInputs -> w
# ---------------------------------------------------------------------------------------------
_dequantize = Dispatcher("nf4_dequantize")


@_dequantize.register("reference")
def _dequantize_reference(a: Nf4DequantizeInputs):
    return ref.dequantize(a.data, a.absmax, a.blocksize, a.shape, a.dtype)


def _dequantize_into(data: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor) -> None:
    """The compiled dequantisation of (data, absmax) into the contiguous `out` (cpu or cuda by its device)."""
    _checks.launch("nf4_dequantize", "Nf4Args", out.device, data=data.view(-1), absmax=absmax, code=_code(out.device),
                   blocksize=blocksize, out=out.view(-1))


@_dequantize.register("cpu")
@_dequantize.register("cuda")
def _dequantize_compiled(a: Nf4DequantizeInputs):
    out = torch.empty(a.shape, dtype=a.dtype, device=a.data.device)
    _dequantize_into(a.data, a.absmax, a.blocksize, out)
    return out


@_dequantize.register("triton")
def _dequantize_triton(a: Nf4DequantizeInputs):
    from ..kernels import nf4 as kernels

    out = torch.empty(a.shape, dtype=a.dtype, device=a.data.device)
    kernels.dequantize(a.data.view(-1), a.absmax, a.blocksize, _code(a.data.device), out.view(-1))
    return out


@record_op("fusedlm::nf4_dequantize", Nf4DequantizeInputs)
def _nf4_dequantize_op(a: Nf4DequantizeInputs, backend: str) -> torch.Tensor:
    return _dequantize(backend, a._replace(data=a.data.contiguous(), absmax=a.absmax.contiguous()))


@_nf4_dequantize_op.register_fake
def _(a: Nf4DequantizeInputs, backend: str):
    return a.data.new_empty(a.shape, dtype=a.dtype)


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
    data, absmax = _nf4_quantize_op(Nf4QuantizeInputs(w=w.detach(), blocksize=blocksize), backend)
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
    inputs = Nf4DequantizeInputs(data=qw.data, absmax=qw.float_absmax(), blocksize=qw.blocksize, shape=list(qw.shape),
                                 dtype=qw.dtype)
    return _nf4_dequantize_op(inputs, backend)


def nf4_matmul(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(qw).T + bias`` for a 2-D NF4 weight ``[N, K]``; x is ``[..., K]``.

    Accumulates in float32 and returns x.dtype. The reference path dequantises; the fused
    kernels never materialise the float weight.

    Numerics of the cpu backend's fused kernel: the products of x and
    the exact dequantised weights, summed in float32 (the float32 bounds of bitsandbytes'
    ``test_gemv_4bit`` hold) -- except with bf16 dot products, taken on CPUs with avx512_bf16 for
    bfloat16 x, and for float32 x when ``torch.get_float32_matmul_precision()`` is ``"medium"``:
    then x is rounded to bf16 (round to nearest even) and each weight is its NF4 code value rounded
    to bf16 times the exact float32 absmax, products and sums in float32 (relative error of each
    product at most 2^-8; bitsandbytes' bf16 bounds hold). float16 x is always exact.
    """
    if type(qw) is NF4Weight and _checks.inference_fast_path(x, bias):
        out = _fast_gemv(x, qw, bias)
        if out is not None:
            return out
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
    backend = _matmul.choose(x.device, dtype=x.dtype, k=k)
    inputs = Nf4MatmulInputs(x=x, data=qw.data, absmax=qw.float_absmax(), blocksize=qw.blocksize, shape=list(qw.shape),
                             bias=bias, tiles=qw.cpu_tiles() if backend == "cpu" else None)
    return _nf4_matmul_op(inputs, backend)


def _fast_gemv(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The inference fast path of :func:`nf4_matmul` (decode: up to CPU_GEMV_MAX_ROWS rows of x on
    the CPU, no autograd, not traced; ``_checks.inference_fast_path``): the cpu GEMV called directly
    with the weight's views made once (:meth:`NF4Weight._gemv_views`), skipping the custom op and
    the per-call checks of the weight. The same kernel with the same arguments as the op path, so
    the same bits. None where any condition fails: the op path then runs (and raises what it raises)."""
    views = qw._gemv_views()
    if views is None or x.dtype not in _checks.FLOAT_DTYPES:
        return None
    n_out, k = qw.shape
    if x.dim() == 0 or x.shape[-1] != k:
        return None
    m = x.numel() // k
    if m == 0 or m > CPU_GEMV_MAX_ROWS:
        return None
    if bias is not None:
        if bias.dtype not in _checks.FLOAT_DTYPES or bias.shape != (n_out,):
            return None
        bias = bias.float().contiguous()
    module = cpu_module()
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype)
    args = module.Nf4Args()
    args.data, args.absmax, args.code, args.blocksize = views["data"], views["absmax"], views["code"], qw.blocksize
    if "tiles" in views:
        args.tiles = views["tiles"]
    code = _checks.DTYPE_CODES[x.dtype]
    args.x = module.View(x.data_ptr(), code, (m, k), (k, 1))  # x and out as [M, K] and [M, N] rows
    args.out = module.View(out.data_ptr(), code, (m, n_out), (n_out, 1))
    if bias is not None:
        args.bias = _checks.cpu_view(module, bias)
    args.num_threads = torch.get_num_threads()
    args.bf16_dots = torch.get_float32_matmul_precision() == "medium"
    module.nf4_gemv(args)
    return out


_matmul = Dispatcher("nf4_matmul")

# Up to this many rows of x the CPU runs its fused kernel whatever the weight; above it, the
# fused kernel if the weight has tiles (NF4Weight.cpu_tiles) and the SIMD level has 32 vector
# registers (AVX-512: there it is a GEMM at the FMA / bf16 dot rate, measured 1.0-1.6x torch's
# float32 GEMM and 0.9-1.0x its bf16 one), else the tiled path: decode one tile of rows of W at a
# time and multiply it with torch's GEMM (on AVX2, from 64 rows on the fused kernel's lookups cost
# more than decoding W once).
CPU_GEMV_MAX_ROWS = 16
CPU_FUSED_MAX_ROWS_AVX2 = 64
CPU_TILE_BYTES = 8 << 20  # size of one decoded tile of W on the tiled path (smaller tiles starve the GEMM)


@_matmul.register("reference")
def _matmul_reference(a: Nf4MatmulInputs):
    return ref.matmul(a.x, a.data, a.absmax, a.blocksize, a.shape, a.bias)


def _gemv(x2: torch.Tensor, a: Nf4MatmulInputs) -> torch.Tensor:
    """The compiled fused GEMV (cpu or cuda by x's device): x2 [M, K] (unit stride along K) @ W^T + bias.

    On the CPU it streams the tiles when the record has them, else the flat bytes. Numerics: see
    :func:`nf4_matmul` (float32 x goes through bf16 dot products at ``torch.set_float32_matmul_precision("medium")``).
    """
    out = torch.empty((x2.shape[0], a.shape[0]), dtype=x2.dtype, device=x2.device)
    if x2.shape[0]:
        _checks.launch("nf4_gemv", "Nf4Args", x2.device, x=x2, data=a.data.view(-1), absmax=a.absmax,
                       code=_code(x2.device), blocksize=a.blocksize,
                       bias=None if a.bias is None else a.bias.float().contiguous(), out=out,
                       tiles=a.tiles if x2.device.type == "cpu" else None,
                       bf16_dots=torch.get_float32_matmul_precision() == "medium")
    return out


def _rows(a: Nf4MatmulInputs) -> torch.Tensor:
    """x as [M, K] rows with unit stride along K."""
    x2 = a.x.reshape(-1, a.shape[1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _cpu_matmul_supports(k: int, **facts) -> str | None:
    return None if k % 32 == 0 else f"the cpu kernel needs K % 32 == 0, got K={k}"


@_matmul.register("cpu", supports=_cpu_matmul_supports)
def _matmul_cpu(a: Nf4MatmulInputs):
    x2 = _rows(a)
    m = x2.shape[0]
    if a.tiles is not None:
        fused = m <= CPU_FUSED_MAX_ROWS_AVX2 or cpu_module().active_isa().startswith("avx512")
    else:
        fused = m <= CPU_GEMV_MAX_ROWS
    out = _gemv(x2, a) if fused else _matmul_tiled(x2, a)
    return out.view(*a.x.shape[:-1], a.shape[0])


def _matmul_tiled(x2: torch.Tensor, a: Nf4MatmulInputs) -> torch.Tensor:
    """Large M: decode a tile of rows of W and multiply it, tile by tile.

    Tiles are bf16 for bf16 x on CPUs with native bf16 dot products (avx512_bf16), else float32:
    without them torch's bf16 GEMM is several times slower than its float32 one, so bf16 x is
    widened once and the output narrowed at the end. Extra memory is one decoded tile plus its
    slice of the output, never the whole weight.
    """
    n_out, k = a.shape
    blocksize = a.blocksize
    native_bf16 = cpu_module().active_isa() == "avx512_bf16"
    compute = torch.bfloat16 if x2.dtype == torch.bfloat16 and native_bf16 else torch.float32
    xc = x2.to(compute)
    # Tiles start at a multiple of `align` rows, so each tile starts at a block boundary.
    align = blocksize // math.gcd(k, blocksize)
    rows = max(align, CPU_TILE_BYTES // (k * xc.element_size()) // align * align)
    out = torch.empty((x2.shape[0], n_out), dtype=torch.float32 if compute != x2.dtype else compute, device=x2.device)
    flat_data = a.data.view(-1)
    tile = torch.empty((rows, k), dtype=compute, device=x2.device)
    for n0 in range(0, n_out, rows):
        n1 = min(n_out, n0 + rows)
        w = tile[: n1 - n0]
        _dequantize_into(flat_data[n0 * k // 2 : n1 * k // 2], a.absmax[n0 * k // blocksize : -(-n1 * k // blocksize)],
                         blocksize, w)
        out[:, n0:n1] = xc @ w.T
    if a.bias is not None:
        out += a.bias.to(out.dtype)
    return out.to(x2.dtype)


@_matmul.register("triton")
def _matmul_triton(a: Nf4MatmulInputs):
    from ..kernels import nf4 as kernels

    n_out = a.shape[0]
    out = kernels.matmul(_rows(a), a.data.view(-1), a.absmax, a.blocksize, n_out, _code(a.x.device))
    if a.bias is not None:
        out += a.bias.float()
    return out.to(a.x.dtype).view(*a.x.shape[:-1], n_out)


def _cuda_matmul_supports(k: int, **facts) -> str | None:
    return None if k % 32 == 0 else f"the cuda GEMV needs K % 32 == 0, got K={k}"


@_matmul.register("cuda", supports=_cuda_matmul_supports)
def _matmul_cuda(a: Nf4MatmulInputs):
    x2 = _rows(a)
    if x2.shape[0] > CPU_GEMV_MAX_ROWS:
        # Prefill: dequantise to x's dtype and use cuBLAS (the fused CUDA kernel is the decode GEMV).
        w = torch.empty(a.shape, dtype=x2.dtype, device=x2.device)
        _dequantize_into(a.data, a.absmax, a.blocksize, w)
        out = x2 @ w.T
        if a.bias is not None:
            out += a.bias.to(out.dtype)
    else:  # (a weight not 16-byte aligned is read bytewise by the kernel, not copied)
        out = _gemv(x2, a)
    return out.view(*a.x.shape[:-1], a.shape[0])


@record_op("fusedlm::nf4_matmul", Nf4MatmulInputs)
def _nf4_matmul_op(a: Nf4MatmulInputs, backend: str) -> torch.Tensor:
    return _matmul(backend, a._replace(data=a.data.contiguous(), absmax=a.absmax.contiguous()))


@_nf4_matmul_op.register_fake
def _(a: Nf4MatmulInputs, backend: str):
    return a.x.new_empty((*a.x.shape[:-1], a.shape[0]))


def _matmul_setup_context(ctx, a: Nf4MatmulInputs, backend: str, output):
    save_for_backward(ctx, a._replace(x=None, bias=None, tiles=None))  # the weight; of x and bias only their dtypes
    ctx.x_dtype, ctx.bias_dtype, ctx.backend = a.x.dtype, None if a.bias is None else a.bias.dtype, backend


def _matmul_backward(ctx, grad_out):
    # The 4-bit weight is frozen: gradients flow to x (QLoRA) and to the bias.
    (a,) = saved(ctx)
    grads = {}
    if _nf4_matmul_op.needs_grad(ctx, "x") and ctx.backend == "cpu" and a.shape[1] % 32 == 0:
        # the cpu kernels' tiled GEMM (ops/_gemm.py): dy W with W decoded panel by panel, never whole
        from ._gemm import lora_gemm

        qw = NF4Weight(a.data.view(-1), a.absmax, a.blocksize, torch.Size(a.shape), torch.float32)
        dy = grad_out.reshape(-1, a.shape[0])
        dy = dy if dy.dtype in (torch.float32, torch.bfloat16) else dy.float()
        dx = lora_gemm(dy, qw, transposed=True, out_dtype=ctx.x_dtype if ctx.x_dtype == dy.dtype else torch.float32)
        grads["x"] = dx.to(ctx.x_dtype).view(*grad_out.shape[:-1], a.shape[1])
    elif _nf4_matmul_op.needs_grad(ctx, "x"):
        # through the dequantise custom op, so fake tensors (torch.compile, opcheck) trace it
        w = _nf4_dequantize_op(Nf4DequantizeInputs(a.data, a.absmax, a.blocksize, a.shape, torch.float32), ctx.backend)
        grads["x"] = (grad_out.float() @ w).to(ctx.x_dtype)
    if _nf4_matmul_op.needs_grad(ctx, "bias"):
        grads["bias"] = grad_out.float().reshape(-1, a.shape[0]).sum(0).to(ctx.bias_dtype)
    return _nf4_matmul_op.grads(**grads)


_nf4_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)
