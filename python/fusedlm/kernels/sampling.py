"""Fused token sampling in Triton: one program per row, no sort.

Semantics are the reference's (python/fusedlm/reference/sampling.py). A program walks its row in
chunks of BLOCK several times; every search is a bisection over the 32-bit order-preserving key
of the float values (``key(x) < key(y)`` iff ``x < y``, with -0.0 taken as +0.0), so it is exact:

1. x = logits / T (``div_rn``), row max, NaN / +inf checks (greedy rows: first argmax, done);
2. top-k: the largest key K with ``count(key >= K) >= k`` is the k-th largest value (32 passes);
3. top-p: with ``f(K)`` = mass (``exp(x - max)``) of the survivors above key K and Z their total,
   the smallest K0 with ``f(K0) < p Z`` (32 passes); the cut value v is the smallest survivor
   value with key >= K0; of its c ties (mass q each, f(v) above them) the first
   ``j = clamp(ceil((p Z - f(v)) / q), 1, c)`` in the ranking (highest index first) are kept,
   i.e. those with index >= the j-th largest tie index (bisection over the index, ~log2 V passes);
4. draw: u (the row's SplitMix64 uniform, computed by the caller) times the kept mass; a scan in
   index order with a running sum finds the first token whose cumulative mass exceeds it.
Masses are float32 per chunk, summed in float64 across chunks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.sampling import GOLDEN
from ._util import interpreting

MAX_BLOCK = 1024  # elements a program handles per chunk


@triton.jit
def _key(x):
    """Order-preserving int64 key in [0, 2^32) of float32 x (-0.0 normalised to +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits >= 0, bits + 2147483648, -1 - bits)


@triton.jit
def _load_x(row_ptr, offs, V, t):
    logit = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(logit, tl.zeros_like(logit) + t)


