"""Masked attention in Triton: FlashAttention-2 style forward and backward.

Semantics are those of ``fusedlm.reference.attention`` (the ground truth): q ``[B, Hq, Nq, D]``,
k/v ``[B, Hkv, Nk, D]``, query head h reads key/value head ``h // (Hq // Hkv)`` (nothing copied),
scores ``s = scale * q.k + bias``; key j is visible to query i when

* mask_mode 0 (causal, bottom-right aligned): ``j <= i + (Nk - Nq)``;
* mask_mode 1 (prefix): ``j < prefix_len[b]`` or causal;
* mask_mode 2 (bidirectional): always;

and, in every mode, ``key_padding_mask[b, j]`` (when given). A row with no visible key gives
out = 0, lse = -inf and zero gradients. Accumulation is float32 whatever the input dtype.

Block skipping: for every mode the keys a query row sees form a prefix ``[0, hi_i)`` of the key
axis (hi_i grows with i), so a query tile only loops over key tiles below the last row's bound,
and key tiles below the first row's bound are visible to the whole tile: they are computed
without the per-element visibility test (the key padding mask, a per-column test, still applies).
The backward kernels use the same two regions seen from a key tile.

Decode: up to ``DECODE_ROWS`` query rows (one new token against a KV cache) run a split-KV
forward instead: one 16-row query tile per (batch, head), the key range split over several
programs, merged by a small combine kernel (see the section's comment).

Grids put batch x heads on axis 0 (CUDA allows 2^31 - 1 programs there, 65535 on axes 1 and 2).

Block sizes: the defaults (`_blocks`) are picked for H100/H200-class GPUs; under
``TRITON_INTERPRET=1`` they shrink to 16 so the CPU interpreter stays quick. ``forward`` and
``backward`` accept ``block_m``/``block_n`` keywords to override them (tests use this to force
several tiles on small shapes).

Under the interpreter (numpy has no bfloat16) bf16/fp16 inputs are widened to float32 exactly
and the results narrowed back; on a GPU they are loaded as they are.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.attention import BIDIRECTIONAL, CAUSAL, PREFIX  # the mask_mode values
from ._util import interpreting

LOG2E = 1.4426950408889634  # scores are kept in base 2 so the kernels can use exp2
# the same constants as seen from inside the kernels
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_CAUSAL, _PREFIX, _BIDIRECTIONAL = tl.constexpr(CAUSAL), tl.constexpr(PREFIX), tl.constexpr(BIDIRECTIONAL)


# ---------------------------------------------------------------------------------------------
# Shared pieces: which key tiles a query tile needs (and the reverse), and the mask itself
# ---------------------------------------------------------------------------------------------
@triton.jit
def _key_range(m0, nq, nk, prefix, MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows [m0, m0 + BLOCK_M): (full_end, hi). Key tiles starting below full_end
    are visible to every row (no per-element test); tiles in [full_end, hi) need the test;
    keys >= hi are hidden from every row and never visited."""
    if MASK_MODE == _BIDIRECTIONAL:
        hi = nk
        full = nk
    else:
        off = nk - nq
        hi = tl.minimum(m0 + BLOCK_M, nq) + off  # the last row sees keys [0, hi)
        full = m0 + off + 1  # the first row sees keys [0, full)
        if MASK_MODE == _PREFIX:
            hi = tl.maximum(hi, prefix)
            full = tl.maximum(full, prefix)
        hi = tl.minimum(tl.maximum(hi, 0), nk)
        full = tl.minimum(tl.maximum(full, 0), nk)
    return (full // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_range(n0, nq, nk, prefix, MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the keys [n0, n0 + BLOCK_N): (start, full_start), multiples of BLOCK_M. Query tiles in
    [start, full_start) need the per-element test, tiles from full_start on see every key of the
    tile, tiles below start see none of them."""
    m_tiles_end = tl.cdiv(nq, BLOCK_M) * BLOCK_M
    if MASK_MODE == _BIDIRECTIONAL:
        start = nq * 0
        full = nq * 0
    else:
        off = nk - nq
        start = n0 - off  # the first row that sees key n0
        full = n0 + BLOCK_N - 1 - off  # the first row that sees key n0 + BLOCK_N - 1
        if MASK_MODE == _PREFIX:
            start = tl.where(n0 < prefix, 0, start)
            full = tl.where(n0 + BLOCK_N <= prefix, 0, full)
        start = tl.minimum(tl.maximum(start, 0), nq)
        full = tl.minimum(tl.maximum(full, 0), nq)
    start = (start // BLOCK_M) * BLOCK_M
    full = tl.cdiv(full, BLOCK_M) * BLOCK_M
    full = tl.where(n0 + BLOCK_N > nk, m_tiles_end, full)  # a ragged key tile needs bounds checks
    full = tl.maximum(full, start)
    return start, full


@triton.jit
def _visible(rows, cols, nq, nk, prefix, MASK_MODE: tl.constexpr):
    """The visibility rule (module docstring) for broadcastable row/column index tensors,
    including the bounds checks; the key padding mask is applied by the callers."""
    vis = (rows < nq) & (cols < nk)
    if MASK_MODE == _CAUSAL:
        vis = vis & (cols <= rows + (nk - nq))
    elif MASK_MODE == _PREFIX:
        vis = vis & ((cols <= rows + (nk - nq)) | (cols < prefix))
    return vis


@triton.jit
def _key_padding(pad_base, cols, stride_pn, nk, MASKED: tl.constexpr):
    """True where key `cols` is a real token (bounds-checked on the mask's edge tiles)."""
    if MASKED:
        return tl.load(pad_base + cols * stride_pn, mask=cols < nk, other=0) != 0
    return tl.load(pad_base + cols * stride_pn) != 0


@triton.jit
def _masked_scores(
    s,  # scale * q.k in base 2 for query indices `rows` and key indices `cols` (S, or S^T)
    rows, cols,  # broadcastable to s: rows[:, None] and cols[None, :] for S, the reverse for S^T
    pad,  # key padding of `cols`, broadcastable like them (read when HAS_PAD)
    bias_base, stride_bm, stride_bn,  # this (batch, head)'s bias view
    nq, nk, prefix,
    MASKED: tl.constexpr, MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
):
    """s + bias (in base 2) with every hidden entry -inf: the score step of each kernel."""
    if HAS_BIAS:
        bias = tl.load(bias_base + rows * stride_bm + cols * stride_bn, mask=(rows < nq) & (cols < nk), other=0.0)
        s += bias.to(tl.float32) * _LOG2E
    if MASKED:
        vis = _visible(rows, cols, nq, nk, prefix, MASK_MODE)
        if HAS_PAD:
            vis = vis & pad
        s = tl.where(vis, s, float("-inf"))
    elif HAS_PAD:
        s = tl.where(pad, s, float("-inf"))
    return s


# ---------------------------------------------------------------------------------------------
# Forward: one program per (batch * query head, query tile)
# ---------------------------------------------------------------------------------------------
# Online softmax (FlashAttention-2), in base 2: for each key tile with scores s (already times
# log2 e), m' = max(m, rowmax(s)), p = exp2(s - m'), l' = l * exp2(m - m') + rowsum(p),
# acc' = acc * exp2(m - m') + p V. At the end out = acc / l and lse = (m + log2 l) * ln 2.
# Rows that have seen only hidden keys keep m = -inf; the max is then replaced by 0 in the
# exponentials so that they stay exp2(-inf) = 0 instead of NaN, and l = 0 marks them at the end.
@triton.jit
def _fwd_tile(
    acc, m_i, l_i,  # running output [BLOCK_M, BLOCK_D], row max and row sum [BLOCK_M] (fp32)
    q,  # the query tile [BLOCK_M, BLOCK_D]
    k_base, v_base, bias_base, pad_base,  # this (batch, head)'s K, V, bias and padding row
    start_n,  # first key of this tile
    rows, offs_n, offs_d,  # query row indices, key offsets in a tile, head-dim offsets
    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_pn,
    nq, nk, prefix, qk_scale,  # sizes, this batch row's prefix length, scale * log2 e
    MASKED: tl.constexpr,  # apply the per-element visibility test and key bounds
    MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    cols = start_n + offs_n
    col_ok = cols < nk
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :] if MASKED else d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    pad = _key_padding(pad_base, cols, stride_pn, nk, MASKED) if HAS_PAD else col_ok
    s = _masked_scores(s, rows[:, None], cols[None, :], pad[None, :], bias_base, stride_bm, stride_bn, nq, nk, prefix,
                       MASKED, MASK_MODE, HAS_BIAS, HAS_PAD)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # inputs, [B, Hq, Nq, D] and [B, Hkv, Nk, D] (any strides)
    bias_ptr,  # additive scores viewed as [B, Hq, Nq, Nk] (zero strides where broadcast), or 0
    prefix_ptr,  # int64 [B] prefix lengths (mask_mode 1), or 0
    pad_ptr,  # uint8 [B, Nk] key padding mask, 1 = real token, or 0
    out_ptr,  # out: [B, Hq, Nq, D] in q's dtype
    lse_ptr,  # out: float32 [B, Hq, Nq] natural-log log-sum-exp, -inf for rows that see nothing
    stride_qb, stride_qh, stride_qm, stride_qd,  # elements between batches / heads / rows / dims of q
    stride_kb, stride_kh, stride_kn, stride_kd,  # same for k
    stride_vb, stride_vh, stride_vn, stride_vd,  # same for v
    stride_bb, stride_bh, stride_bm, stride_bn,  # same for bias (0 where broadcast)
    stride_pb, stride_pn,  # padding mask: elements between batch rows / keys
    stride_ob, stride_oh, stride_om, stride_od,  # same for out
    stride_lb, stride_lh, stride_lm,  # same for lse
    hq, nq, nk,  # query heads, query rows, keys
    group,  # query heads per key/value head (Hq // Hkv)
    qk_scale,  # scale * log2 e
    MASK_MODE: tl.constexpr,  # 0 causal, 1 prefix, 2 bidirectional
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,  # whether bias / key_padding_mask are given
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two (>= 16); extra dims are masked
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query rows / keys per tile
    PRECISION: tl.constexpr,  # tl.dot input precision for float32 inputs (see _precision)
):
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # last query tiles (most keys) first
    pid_bh = tl.program_id(0)
    b = (pid_bh // hq).to(tl.int64)
    h = (pid_bh % hq).to(tl.int64)
    hk = h // group
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < nq
    d_ok = offs_d < HEAD_DIM

    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    bias_base = bias_ptr + b * stride_bb + h * stride_bh if HAS_BIAS else bias_ptr
    pad_base = pad_ptr + b * stride_pb if HAS_PAD else pad_ptr
    prefix = tl.load(prefix_ptr + b).to(tl.int32) if MASK_MODE == _PREFIX else 0

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end, hi = _key_range(m0, nq, nk, prefix, MASK_MODE, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):  # tiles every row sees: no per-element test
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, bias_base, pad_base, start_n, rows, offs_n,
                                  offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                  stride_pn, nq, nk, prefix, qk_scale, False, MASK_MODE, HAS_BIAS, HAS_PAD,
                                  HEAD_DIM, PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):  # tiles on the mask's edge
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, bias_base, pad_base, start_n, rows, offs_n,
                                  offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                  stride_pn, nq, nk, prefix, qk_scale, True, MASK_MODE, HAS_BIAS, HAS_PAD,
                                  HEAD_DIM, PRECISION)

    empty = l_i == 0.0  # the row saw no key (or only -inf scores)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    o_base = out_ptr + b * stride_ob + h * stride_oh
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + rows * stride_lm, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Decode (Nq <= DECODE_ROWS, e.g. one new token against a KV cache): split-KV. The query rows fit
# one 16-row tile instead of a 128-row one (which would be 127/128 padding), and the keys are
# split over several programs so that a few (batch, head) pairs still fill the device. Program
# (bh, s) runs the online softmax over its key range and writes its unnormalised partial output
# acc_s with (m_s, l_s); _combine_kernel merges the splits:
#   m = max_s m_s,  l = sum_s l_s 2^(m_s - m),  out = sum_s acc_s 2^(m_s - m) / l,  lse = (m + log2 l) ln 2.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_split_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, prefix_ptr, pad_ptr,  # as in _fwd_kernel
    acc_ptr,  # out: float32 [S, B * Hq, BLOCK_M, BLOCK_D] partial outputs (contiguous)
    ml_ptr,  # out: float32 [S, B * Hq, BLOCK_M, 2] partial row max (base 2) and row sum (contiguous)
    stride_qb, stride_qh, stride_qm, stride_qd,  # elements between batches / heads / rows / dims of q
    stride_kb, stride_kh, stride_kn, stride_kd,  # same for k
    stride_vb, stride_vh, stride_vn, stride_vd,  # same for v
    stride_bb, stride_bh, stride_bm, stride_bn,  # same for bias (0 where broadcast)
    stride_pb, stride_pn,  # padding mask: elements between batch rows / keys
    hq, nq, nk, group, qk_scale,  # as in _fwd_kernel
    keys_per_split,  # keys each split covers (a multiple of BLOCK_N)
    MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // hq).to(tl.int64)
    h = (pid_bh % hq).to(tl.int64)
    hk = h // group
    rows = tl.arange(0, BLOCK_M)  # every query row (nq <= BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(rows < nq)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    bias_base = bias_ptr + b * stride_bb + h * stride_bh if HAS_BIAS else bias_ptr
    pad_base = pad_ptr + b * stride_pb if HAS_PAD else pad_ptr
    prefix = tl.load(prefix_ptr + b).to(tl.int32) if MASK_MODE == _PREFIX else 0

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end, hi = _key_range(0, nq, nk, prefix, MASK_MODE, BLOCK_M, BLOCK_N)
    lo = split * keys_per_split
    end = tl.minimum(lo + keys_per_split, hi)
    for start_n in range(lo, tl.minimum(full_end, end), BLOCK_N):  # tiles every row sees
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, bias_base, pad_base, start_n, rows, offs_n,
                                  offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                  stride_pn, nq, nk, prefix, qk_scale, False, MASK_MODE, HAS_BIAS, HAS_PAD,
                                  HEAD_DIM, PRECISION)
    for start_n in range(tl.maximum(full_end, lo), end, BLOCK_N):  # tiles on the mask's edge
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, bias_base, pad_base, start_n, rows, offs_n,
                                  offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                  stride_pn, nq, nk, prefix, qk_scale, True, MASK_MODE, HAS_BIAS, HAS_PAD,
                                  HEAD_DIM, PRECISION)
    part = (split.to(tl.int64) * tl.num_programs(0) + pid_bh) * BLOCK_M + rows  # [BLOCK_M] row index in the buffers
    tl.store(acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(ml_ptr + part * 2, m_i)
    tl.store(ml_ptr + part * 2 + 1, l_i)


@triton.jit
def _combine_kernel(
    acc_ptr, ml_ptr,  # the partials of _fwd_split_kernel
    out_ptr, lse_ptr,  # out: [B, Hq, Nq, D] in q's dtype, float32 [B, Hq, Nq]
    stride_ob, stride_oh, stride_om, stride_od,  # elements between batches / heads / rows / dims of out
    stride_lb, stride_lh, stride_lm,  # same for lse
    hq, nq, splits,  # heads, query rows, number of splits
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    bh_count = tl.num_programs(0)
    b = (pid_bh // hq).to(tl.int64)
    h = (pid_bh % hq).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, splits):
        part = (s * bh_count + pid_bh).to(tl.int64) * BLOCK_M + rows
        m = tl.maximum(m, tl.load(ml_ptr + part * 2))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(0, splits):
        part = (s * bh_count + pid_bh).to(tl.int64) * BLOCK_M + rows
        w = tl.math.exp2(tl.load(ml_ptr + part * 2) - m_safe)  # 0 for a split that saw nothing
        l_sum += tl.load(ml_ptr + part * 2 + 1) * w
        acc += tl.load(acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :]) * w[:, None]
    empty = l_sum == 0.0
    out = acc / tl.where(empty, 1.0, l_sum)[:, None]
    lse = tl.where(empty, float("-inf"), (m_safe + tl.math.log2(tl.where(empty, 1.0, l_sum))) * _LN2)
    row_ok = rows < nq
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + rows * stride_lm, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward. With P = exp(S - lse) recomputed tile by tile and delta_i = sum_d dO[i, d] O[i, d]:
#   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q,
# and dbias = dS. Rows with lse = -inf (they see nothing) use lse = +inf so that P = 0.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(
    o_ptr, do_ptr,  # out and its gradient, [B, H, Nq, D]
    delta_ptr,  # out: float32 [B * H * Nq] (contiguous), rowsum(dO * O)
    stride_ob, stride_oh, stride_om, stride_od,  # elements between batches / heads / rows / dims of out
    stride_gb, stride_gh, stride_gm, stride_gd,  # same for grad_out
    hq, nq,  # heads, rows
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(0)
    b = (pid_bh // hq).to(tl.int64)
    h = (pid_bh % hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < nq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * nq + rows, tl.sum(o * do, 1), mask=rows < nq)


@triton.jit
def _dkdv_tile(
    dk, dv,  # running gradients [BLOCK_N, BLOCK_D] (fp32)
    k, v,  # this key tile [BLOCK_N, BLOCK_D]
    q_base, do_base, bias_base, lse_base, delta_base,  # this (batch, query head)'s tensors
    start_m,  # first query row of this tile
    cols, pad, offs_m, offs_d,  # key indices, padding of those keys, row offsets, head-dim offsets
    stride_qm, stride_qd, stride_gm, stride_gd, stride_bm, stride_bn,
    nq, nk, prefix, qk_scale,
    MASKED: tl.constexpr, MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = start_m + offs_m
    row_ok = rows < nq
    qd_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_gm + offs_d[None, :] * stride_gd, mask=qd_mask, other=0.0)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # S^T in base 2, [BLOCK_N, BLOCK_M]
    st = _masked_scores(st, rows[None, :], cols[:, None], pad[:, None], bias_base, stride_bm, stride_bn, nq, nk, prefix,
                        MASKED, MASK_MODE, HAS_BIAS, HAS_PAD)
    pt = tl.math.exp2(st - lse[None, :])  # P^T
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # dP^T
    dst = pt * (dpt - delta[None, :])  # dS^T
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # inputs, [B, Hq, Nq, D] and [B, Hkv, Nk, D] (any strides)
    do_ptr,  # grad_out [B, Hq, Nq, D]
    bias_ptr, prefix_ptr, pad_ptr,  # as in _fwd_kernel (0 when absent)
    lse_ptr, delta_ptr,  # float32 [B * Hq * Nq] (contiguous): forward log-sum-exp, rowsum(dO * O)
    dk_ptr, dv_ptr,  # out: [B, Hkv, Nk, D], summed over the query heads of each group
    stride_qb, stride_qh, stride_qm, stride_qd,  # elements between batches / heads / rows / dims of q
    stride_kb, stride_kh, stride_kn, stride_kd,  # same for k
    stride_vb, stride_vh, stride_vn, stride_vd,  # same for v
    stride_gb, stride_gh, stride_gm, stride_gd,  # same for grad_out
    stride_bb, stride_bh, stride_bm, stride_bn,  # same for bias (0 where broadcast)
    stride_pb, stride_pn,  # padding mask: elements between batch rows / keys
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # same for dk and dv (allocated alike)
    hq, nq, nk, group, qk_scale, scale,  # as in _fwd_kernel; scale = the softmax scale
    MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per (batch * key/value head, key tile); it loops over the `group` query heads
    # that read this head and, for each, over the query tiles that see any key of the tile, so
    # dK and dV are summed in registers (no atomics, no copy of K/V per query head).
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(0)
    hkv = hq // group
    b = (pid_bh // hkv).to(tl.int64)
    hk = (pid_bh % hkv).to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kd_mask = (cols < nk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kd_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kd_mask, other=0.0)
    if HAS_PAD:
        pad = tl.load(pad_ptr + b * stride_pb + cols * stride_pn, mask=cols < nk, other=0) != 0
    else:
        pad = cols < nk
    prefix = tl.load(prefix_ptr + b).to(tl.int32) if MASK_MODE == _PREFIX else 0
    start, full_start = _query_range(n0, nq, nk, prefix, MASK_MODE, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_gb + h * stride_gh
        bias_base = bias_ptr + b * stride_bb + h * stride_bh if HAS_BIAS else bias_ptr
        row_base = (b * hq + h) * nq
        for start_m in range(start, full_start, BLOCK_M):  # query tiles on the mask's edge
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, bias_base, lse_ptr + row_base, delta_ptr + row_base,
                                start_m, cols, pad, offs_m, offs_d, stride_qm, stride_qd, stride_gm, stride_gd,
                                stride_bm, stride_bn, nq, nk, prefix, qk_scale, True, MASK_MODE, HAS_BIAS, HAS_PAD,
                                HEAD_DIM, PRECISION)
        for start_m in range(full_start, nq, BLOCK_M):  # query tiles that see every key of the tile
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, bias_base, lse_ptr + row_base, delta_ptr + row_base,
                                start_m, cols, pad, offs_m, offs_d, stride_qm, stride_qd, stride_gm, stride_gd,
                                stride_bm, stride_bn, nq, nk, prefix, qk_scale, False, MASK_MODE, HAS_BIAS, HAS_PAD,
                                HEAD_DIM, PRECISION)
    out_off = b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kd_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kd_mask)


@triton.jit
def _dq_tile(
    dq,  # running gradient [BLOCK_M, BLOCK_D] (fp32)
    db_rows,  # running row sums of dS [BLOCK_M] (fp32), for a bias gradient without a key axis
    q, do, lse, delta,  # this query tile, its grad_out, base-2 lse (+inf for empty rows), delta
    k_base, v_base, bias_base, pad_base, dbias_base,  # this (batch, head)'s tensors
    start_n, rows, offs_n, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_pn, stride_dbm, stride_dbn,
    nq, nk, prefix, qk_scale,
    MASKED: tl.constexpr, MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    DBIAS: tl.constexpr, DB_ROWS: tl.constexpr, DB_COLS: tl.constexpr, DB_ATOMIC: tl.constexpr,
):
    cols = start_n + offs_n
    col_ok = cols < nk
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :] if MASKED else d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    pad = _key_padding(pad_base, cols, stride_pn, nk, MASKED) if HAS_PAD else col_ok
    s = _masked_scores(s, rows[:, None], cols[None, :], pad[None, :], bias_base, stride_bm, stride_bn, nq, nk, prefix,
                       MASKED, MASK_MODE, HAS_BIAS, HAS_PAD)
    p = tl.math.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    if DBIAS:  # dbias = dS, summed over the axes the bias is broadcast along (see _dq_kernel)
        if DB_COLS:
            if DB_ROWS:
                ptrs = dbias_base + rows[:, None] * stride_dbm + cols[None, :] * stride_dbn
                in_bounds = (rows[:, None] < nq) & col_ok[None, :]
                if DB_ATOMIC:
                    tl.atomic_add(ptrs, ds, mask=in_bounds)
                else:
                    tl.store(ptrs, ds, mask=in_bounds)
            else:  # one row of gradient per key: other query tiles add to it too
                tl.atomic_add(dbias_base + cols * stride_dbn, tl.sum(ds, 0), mask=col_ok)
        else:
            db_rows += tl.sum(ds, 1)
    return dq, db_rows


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr,  # inputs, [B, Hq, Nq, D] and [B, Hkv, Nk, D] (any strides)
    do_ptr,  # grad_out [B, Hq, Nq, D]
    bias_ptr, prefix_ptr, pad_ptr,  # as in _fwd_kernel (0 when absent)
    lse_ptr, delta_ptr,  # float32 [B * Hq * Nq] (contiguous): forward log-sum-exp, rowsum(dO * O)
    dq_ptr,  # out: [B, Hq, Nq, D]
    dbias_ptr,  # out: float32 bias gradient in the bias's broadcast shape, zero-initialised, or 0
    stride_qb, stride_qh, stride_qm, stride_qd,  # elements between batches / heads / rows / dims of q
    stride_kb, stride_kh, stride_kn, stride_kd,  # same for k
    stride_vb, stride_vh, stride_vn, stride_vd,  # same for v
    stride_gb, stride_gh, stride_gm, stride_gd,  # same for grad_out
    stride_bb, stride_bh, stride_bm, stride_bn,  # same for bias (0 where broadcast)
    stride_pb, stride_pn,  # padding mask: elements between batch rows / keys
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,  # same for dq
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,  # same for dbias (0 along its broadcast axes)
    hq, nq, nk, group, qk_scale, scale,  # as in _fwd_kernel; scale = the softmax scale
    MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DBIAS: tl.constexpr,  # compute the bias gradient (only when the bias requires grad)
    DB_ROWS: tl.constexpr, DB_COLS: tl.constexpr,  # the bias varies along Nq / along Nk (else dS is summed)
    DB_ATOMIC: tl.constexpr,  # the bias is shared by several (batch, head) programs: add atomically
):
    # One program per (batch * query head, query tile), visiting the key tiles of _key_range as
    # the forward does. It also accumulates dbias = dS for those tiles (hidden ones are zero),
    # reduced in registers over the axes the bias is broadcast along: a per-key bias (ALiBi,
    # [.., 1, Nk]) gets one atomic add of dS's column sums per tile, a per-query one a single
    # add of its row sums at the end, so nothing of [B, Hq, Nq, Nk] is allocated for them.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # last query tiles (most keys) first
    pid_bh = tl.program_id(0)
    b = (pid_bh // hq).to(tl.int64)
    h = (pid_bh % hq).to(tl.int64)
    hk = h // group
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < nq
    qd_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                 mask=qd_mask, other=0.0)
    row_base = pid_bh.to(tl.int64) * nq
    lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E
    delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    bias_base = bias_ptr + b * stride_bb + h * stride_bh if HAS_BIAS else bias_ptr
    dbias_base = dbias_ptr + b * stride_dbb + h * stride_dbh if DBIAS else dbias_ptr
    pad_base = pad_ptr + b * stride_pb if HAS_PAD else pad_ptr
    prefix = tl.load(prefix_ptr + b).to(tl.int32) if MASK_MODE == _PREFIX else 0

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    db_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end, hi = _key_range(m0, nq, nk, prefix, MASK_MODE, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        dq, db_rows = _dq_tile(dq, db_rows, q, do, lse, delta, k_base, v_base, bias_base, pad_base, dbias_base, start_n,
                               rows, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                               stride_pn, stride_dbm, stride_dbn, nq, nk, prefix, qk_scale, False, MASK_MODE, HAS_BIAS,
                               HAS_PAD, HEAD_DIM, PRECISION, DBIAS, DB_ROWS, DB_COLS, DB_ATOMIC)
    for start_n in range(full_end, hi, BLOCK_N):
        dq, db_rows = _dq_tile(dq, db_rows, q, do, lse, delta, k_base, v_base, bias_base, pad_base, dbias_base, start_n,
                               rows, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                               stride_pn, stride_dbm, stride_dbn, nq, nk, prefix, qk_scale, True, MASK_MODE, HAS_BIAS,
                               HAS_PAD, HEAD_DIM, PRECISION, DBIAS, DB_ROWS, DB_COLS, DB_ATOMIC)
    if DBIAS and not DB_COLS:  # a bias without a key axis: the row sums of dS
        if DB_ROWS:
            if DB_ATOMIC:
                tl.atomic_add(dbias_base + rows * stride_dbm, db_rows, mask=row_ok)
            else:
                tl.store(dbias_base + rows * stride_dbm, db_rows, mask=row_ok)
        else:
            tl.atomic_add(dbias_base, tl.sum(db_rows, 0))
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------------------------------------
# Python side
# ---------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs, by (kernel, bias given), for head
# dims up to 64 / 128 / 256. Untuned starting points for H100/H200 (FlashAttention-2 tutorial
# sizes), trimmed until sm_90 builds use at most ~100 bytes of stack (a bias tile costs registers).
_CONFIGS = {
    ("fwd", False): ((128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 2)),
    ("fwd", True): ((128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 2)),
    ("dkdv", False): ((64, 64, 4, 2), (64, 32, 8, 2), (32, 32, 8, 1)),
    ("dkdv", True): ((32, 32, 4, 2), (64, 32, 8, 2), (32, 32, 8, 1)),
    ("dq", False): ((64, 32, 4, 3), (64, 32, 8, 2), (32, 32, 8, 1)),
    ("dq", True): ((64, 32, 4, 3), (32, 32, 4, 2), (32, 32, 8, 1)),
}


def _blocks(kernel: str, d: int, dtype: torch.dtype, has_bias: bool) -> tuple[int, int, int, int]:
    """Launch configuration of `kernel` ("fwd", "dkdv" or "dq"); 16 x 16 tiles in the interpreter.
    float32 tiles take twice the memory: half the query rows (and, in the dK/dV kernel, which
    keeps its key tile in registers, half the keys) and at most two stages; all fit the 227 KiB of
    shared memory per block of sm_90, though the float32 forward still spills (it is not tuned)."""
    if interpreting():
        return 16, 16, 4, 1
    bm, bn, warps, stages = _CONFIGS[kernel, has_bias][0 if d <= 64 else 1 if d <= 128 else 2]
    if dtype == torch.float32:
        bm, stages = max(16, bm // 2), min(stages, 2)
        if kernel == "dkdv":
            bn = max(16, bn // 2)
    return bm, bn, warps, stages


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs follow torch's TF32 setting for matmuls; when it is off (the default) the dots
    # use "tf32x3" (three TF32 products: float32 accuracy on tensor cores; exact "ieee" dots build
    # kernels that spill tens of KiB on sm_90). 16-bit inputs ignore the setting.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _kernel_input(t: torch.Tensor | None) -> torch.Tensor | None:
    # numpy (the interpreter) has no bfloat16; float16 dots are widened too, exactly.
    if t is not None and t.dtype in (torch.bfloat16, torch.float16) and interpreting():
        return t.float()
    return t


def _bias_strides(bias):
    return list(bias.stride()) if bias is not None else [0, 0, 0, 0]


def _mask_args(prefix_len, key_padding_mask, q):
    """Pointers (0 = absent) and padding strides for the kernels."""
    prefix = prefix_len.to(torch.int64).contiguous() if prefix_len is not None else None
    pad = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else None
    dummy = q  # any tensor: the kernels never read an absent input
    pad_strides = list(pad.stride()) if pad is not None else [0, 0]
    return (prefix if prefix is not None else dummy), (pad if pad is not None else dummy), pad_strides


DECODE_ROWS = 16  # up to this many query rows the forward takes the split-KV decode kernels
SM_COUNT_GUESS = 132  # H100 SXM; the number of splits only aims at a few programs per SM


def _decode_splits(programs: int, nk: int, block_n: int, device: torch.device) -> int:
    """Splits of the key range so that about two programs per SM run, each over >= 4 key tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else SM_COUNT_GUESS
    tiles = triton.cdiv(nk, block_n)
    return max(1, min(triton.cdiv(2 * sms, programs), tiles // 4))


def _decode(q, k, v, mask_mode, prefix, pad, pad_strides, bias, has_pad, scale, out, lse, block_n, splits):
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    bd = _block_d(d)
    bm = 16
    if interpreting():
        bn, warps, stages = block_n or 16, 4, 1
    else:
        bn = block_n or (64 if d <= 128 and q.dtype != torch.float32 else 32)  # float32 tiles: twice the registers
        warps, stages = 4, (3 if q.dtype != torch.float32 else 2)
    splits = splits or _decode_splits(b * hq, nk, bn, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(nk, splits), bn) * bn
    splits = max(1, triton.cdiv(nk, keys_per_split))
    acc = torch.empty((splits, b * hq, bm, bd), dtype=torch.float32, device=q.device)
    ml = torch.empty((splits, b * hq, bm, 2), dtype=torch.float32, device=q.device)
    _fwd_split_kernel[(b * hq, splits)](
        q, k, v, bias if bias is not None else q, prefix, pad, acc, ml,
        *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias), *pad_strides,
        hq, nq, nk, hq // hkv, scale * LOG2E, keys_per_split,
        MASK_MODE=mask_mode, HAS_BIAS=bias is not None, HAS_PAD=has_pad, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm,
        BLOCK_N=bn, PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    _combine_kernel[(b * hq,)](
        acc, ml, out, lse, *out.stride(), *lse.stride(), hq, nq, splits, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm,
    )


def forward(q, k, v, mask_mode: int, prefix_len, key_padding_mask, bias, scale: float, *,
            block_m: int | None = None, block_n: int | None = None, splits: int | None = None):
    """Returns ``(out [B, Hq, Nq, D] in q.dtype, lse [B, Hq, Nq] float32)``.

    q, k, v: any strides; prefix_len: int64 [B] (mask_mode 1) or None; key_padding_mask: bool
    [B, Nk] or None; bias: a float view of shape [B, Hq, Nq, Nk] (zero strides allowed) or None.
    Up to DECODE_ROWS query rows (and no block_m given) run the split-KV decode kernels, with
    `splits` key splits (default: enough programs for the device).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dtype = q.dtype
    q, k, v, bias = _kernel_input(q), _kernel_input(k), _kernel_input(v), _kernel_input(bias)
    out = torch.empty((b, hq, nq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    prefix, pad, pad_strides = _mask_args(prefix_len, key_padding_mask, q)
    if nq <= DECODE_ROWS and block_m is None:
        _decode(q, k, v, mask_mode, prefix, pad, pad_strides, bias, key_padding_mask is not None, scale, out, lse,
                block_n, splits)
        return out.to(dtype), lse
    bm, bn, warps, stages = _blocks("fwd", d, q.dtype, bias is not None)
    bm, bn = block_m or bm, block_n or bn
    grid = (b * hq, triton.cdiv(nq, bm))  # batch x heads on axis 0: axes 1 and 2 stop at 65535
    _fwd_kernel[grid](
        q, k, v, bias if bias is not None else q, prefix, pad, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias), *pad_strides, *out.stride(), *lse.stride(),
        hq, nq, nk, hq // hkv, scale * LOG2E,
        MASK_MODE=mask_mode, HAS_BIAS=bias is not None, HAS_PAD=key_padding_mask is not None,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=bm, BLOCK_N=bn, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out.to(dtype), lse


def backward(grad_out, q, k, v, out, lse, mask_mode: int, prefix_len, key_padding_mask, bias, scale: float, *,
             bias_grad_shape: tuple[int, int, int, int] | None = None,
             block_m: int | None = None, block_n: int | None = None):
    """Returns ``(dq, dk, dv, dbias)``: dq/dk/dv in the input dtypes (dk, dv [B, Hkv, Nk, D]
    summed over each group's query heads) and dbias, the float32 gradient of the bias.

    Arguments as in :func:`forward`, plus the forward's out and lse. ``bias_grad_shape``: None when
    the bias needs no gradient (dbias is then None and nothing is computed for it), else the bias's
    shape as four dims, each 1 (broadcast) or the full size of [B, Hq, Nq, Nk]: dbias comes in that
    shape, summed over the broadcast dims inside the kernel (no [B, Hq, Nq, Nk] buffer unless the
    bias itself is that big)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dtypes = q.dtype, k.dtype, v.dtype
    q, k, v, bias = _kernel_input(q), _kernel_input(k), _kernel_input(v), _kernel_input(bias)
    grad_out, out = _kernel_input(grad_out), _kernel_input(out)
    lse = lse.to(torch.float32).contiguous()
    bd = _block_d(d)
    prefix, pad, pad_strides = _mask_args(prefix_len, key_padding_mask, q)
    has_bias, has_pad = bias is not None, key_padding_mask is not None
    precision = _precision(q.dtype)
    qk_scale = scale * LOG2E

    delta = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    delta_rows = 16 if interpreting() else max(16, 4096 // bd)
    _delta_kernel[(b * hq, triton.cdiv(nq, delta_rows))](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), hq, nq, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=delta_rows,
    )

    bm, bn, warps, stages = _blocks("dkdv", d, q.dtype, has_bias)
    bm, bn = block_m or bm, block_n or bn
    dk = torch.empty((b, hkv, nk, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, hkv, nk, d), dtype=v.dtype, device=q.device)
    _dkdv_kernel[(b * hkv, triton.cdiv(nk, bn))](
        q, k, v, grad_out, bias if has_bias else q, prefix, pad, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *_bias_strides(bias), *pad_strides, *dk.stride(),
        hq, nq, nk, hq // hkv, qk_scale, scale,
        MASK_MODE=mask_mode, HAS_BIAS=has_bias, HAS_PAD=has_pad, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn,
        PRECISION=precision, num_warps=warps, num_stages=stages,
    )

    bm, bn, warps, stages = _blocks("dq", d, q.dtype, has_bias)
    bm, bn = block_m or bm, block_n or bn
    dq = torch.empty((b, hq, nq, d), dtype=q.dtype, device=q.device)
    dbias, db_strides, db_flags = None, (0, 0, 0, 0), (False, False, False)
    if has_bias and bias_grad_shape is not None:
        full = (b, hq, nq, nk)
        shape = tuple(int(s) for s in bias_grad_shape)
        if len(shape) != 4 or any(s not in (1, f) for s, f in zip(shape, full)):
            raise ValueError(f"bias_grad_shape must be 4 dims each 1 or of {list(full)}, got {list(shape)}")
        dbias = torch.zeros(shape, dtype=torch.float32, device=q.device)
        db_strides = tuple(st if sz > 1 else 0 for st, sz in zip(dbias.stride(), shape))
        db_flags = (nq > 1 and shape[2] > 1, nk > 1 and shape[3] > 1,
                    (b > 1 and shape[0] == 1) or (hq > 1 and shape[1] == 1))
    _dq_kernel[(b * hq, triton.cdiv(nq, bm))](
        q, k, v, grad_out, bias if has_bias else q, prefix, pad, lse, delta, dq, dbias if dbias is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *_bias_strides(bias), *pad_strides, *dq.stride(),
        *db_strides, hq, nq, nk, hq // hkv, qk_scale, scale,
        MASK_MODE=mask_mode, HAS_BIAS=has_bias, HAS_PAD=has_pad, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn,
        PRECISION=precision, DBIAS=dbias is not None, DB_ROWS=db_flags[0], DB_COLS=db_flags[1], DB_ATOMIC=db_flags[2],
        num_warps=warps, num_stages=stages,
    )
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), dbias
