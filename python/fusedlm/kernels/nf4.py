"""NF4 quantise, dequantise and dequant-matmul in Triton.

Byte-identical to the reference (python/fusedlm/reference/nf4.py), which documents the layout:
element ``i`` of the flattened weight sits in byte ``i // 2`` (high nibble when ``i`` is even) and
uses scale ``absmax[i // blocksize]``. The matmul kernels index the packed weight by that flat
index, so they handle any ``[N, K]`` (K need not be a multiple of the blocksize) and never
materialise the dequantised weight.

Floating-point care: the quantiser divides with ``div_rn`` (IEEE round-to-nearest, as the
reference does; Triton's plain ``/`` on GPUs is an approximate division), and the matmuls
accumulate in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import interpreting


def _kernel_input(t: torch.Tensor) -> torch.Tensor:
    # Triton's CPU interpreter has no bfloat16 (numpy has none); the exact widening to float32
    # gives the same bytes. On GPUs bfloat16 is loaded directly.
    return t.float() if t.dtype == torch.bfloat16 and interpreting() else t


# ---------------------------------------------------------------------------------------------
# quantise: one program per absmax block
# ---------------------------------------------------------------------------------------------
@triton.jit
def _quantize_kernel(
    w_ptr,  # flattened weight, n elements (float32/float16/bfloat16)
    mid_ptr,  # the 15 NF4 decision boundaries, float32
    data_ptr,  # out: ceil(n / 2) packed bytes
    absmax_ptr,  # out: one float32 scale per block
    n,  # number of elements
    BLOCKSIZE: tl.constexpr,  # elements per block (a power of two >= 32)
):
    block = tl.program_id(0)
    begin = block.to(tl.int64) * BLOCKSIZE
    pair = tl.arange(0, BLOCKSIZE // 2)
    even = begin + 2 * pair  # flat index of the high-nibble element of each byte
    a = tl.load(w_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    b = tl.load(w_ptr + even + 1, mask=even + 1 < n, other=0.0).to(tl.float32)  # odd n: pad with 0
    amax = tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(b), axis=0))
    full = begin + BLOCKSIZE <= n
    # The clamp is a float32 constant: a bare 1e-38 is below float32's smallest normal, and Triton
    # 3.6 types such a literal float64, which div_rn below rejects (3.9 and the interpreter do not).
    safe = tl.maximum(amax, tl.full([], 1e-38, tl.float32))
    # Full blocks multiply by the float32 reciprocal, the short tail block divides (bitsandbytes'
    # way); a short tail block stores the clamped absmax.
    if full:
        inverse = tl.math.div_rn(tl.full([], 1.0, tl.float32), safe)
        sa = a * inverse
        sb = b * inverse
        tl.store(absmax_ptr + block, amax)
    else:
        sa = tl.math.div_rn(a, tl.zeros_like(a) + safe)
        sb = tl.math.div_rn(b, tl.zeros_like(b) + safe)
        tl.store(absmax_ptr + block, safe)
    sa = tl.minimum(tl.maximum(sa, -1.0), 1.0)
    sb = tl.minimum(tl.maximum(sb, -1.0), 1.0)
    # Nearest code = number of midpoints strictly below the value (torch.bucketize).
    ia = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
    ib = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
    for j in tl.static_range(15):
        m = tl.load(mid_ptr + j)
        ia += (m < sa).to(tl.int32)
        ib += (m < sb).to(tl.int32)
    byte = ((ia << 4) | ib).to(tl.uint8)
    tl.store(data_ptr + begin // 2 + pair, byte, mask=even < n)


def quantize(w: torch.Tensor, blocksize: int, midpoints: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor) -> None:
    """Packs contiguous 1-D `w` into `data` (uint8, ceil(n/2)) and `absmax` (float32, blocks)."""
    w = _kernel_input(w)
    _quantize_kernel[(absmax.numel(),)](w, midpoints, data, absmax, w.numel(), BLOCKSIZE=blocksize)


# ---------------------------------------------------------------------------------------------
# dequantise: one program per chunk of BYTES bytes (2 * BYTES elements)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dequantize_kernel(
    data_ptr,  # packed bytes
    absmax_ptr,  # float32 scale per block
    code_ptr,  # the 16 NF4 values, float32
    out_ptr,  # out: n elements of the output dtype
    n,  # number of elements
    blocksize,  # elements per block (even, so both nibbles of a byte share a block)
    BYTES: tl.constexpr,  # bytes per program
):
    pair = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    even = 2 * pair
    byte = tl.load(data_ptr + pair, mask=even < n, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + even // blocksize, mask=even < n, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    tl.store(out_ptr + even, hi.to(out_ptr.dtype.element_ty), mask=even < n)
    tl.store(out_ptr + even + 1, lo.to(out_ptr.dtype.element_ty), mask=even + 1 < n)


def dequantize(data: torch.Tensor, absmax: torch.Tensor, blocksize: int, code: torch.Tensor, out: torch.Tensor) -> None:
    """Unpacks 1-D `data` with float32 `absmax` into contiguous 1-D `out` (any float dtype)."""
    target = out
    if out.dtype == torch.bfloat16 and interpreting():
        out = torch.empty_like(out, dtype=torch.float32)
    n = out.numel()
    bytes_per_program = 1024
    _dequantize_kernel[(triton.cdiv((n + 1) // 2, bytes_per_program),)](
        data, absmax, code, out, n, blocksize, BYTES=bytes_per_program
    )
    if target is not out:
        target.copy_(out)


# ---------------------------------------------------------------------------------------------
# matmul: out[M, N] = x[M, K] @ W[N, K]^T (+ bias), W decoded tile by tile in registers
# ---------------------------------------------------------------------------------------------
# With K even (EVEN_K) row n of W is the bytes [n K / 2, (n + 1) K / 2): a tile is loaded as bytes
# (contiguous along K, so the loads vectorise), each byte gives the weight of an even column (high
# nibble) and of the odd one after it (low nibble), and x is read as its even and odd columns. Both
# nibbles of a byte share one absmax block (blocksizes are even), found with a shift: blocksizes are
# powers of two, so no division. Odd K (rows that start mid-byte) take the flat-index path.
@triton.jit
def _decode_pairs(data_ptr, absmax_ptr, code_ptr, byte_off, pair_shift, mask):
    """(high, low) nibble weights, float32, of the bytes at int64 offsets `byte_off` (a tile);
    pair_shift = log2(blocksize) - 1 maps a byte offset to its absmax block."""
    byte = tl.load(data_ptr + byte_off, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + (byte_off >> pair_shift), mask=mask, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    return hi, lo


@triton.jit
def _decode_tile(data_ptr, absmax_ptr, code_ptr, rows, cols, K, shift, mask):
    """W[rows, cols] as float32 by flat index (any K; rows/cols broadcast to a tile); shift = log2(blocksize)."""
    flat = rows.to(tl.int64) * K + cols
    byte = tl.load(data_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF  # even element: high nibble
    scale = tl.load(absmax_ptr + (flat >> shift), mask=mask, other=0.0)
    return tl.load(code_ptr + nibble) * scale


@triton.jit
def _gemv_kernel(
    x_ptr,  # x [M, K], rows `stride_xm` elements apart, unit stride along K
    data_ptr, absmax_ptr, code_ptr,  # the NF4 weight [N, K] and the code table
    out_ptr,  # float32 partial sums [SPLIT_K, M, N]
    M, N, K,
    shift,  # log2(blocksize)
    stride_xm,  # elements between two rows of x
    BLOCK_N: tl.constexpr,  # output features per program
    BLOCK_K: tl.constexpr,  # K elements per step
    K_PER_SPLIT: tl.constexpr,  # K range one program covers (a multiple of BLOCK_K)
    EVEN_K: tl.constexpr,  # K is even: rows start on a byte (the byte-pair path)
):
    # One program: BLOCK_N output features of one row of x, over one K_PER_SPLIT slice of K
    # (split-K keeps enough programs in flight when M * N / BLOCK_N is small).
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_row = x_ptr + m * stride_xm
    k_end = tl.minimum(K, (split + 1) * K_PER_SPLIT)
    if EVEN_K:
        row_byte = rows.to(tl.int64) * (K // 2)  # [BLOCK_N] first byte of each row
        half = tl.arange(0, BLOCK_K // 2)
        for k0 in range(split * K_PER_SPLIT, k_end, BLOCK_K):
            pairs = k0 // 2 + half  # byte index within the row
            p_ok = pairs < k_end // 2
            x_even = tl.load(x_row + 2 * pairs, mask=p_ok, other=0.0).to(tl.float32)
            x_odd = tl.load(x_row + 2 * pairs + 1, mask=p_ok, other=0.0).to(tl.float32)
            hi, lo = _decode_pairs(data_ptr, absmax_ptr, code_ptr, row_byte[:, None] + pairs[None, :], shift - 1,
                                   row_ok[:, None] & p_ok[None, :])
            acc += tl.sum(hi * x_even[None, :] + lo * x_odd[None, :], axis=1)
    else:
        for k0 in range(split * K_PER_SPLIT, k_end, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_row + cols, mask=cols < k_end, other=0.0).to(tl.float32)
            mask = row_ok[:, None] & (cols[None, :] < k_end)
            w = _decode_tile(data_ptr, absmax_ptr, code_ptr, rows[:, None], cols[None, :], K, shift, mask)
            acc += tl.sum(w * xk[None, :], axis=1)
    tl.store(out_ptr + (split * M + m) * N + rows, acc, mask=row_ok)


@triton.jit
def _gemm_kernel(
    x_ptr,  # x [M, K], rows `stride_xm` elements apart, unit stride along K
    data_ptr, absmax_ptr, code_ptr,  # the NF4 weight [N, K] and the code table
    out_ptr,  # float32 out [M, N]
    M, N, K,
    shift,  # log2(blocksize)
    stride_xm,  # elements between two rows of x
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is even: rows start on a byte (the byte-pair path)
    PRECISION: tl.constexpr,  # tl.dot input precision for float32 x ("tf32" or "tf32x3", as torch's matmul)
):
    # One program: an output tile [BLOCK_M, BLOCK_N]; each K step decodes a tile of W^T into
    # registers, in x's dtype (bf16/fp16 on the tensor cores; float32 x as TF32 products), and
    # feeds it to tl.dot with float32 accumulation. With EVEN_K the step is two dots of half depth:
    # the even columns of x with the high nibbles, the odd ones with the low nibbles.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if EVEN_K:
        col_byte = rn.to(tl.int64) * (K // 2)  # first byte of each row of W (a column of W^T)
        half = tl.arange(0, BLOCK_K // 2)
        for k0 in range(0, K, BLOCK_K):
            pairs = k0 // 2 + half
            p_ok = pairs < K // 2
            x_mask = m_ok[:, None] & p_ok[None, :]
            x_even = tl.load(x_rows + 2 * pairs[None, :], mask=x_mask, other=0.0)
            x_odd = tl.load(x_rows + 2 * pairs[None, :] + 1, mask=x_mask, other=0.0)
            hi, lo = _decode_pairs(data_ptr, absmax_ptr, code_ptr, pairs[:, None] + col_byte[None, :], shift - 1,
                                   p_ok[:, None] & n_ok[None, :])  # [BLOCK_K / 2, BLOCK_N] of W^T
            acc = tl.dot(x_even, hi.to(x_even.dtype), acc, input_precision=PRECISION)
            acc = tl.dot(x_odd, lo.to(x_odd.dtype), acc, input_precision=PRECISION)
    else:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
            mask = (rk[:, None] < K) & n_ok[None, :]
            wt = _decode_tile(data_ptr, absmax_ptr, code_ptr, rn[None, :], rk[:, None], K, shift, mask)
            acc = tl.dot(x, wt.to(x.dtype), acc, input_precision=PRECISION)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def _dot_precision() -> str:
    # float32 x follows torch's TF32 setting for matmuls: "tf32x3" (float32 accuracy from three
    # TF32 products) when it is off, the default. The exact "ieee" dot spilled ~15 KB per thread.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def matmul(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int, code: torch.Tensor) -> torch.Tensor:
    """float32 ``x [M, K] @ W[n, K]^T`` for the packed NF4 weight (x rows contiguous along K)."""
    x = x.float() if interpreting() and x.dtype != torch.float32 else x  # the interpreter: exact widening
    m, k = x.shape
    shift = blocksize.bit_length() - 1
    if m <= 8:
        # (odd K decodes by flat index, int64 per element: a shorter step keeps it in registers)
        block_n, block_k = (16, 32) if interpreting() else (64, 128 if k % 2 == 0 else 32)
        n_blocks = triton.cdiv(n, block_n)
        # split K until there are enough programs to fill the device
        split = 1
        while m * n_blocks * split < 256 and k // (split * 2) >= 4 * block_k:
            split *= 2
        k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
        split = triton.cdiv(k, k_per_split)
        partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _gemv_kernel[(n_blocks, m, split)](
            x, data, absmax, code, partial, m, n, k, shift, x.stride(0),
            BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=k_per_split, EVEN_K=k % 2 == 0,
        )
        return partial.sum(0) if split > 1 else partial[0]
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    block = (16, 16, 32) if interpreting() else (64, 64, 64 if k % 2 == 0 else 32)  # odd K: int64 flat indices
    grid = (triton.cdiv(m, block[0]), triton.cdiv(n, block[1]))
    _gemm_kernel[grid](
        x, data, absmax, code, out, m, n, k, shift, x.stride(0),
        BLOCK_M=block[0], BLOCK_N=block[1], BLOCK_K=block[2], EVEN_K=k % 2 == 0, PRECISION=_dot_precision(),
    )
    return out
