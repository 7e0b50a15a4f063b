"""The fused LoRA linear layer in Triton: base tile and adapter term in one kernel.

Each program computes one ``[BLOCK_M, BLOCK_N]`` tile of ``y = x Wᵀ + b + s_m · h_m B_{id_m}ᵀ``:

1. the base tile ``x Wᵀ`` (a K loop of ``tl.dot``), or, for NF4 weights, the tile of the base output
   that ``nf4_matmul`` produced;
2. the adapter term from ``h = dropout(x) Aᵀ`` ([M, r], float32, computed before the launch: it
   is r/N of the work and the backward needs it anyway). With one adapter it is one
   ``tl.dot(h · s, Bᵀ)``; with many, rows of one tile may use different adapters, so the term is
   summed rank by rank from each row's own ``B[id_m]`` (``s_m = 0`` for rows with id -1);
3. bias, then a single store in y's dtype.

Accumulation is float32 throughout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import interpreting


@triton.jit
def _lora_linear_kernel(
    x_ptr,  # [M, K] input rows (unit stride along K)
    w_ptr,  # [N, K] base weight (unused when HAS_BASE)
    base_ptr,  # [M, N] precomputed base output (NF4 path; unused otherwise)
    h_ptr,  # [M, r] float32 shrink output dropout(x) A_idᵀ
    b_ptr,  # [A, N, r] adapter up-projections
    ids_ptr,  # [M] int64 adapter of each row (clamped to >= 0; rows without one have scale 0)
    scale_ptr,  # [M] float32 scaling * gate of each row's adapter (0 for id -1)
    bias_ptr,  # [N] bias (unused without HAS_BIAS)
    y_ptr,  # [M, N] output
    M, N, K, R,  # sizes; R = rank r
    stride_xm,  # elements between two rows of x
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, MULTI: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 x (as torch.matmul), None (default) for 16-bit
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    # element offsets in int64: M * K, N * K or M * N may pass 2^31 (a long batch times a wide layer)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    # 1. base tile
    if HAS_BASE:
        acc = tl.load(base_ptr + rm64[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            xt = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + rn64[None, :] * K + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # [BK, BN]
            acc += tl.dot(xt, wt, input_precision=PRECISION, out_dtype=tl.float32)

    # 2. adapter term: s_m * h_m . B_{id_m}[n, :]
    scale = tl.load(scale_ptr + rm, mask=m_ok, other=0.0)
    if MULTI:
        ids = tl.load(ids_ptr + rm, mask=m_ok, other=0)
        b_row = ids[:, None] * N * R + rn64[None, :] * R  # [BM, BN] offset of B[id_m, n, 0]
        for j in range(0, R):
            hj = tl.load(h_ptr + rm64 * R + j, mask=m_ok, other=0.0) * scale
            bj = tl.load(b_ptr + b_row + j, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            acc += hj[:, None] * bj
    else:
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        ht = tl.load(h_ptr + rm64[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + rn64[None, :] * R + rr[:, None], mask=n_ok[None, :] & r_ok[:, None], other=0.0).to(tl.float32)
        acc += tl.dot(ht * scale[:, None], bt, input_precision="ieee", out_dtype=tl.float32)

    # 3. bias and the one store
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm64[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def lora_linear(x, weight, base, h, lora_b, ids, scales, bias):
    """y [M, N] in x's dtype; x [M, K]; weight [N, K] or base [M, N]; h float32 [M, r];
    lora_b [A, N, r]; ids int64 [M] (-1 allowed); scales float32 [M]; bias [N] or None."""
    m, k = x.shape
    n_adapters, n_out, r = lora_b.shape
    interp = interpreting()
    # The CPU interpreter has no bfloat16 (numpy has none): widen exactly to float32 there.
    cast = (lambda t: t.float() if t is not None and t.dtype == torch.bfloat16 else t) if interp else (lambda t: t)
    xk = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty((m, n_out), dtype=torch.float32 if interp and x.dtype == torch.bfloat16 else x.dtype, device=x.device)
    if m == 0:
        return y.to(x.dtype)
    block = 16 if interp else 64
    block_r = max(16, triton.next_power_of_2(r))
    grid = (triton.cdiv(m, block), triton.cdiv(n_out, block))
    w = None if weight is None else cast(weight.contiguous())
    base_t = None if base is None else cast(base.contiguous())
    _lora_linear_kernel[grid](
        cast(xk), w if w is not None else h, base_t if base_t is not None else h, h.contiguous(),
        cast(lora_b.contiguous()), ids.clamp(min=0).contiguous(), scales, cast(bias) if bias is not None else h, y,
        m, n_out, k, r, xk.stride(0),
        HAS_BASE=base is not None, HAS_BIAS=bias is not None, MULTI=n_adapters > 1,
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        BLOCK_M=block, BLOCK_N=block, BLOCK_K=16 if interp else 32, BLOCK_R=block_r,
        num_warps=8 if x.dtype == torch.float32 else 4,  # float32 tiles take twice the registers
    )
    return y.to(x.dtype)
