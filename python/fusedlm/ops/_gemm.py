"""The CPU GEMMs of a LoRA layer in training (``csrc/cpu/lora_gemm.cpp``): the frozen base weight's
product and the adapter's term in one accumulation, forward and for the input's gradient::

    forward:   out[M, N] (+)= a[M, K] Wᵀ + a2[M, r] w2ᵀ      (w2 = s·B [N, r])
    gradient:  out[M, K] (+)= a[M, N] W  + a2[M, r] w2       (w2 = A [r, K])

W is dense (float32 or bfloat16) or an :class:`~fusedlm.ops.nf4.NF4Weight` (QLoRA), decoded panel by
panel inside the GEMM: never dequantised as a whole, never copied per step. bf16 operands run on
bf16 dot products (``vdpbf16ps``, float32 sums) where the CPU has them (avx512_bf16) and are widened
to float32 elsewhere, where bf16 GEMMs are emulated. Used by :mod:`fusedlm.ops.lora` (its cpu
backend) and by ``nf4_matmul``'s backward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..reference import nf4 as ref_nf4
from . import _checks
from ._backends import cpu_module
from ._records import record_op


def native_bf16() -> bool:
    """Whether the cpu kernels run bf16 dot products natively (the active SIMD level is avx512_bf16)."""
    return cpu_module().active_isa() == "avx512_bf16"


def supports(weight) -> str | None:
    """None if the kernel takes `weight` (a dense tensor, or an NF4 weight with K % 32 == 0), else why not."""
    if isinstance(weight, torch.Tensor):
        return None if weight.dtype in (torch.float32, torch.bfloat16) else f"the GEMM kernel does not take {weight.dtype} weights"
    return None if weight.shape[1] % 32 == 0 else f"the NF4 GEMM needs K % 32 == 0, got K={weight.shape[1]}"


def _operand(t: torch.Tensor, bf16: bool, pad_to_even: bool = False) -> torch.Tensor:
    """t in the kernel's compute dtype with unit stride along its columns (bf16: an even number of them)."""
    t = t.to(torch.bfloat16 if bf16 else torch.float32)
    if bf16 and pad_to_even and t.shape[-1] % 2:
        t = torch.nn.functional.pad(t, (0, 1))
    return t if t.stride(-1) == 1 else t.contiguous()


class LoraGemmInputs(NamedTuple):
    """The inputs of ``fusedlm::lora_gemm`` (its schema: these fields, then the backend "cpu")."""

    a: torch.Tensor  # [M, K] (forward) or [M, N] (transposed)
    w: torch.Tensor | None  # the dense W [N, K], or None for an NF4 one:
    nf4_data: torch.Tensor | None  # its packed bytes
    nf4_absmax: torch.Tensor | None  # float32 [n_blocks]
    blocksize: int
    n: int  # W's shape
    k: int
    transposed: bool
    a2: torch.Tensor | None  # [M, r]: the adapter's left operand
    w2: torch.Tensor | None  # [N, r] (forward) or [r, K] (transposed)
    init: torch.Tensor | None  # [M, N or K]: out starts from it (else from zero)
    out_dtype: torch.dtype


@record_op("fusedlm::lora_gemm", LoraGemmInputs)
def _lora_gemm_op(g: LoraGemmInputs, backend: str) -> torch.Tensor:
    m = g.a.shape[0]
    out = torch.empty((m, g.k if g.transposed else g.n), dtype=g.out_dtype, device=g.a.device)
    if g.init is not None:
        out.copy_(g.init)
    if m == 0:
        return out.zero_() if g.init is None else out
    bf16 = g.a.dtype == torch.bfloat16 and native_bf16()
    bf16 = bf16 and (g.n if g.transposed else g.k) % 2 == 0  # an odd reduction length (dense W only) runs in float32
    fields = dict(a=_operand(g.a, bf16), n=g.n, k=g.k, transposed=int(g.transposed), accumulate=int(g.init is not None), out=out)
    if g.w is not None:
        fields["w"] = g.w if g.w.stride(-1) == 1 else g.w.contiguous()
    else:
        fields.update(data=g.nf4_data, absmax=g.nf4_absmax, code=ref_nf4.NF4_CODE.to(g.a.device), blocksize=g.blocksize)
    if g.a2 is not None:
        a2, w2 = _operand(g.a2, bf16, pad_to_even=True), g.w2
        if w2.dtype not in (torch.float32, torch.bfloat16):
            w2 = w2.float()
        if a2.shape[1] != (w2.shape[0] if g.transposed else w2.shape[1]):  # a2 padded to an even rank: w2 with zeros
            w2 = torch.nn.functional.pad(w2, (0, 0, 0, 1) if g.transposed else (0, 1))
        fields.update(a2=a2, w2=w2 if w2.stride(-1) == 1 else w2.contiguous())
    _checks.launch("lora_gemm", "LoraGemmArgs", g.a.device, **fields)
    return out


@_lora_gemm_op.register_fake
def _(g: LoraGemmInputs, backend: str):
    return g.a.new_empty((g.a.shape[0], g.k if g.transposed else g.n), dtype=g.out_dtype)


def lora_gemm(a: torch.Tensor, weight, *, transposed: bool, a2: torch.Tensor | None = None, w2: torch.Tensor | None = None,
              init: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``init + a Wᵀ (+ a2 w2ᵀ)`` or, transposed, ``init + a W (+ a2 w2)``, a new tensor in `out_dtype`
    (default a's dtype; float32 or bfloat16); no init: from zero. Not differentiable (the callers are
    backward passes and custom ops).

    a: [M, K] (forward) or [M, N] (transposed); weight: [N, K] tensor or NF4Weight; a2 [M, r] with
    w2 [N, r] (forward) or [r, K] (transposed). bf16 a (and a2) run in bf16 where native.
    """
    n, k = weight.shape
    dense = isinstance(weight, torch.Tensor)
    inputs = LoraGemmInputs(
        a=a, w=weight if dense else None, nf4_data=None if dense else weight.data.view(-1),
        nf4_absmax=None if dense else weight.float_absmax().contiguous(), blocksize=0 if dense else weight.blocksize,
        n=n, k=k, transposed=transposed, a2=a2, w2=w2, init=init, out_dtype=out_dtype or a.dtype)
    return _lora_gemm_op(inputs, "cpu")