@triton.jit
def _sample_kernel(
    logits_ptr,  # [B, V] logits (float32/float16/bfloat16), rows stride_row elements apart
    t_ptr,  # [B] float32 temperatures (0 = greedy)
    k_ptr,  # [B] int64 top-k (0 or >= V = off)
    p_ptr,  # [B] float64 top-p (1 = off)
    u_ptr,  # [B] float64 uniforms of the draw
    tokens_ptr,  # out [B] int64 (if WANT_TOKENS)
    out_ptr,  # out [B, V] float32 filtered logits (if WANT_FILTER)
    status_ptr,  # out [B] int32: 0 ok, 1 NaN, 2 +inf, 3 no finite value, 4 overflow
    V,  # vocabulary size
    stride_row,  # elements between two rows of logits
    WANT_TOKENS: tl.constexpr,
    WANT_FILTER: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per chunk
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    t = tl.load(t_ptr + row)
    greedy = t == 0.0
    t = tl.where(greedy, 1.0, t)
    top_k = tl.load(k_ptr + row)
    top_p = tl.load(p_ptr + row)
    lanes = tl.arange(0, BLOCK)

    # 1. max and checks
    vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    bad_nan = tl.zeros([BLOCK], tl.int32)
    bad_inf = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        logit = tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
        bad_nan |= (logit != logit).to(tl.int32)
        bad_inf |= (logit == float("inf")).to(tl.int32)
        vmax = tl.maximum(vmax, _load_x(row_ptr, offs, V, t))
    mx = tl.max(vmax, axis=0)
    status = tl.where(tl.max(bad_nan, axis=0) > 0, 1, tl.where(tl.max(bad_inf, axis=0) > 0, 2,
                      tl.where(mx == float("-inf"), 3, tl.where(mx == float("inf"), 4, 0))))
    tl.store(status_ptr + row, status)

    if status == 0:
        # kept set: key > cut_key, or key == cut_key and index >= cut_index
        cut_key = tl.zeros([], tl.int64)
        cut_index = tl.zeros([], tl.int64)
        kept_mass = tl.zeros([], tl.float64)
        if greedy:
            first = tl.full([BLOCK], 2**62, tl.int64)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                x = _load_x(row_ptr, offs, V, t)
                first = tl.minimum(first, tl.where((x == mx) & (offs < V), offs.to(tl.int64), 2**62))
            cut_index = tl.min(first, axis=0)
            cut_key = _key(mx)
        else:
            # 2. top-k: largest key K with count(key >= K) >= k
            if (top_k > 0) & (top_k < V):
                lo = tl.zeros([], tl.int64)
                hi = tl.full([], 4294967296, tl.int64)
                for _ in range(32):
                    mid = (lo + hi) // 2
                    count = tl.zeros([], tl.int64)
                    for start in range(0, V, BLOCK):
                        offs = start + lanes
                        x = _load_x(row_ptr, offs, V, t)
                        count += tl.sum(((_key(x) >= mid) & (offs < V)).to(tl.int64), axis=0)
                    lo = tl.where(count >= top_k, mid, lo)
                    hi = tl.where(count >= top_k, hi, mid)
                cut_key = lo
            kth_key = cut_key
            # total survivor mass
            total = tl.zeros([], tl.float64)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                x = _load_x(row_ptr, offs, V, t)
                live = (_key(x) >= kth_key) & (offs < V)
                total += tl.sum(tl.where(live, tl.exp(x - mx), 0.0), axis=0).to(tl.float64)
            kept_mass = total
            if top_p < 1.0:
                # 3. top-p: smallest K0 with f(K0) = mass(key > K0) < p Z
                target = top_p * total
                lo = tl.full([], -1, tl.int64)
                hi = tl.full([], 4294967295, tl.int64)
                for _ in range(33):
                    mid = (lo + hi) // 2
                    above = tl.zeros([], tl.float64)
                    for start in range(0, V, BLOCK):
                        offs = start + lanes
                        x = _load_x(row_ptr, offs, V, t)
                        key = _key(x)
                        live = (key >= kth_key) & (key > mid) & (offs < V)
                        above += tl.sum(tl.where(live, tl.exp(x - mx), 0.0), axis=0).to(tl.float64)
                    hi = tl.where((above < target) & (hi - lo > 1), mid, hi)
                    lo = tl.where((above >= target) & (hi - lo > 1), mid, lo)
                # the cut value: smallest survivor key >= K0; its ties, and the mass above it
                vkey = tl.full([BLOCK], 2**40, tl.int64)
                for start in range(0, V, BLOCK):
                    offs = start + lanes
                    key = _key(_load_x(row_ptr, offs, V, t))
                    vkey = tl.minimum(vkey, tl.where((key >= kth_key) & (key >= hi) & (offs < V), key, 2**40))
                cut_key = tl.min(vkey, axis=0)
                above = tl.zeros([], tl.float64)
                ties = tl.zeros([], tl.int64)
                q = tl.zeros([], tl.float32)
                for start in range(0, V, BLOCK):
                    offs = start + lanes
                    x = _load_x(row_ptr, offs, V, t)
                    key = _key(x)
                    e = tl.exp(x - mx)
                    above += tl.sum(tl.where((key > cut_key) & (offs < V), e, 0.0), axis=0).to(tl.float64)
                    tie = (key == cut_key) & (offs < V)
                    ties += tl.sum(tie.to(tl.int64), axis=0)
                    q = tl.maximum(q, tl.max(tl.where(tie, e, 0.0), axis=0))
                q64 = q.to(tl.float64)
                keep_ties = tl.ceil((target - above) / tl.maximum(q64, 1e-300)).to(tl.int64)
                keep_ties = tl.minimum(tl.maximum(keep_ties, 1), ties)
                kept_mass = above + keep_ties.to(tl.float64) * q64
                # the keep_ties-th largest index among the ties
                lo = tl.zeros([], tl.int64)
                hi = tl.zeros([], tl.int64) + V
                if keep_ties < ties:
                    for _ in range(32):
                        if hi - lo > 1:
                            mid = (lo + hi) // 2
                            count = tl.zeros([], tl.int64)
                            for start in range(0, V, BLOCK):
                                offs = start + lanes
                                key = _key(_load_x(row_ptr, offs, V, t))
                                count += tl.sum(((key == cut_key) & (offs >= mid) & (offs < V)).to(tl.int64), axis=0)
                            lo = tl.where(count >= keep_ties, mid, lo)
                            hi = tl.where(count >= keep_ties, hi, mid)
                cut_index = lo

        if WANT_FILTER:
            for start in range(0, V, BLOCK):
                offs = start + lanes
                x = _load_x(row_ptr, offs, V, t)
                key = _key(x)
                keep = (key > cut_key) | ((key == cut_key) & (offs >= cut_index))
                keep = tl.where(greedy, offs == cut_index, keep)
                tl.store(out_ptr + row * V + offs, tl.where(keep, x, float("-inf")), mask=offs < V)
        if WANT_TOKENS:
            # 4. inverse CDF in index order
            goal = tl.load(u_ptr + row) * kept_mass
            acc = tl.zeros([], tl.float64)
            token = tl.full([], -1, tl.int64)
            last = tl.full([], -1, tl.int64)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                x = _load_x(row_ptr, offs, V, t)
                key = _key(x)
                keep = ((key > cut_key) | ((key == cut_key) & (offs >= cut_index))) & (offs < V)
                e = tl.where(keep, tl.exp(x - mx), 0.0)
                running = acc + tl.cumsum(e.to(tl.float64), axis=0)
                hit = (running > goal) & (e > 0)
                first_hit = tl.min(tl.where(hit, offs.to(tl.int64), 2**62), axis=0)
                token = tl.where((token < 0) & (first_hit < 2**62), first_hit, token)
                last = tl.maximum(last, tl.max(tl.where(e > 0, offs.to(tl.int64), -1), axis=0))
                acc += tl.sum(e.to(tl.float64), axis=0)
            token = tl.where(token >= 0, token, last)
            tl.store(tokens_ptr + row, tl.where(greedy, cut_index, token))


def row_uniforms(seed: int, rows: int, device) -> torch.Tensor:
    """The reference's per-row uniforms (SplitMix64 of seed + (r + 1) * GOLDEN), on `device`."""
    def wrap(v):
        return v - (1 << 64) if v >= 1 << 63 else v

    z = torch.arange(1, rows + 1, dtype=torch.int64, device=device) * wrap(GOLDEN) + wrap(seed)

    def shr(v, s):  # logical shift right of int64 as uint64
        return (v >> s) & ((1 << (64 - s)) - 1)

    z = (z ^ shr(z, 30)) * wrap(0xBF58476D1CE4E5B9)
    z = (z ^ shr(z, 27)) * wrap(0x94D049BB133111EB)
    z = z ^ shr(z, 31)
    return shr(z, 11).double() * 2.0**-53


def sample(logits, temperature, top_k, top_p, seed: int, tokens: bool, filtered: bool):
    """Runs the kernel on contiguous logits [B, V]; returns (tokens | None, filtered | None, status)."""

    B, V = logits.shape
    if logits.dtype == torch.bfloat16 and interpreting():
        logits = logits.float()  # the interpreter has no bfloat16; widening is exact
    dev = logits.device
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    out = torch.empty(B, V, dtype=torch.float32, device=dev) if filtered else tok
    status = torch.empty(B, dtype=torch.int32, device=dev)
    u = row_uniforms(seed, B, dev)
    block = min(MAX_BLOCK, triton.next_power_of_2(V))
    _sample_kernel[(B,)](
        logits, temperature, top_k, top_p, u, tok, out, status, V, logits.stride(0),
        WANT_TOKENS=tokens, WANT_FILTER=filtered, BLOCK=block,
    )
    return (tok if tokens else None), (out if filtered else None), status
