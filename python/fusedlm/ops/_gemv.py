"""The dense decode GEMV: ``F.linear(x, weight, bias)`` for a few rows of x (decode: one) and a
float32 or bfloat16 weight, on fusedlm's CPU kernel (``csrc/cpu/dense_gemv.cpp``) where it applies,
else on torch. Used by the models' linear layers and LM head (``models/blocks.py``: ``Linear``).

Why: at decode a linear layer reads its whole weight for one row of x, so its time is the weight's
bytes over the memory bandwidth; the kernel streams each thread's run of rows once, with one
accumulator per row pair (vdpbf16ps on bf16 where the CPU has avx512_bf16, FMAs elsewhere).

Numerics: every product exact in float32 (bf16 x bf16 products are exact there), float32 sums in
another order than torch's, the bias added in float32, the result rounded once to x's dtype -- as
torch's CPU linear does for these dtypes, up to the order of the sums. Tested against the float64
product.

Where: the inference fast path's conditions (``_checks.inference_fast_path``: no autograd, not
traced, CPU tensors, no forced backend), x and weight of one dtype (float32 or bfloat16), 1 to
:data:`MAX_ROWS` rows of x, a 2-D weight with unit stride along K, and a SIMD level where the kernel
measured faster than torch (:data:`_FASTER`); anything else is ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backends, _checks
from ._backends import _compiled

MAX_ROWS = 4  # csrc/common/args.h: kGemvMaxRows
_DTYPES = (torch.float32, torch.bfloat16)


# Where the kernel is the faster one (measured at decode shapes, 2 threads, AMD EPYC): float32
# weights from AVX2 up (1.4-1.8x torch's linear); bf16 weights only with native bf16 dot products
# (avx512_bf16: 1.3-1.6x) -- capped at AVX2, torch's bf16 linear reads at 85-96% of the bandwidth
# and the widening GEMV at 55-78%.
_FASTER = {torch.float32: ("avx2", "avx512", "avx512_bf16"), torch.bfloat16: ("avx512_bf16",)}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` (see the module docstring)."""
    if not _checks.inference_fast_path(x, weight, bias):  # first: under torch.compile nothing else is traced
        return F.linear(x, weight, bias)
    module = _compiled("_C")
    if (module is None or x.dtype not in _DTYPES or weight.dtype != x.dtype or weight.dim() != 2 or x.dim() == 0
            or module.active_isa() not in _FASTER[x.dtype]):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    if x.shape[-1] != k or k == 0 or n == 0 or weight.stride(1) != 1 or weight.stride(0) < k:
        return F.linear(x, weight, bias)
    if not 0 < x.numel() // k <= MAX_ROWS:
        return F.linear(x, weight, bias)
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):  # F.linear's rule (it raises)
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel itself, at the SIMD level in use, for CPU inputs :func:`linear` would hand it (x and
    weight float32 or bf16 of one dtype, 1 to MAX_ROWS rows, weight [N, K] with unit stride along K);
    the C++ entry point checks them again."""
    module = _backends.cpu_module()
    n, k = weight.shape
    m = x.numel() // k
    if bias is not None:
        bias = bias.float().contiguous()
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    code = _checks.DTYPE_CODES[x.dtype]
    args = module.GemvArgs()
    args.x = module.View(x.data_ptr(), code, (m, k), (k, 1))
    args.w = module.View(weight.data_ptr(), _checks.DTYPE_CODES[weight.dtype], (n, k), tuple(weight.stride()))
    args.out = module.View(out.data_ptr(), code, (m, n), (n, 1))
    if bias is not None:
        args.bias = _checks.cpu_view(module, bias)
    args.num_threads = torch.get_num_threads()
    module.dense_gemv(args)
    return out
