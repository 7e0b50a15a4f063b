"""The row pass of the fused linear cross-entropy in Triton: one program per row of a chunk of logits.

Semantics are the reference's (python/fusedlm/reference/linear_cross_entropy.py); the chunk loop
and the head GEMMs around this pass are ``ops/linear_cross_entropy.py``'s. A program walks its row
in blocks of BLOCK entries three times:

1. the largest value and its first index (the argmax), and whether a NaN or +inf is there;
2. ``s = Σ exp(x - max)``, ``lse = max + log s``, the loss ``lse - x[target]``;
3. with scales: ``x <- scale (exp(x - lse) - [v == target])`` in place (the row's gradient).

Ignored rows (target == ignore_index) get loss 0, lse 0, argmax -1 and a zero gradient; a row with
NaN or +inf logits gets NaN. Math in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import interpreting


@triton.jit
def _rows_kernel(
    logits_ptr,  # [C, V] logits (float32/float16/bfloat16), rows stride_row elements apart; the gradient is written here
    targets_ptr,  # [C] int64 targets
    scales_ptr,  # [C] float32 gradient factor of each row (unused without HAS_SCALES)
    loss_ptr,  # out [C] float32
    lse_ptr,  # out [C] float32
    argmax_ptr,  # out [C] int64
    V,  # vocabulary size
    stride_row,  # elements between two rows of logits
    ignore_index,  # the target value that takes no loss
    HAS_SCALES: tl.constexpr,
    BLOCK: tl.constexpr,  # entries per block
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    offs0 = tl.arange(0, BLOCK)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(argmax_ptr + row, -1)
        if HAS_SCALES:
            for v0 in range(0, V, BLOCK):
                offs = v0 + offs0
                tl.store(row_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32).to(logits_ptr.dtype.element_ty), mask=offs < V)
    else:
        # 1. max, first argmax, non-finite check
        best = float("-inf")
        best_at = 0
        bad = 0
        for v0 in range(0, V, BLOCK):
            offs = v0 + offs0
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32))
            block_best = tl.max(x, 0)
            block_at = tl.min(tl.where(x == block_best, offs, V), 0)
            take = block_best > best
            best_at = tl.where(take, block_at, best_at)
            best = tl.where(take, block_best, best)
        # 2. logsumexp and the loss
        total = 0.0
        for v0 in range(0, V, BLOCK):
            offs = v0 + offs0
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            total += tl.sum(tl.where(offs < V, tl.exp(x - best), 0.0), 0)
        lse = best + tl.log(total)
        picked = tl.load(row_ptr + target).to(tl.float32)
        nan = float("nan")
        tl.store(loss_ptr + row, tl.where(bad > 0, nan, lse - picked))
        tl.store(lse_ptr + row, tl.where(bad > 0, nan, lse))
        tl.store(argmax_ptr + row, best_at.to(tl.int64))
        # 3. the gradient, in place
        if HAS_SCALES:
            scale = tl.load(scales_ptr + row)
            for v0 in range(0, V, BLOCK):
                offs = v0 + offs0
                x = tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
                g = scale * (tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0))
                g = tl.where(bad > 0, nan, g)
                tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=offs < V)


def rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, scales: torch.Tensor | None, loss: torch.Tensor,
         lse: torch.Tensor, argmax: torch.Tensor) -> None:
    """The row pass over logits [C, V] (unit stride along V), writing loss, lse and argmax [C] and,
    with scales, each row's gradient over its logits."""
    c, n_vocab = logits.shape
    if c == 0:
        return
    block = min(128 if interpreting() else 4096, triton.next_power_of_2(n_vocab))
    _rows_kernel[(c,)](logits, targets, scales if scales is not None else loss, loss, lse, argmax, n_vocab, logits.stride(0),
                       ignore_index, HAS_SCALES=scales is not None, BLOCK=block)
