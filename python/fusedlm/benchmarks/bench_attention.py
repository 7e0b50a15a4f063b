"""Masked attention on the CPU: fusedlm vs torch SDPA, compiled FlexAttention and the reference.

Every fusedlm row notes its achieved GFLOP/s (4 D flops per visible (query, key) pair forward,
10 D more backward: the S and P V products, then dP, dS K, dS^T Q, P^T dO with S recomputed) and
each case has a limit row: a torch float32 GEMM of the same FLOP count, timed in the same run,
so its ratio is the fraction of the machine's sgemm rate the kernel reaches. Every implementation
is timed alone and right after a torch op, in alternating rounds (see _harness).

Quick set (issue #3's targets), B=1 H=8 N=1024 D=64:
  * forward fp32, causal / bidirectional / prefix (prefix = N/4): fusedlm[cpu] vs
    ``F.scaled_dot_product_attention`` (``is_causal=True``, no mask, or the prefix bool
    ``attn_mask``) and the reference; for the prefix mask also compiled ``flex_attention`` with a
    ``BlockMask`` (its compile time in ``extra``, not in its time);
  * forward+backward fp32, causal: fusedlm[cpu] vs SDPA;
  * forward bf16, causal and bidirectional: fusedlm[cpu] bf16 vs fusedlm[cpu] fp32 (the ratio is
    the bf16 speed-up) and SDPA bf16;
  * peak extra memory of one forward at N=8192 (fp32, causal), measured in a fresh subprocess as the
    rise of the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the inputs,
    minus the output: it includes every buffer of the kernel, torch's or not.
``--full``: B in {1, 4}, D in {64, 128}, N in {512, 1024, 2048, 4096}, the three masks, fp32 and
bf16, forward and forward+backward, with FlexAttention (forward) for every case.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from fusedlm import ops
from fusedlm.reference import attention as ref

from ._harness import Row, sgemm_row, timeit, timeit_after_torch

SUITE = "attention"
H = 8


def _flops(b, n, d, mask, prefix, backward=False) -> float:
    """Useful FLOPs of one call: the visible (query, key) pairs times 4 D (forward) or 14 D."""
    mode = ref.MASK_MODES[mask]
    pairs = b * H * int(ref.visible(n, n, mode, prefix if mode == ref.PREFIX else None).sum())
    return pairs * d * (14 if backward else 4)


def _with_flops(rows, case, flops):
    """Notes GFLOP/s on the case's fusedlm rows and adds the same-FLOPs sgemm limit row."""
    for r in rows:
        if r.case == case and r.impl.startswith("fusedlm[cpu]"):
            r.extra["GFLOP/s"] = flops / r.ms / 1e6
    rows.append(sgemm_row(SUITE, case, flops))


def _interleaved(fns: dict, rounds: int = 5) -> dict:
    """(alone, right after a torch op) median ms of each fn, timed in `rounds` alternating rounds
    (each a short _harness.timeit of both kinds), so that load from other processes on the machine
    hits every implementation alike."""
    times = {name: ([], []) for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            kw = dict(warmup=2 if r == 0 else 1, min_repeat=3, min_seconds=0.05)
            times[name][0].append(timeit(fn, **kw))
            times[name][1].append(timeit_after_torch(fn, **kw))
    return {name: (statistics.median(alone), statistics.median(after)) for name, (alone, after) in times.items()}


def _inputs(b, n, d, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, H, n, d, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def _flex(mask: str, n: int, prefix: int):
    """(compiled flex_attention, its BlockMask), or None when FlexAttention is unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        if mask == "causal":
            return kv_idx <= q_idx
        if mask == "prefix":
            return (kv_idx <= q_idx) | (kv_idx < prefix)
        return kv_idx >= 0

    # A fresh compilation per case: its time is then the real compile time, and dynamo's recompile
    # limit (after which flex_attention silently runs unfused) is never reached.
    torch._dynamo.reset()
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
    return torch.compile(flex_attention, dynamic=False), block_mask


def _forward_case(rows, b, n, d, dtype, mask, *, flex: bool, reference: bool, sdpa: bool = True):
    name = str(dtype).removeprefix("torch.")
    case = f"fwd {mask} B={b} H={H} N={n} D={d} {name}"
    prefix = n // 4
    q, k, v = _inputs(b, n, d, dtype)
    kw = {"prefix_len": prefix} if mask == "prefix" else {}
    fns, extra = {}, {}

    def ours():
        with ops.use_backend("cpu"):
            return ops.attention(q, k, v, mask=mask, **kw)

    fns["fusedlm[cpu]"] = ours
    if sdpa:
        if mask == "prefix":
            bool_mask = ref.visible(n, n, ref.PREFIX, prefix)
            fns["torch SDPA (bool mask)"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
        else:
            impl = "torch SDPA" + (" (is_causal)" if mask == "causal" else "")
            fns[impl] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal")
    if flex:
        compiled = _flex(mask, n, prefix)
        if compiled is None:
            print("  (FlexAttention not available in this torch: skipped)")
        else:
            flex_fn, block_mask = compiled
            start = time.perf_counter()
            with torch.no_grad():
                flex_fn(q, k, v, block_mask=block_mask)
            extra["FlexAttention (compiled)"] = {"compile_s": time.perf_counter() - start}
            fns["FlexAttention (compiled)"] = lambda: flex_fn(q, k, v, block_mask=block_mask)
    if reference and b * H * n * n * 4 <= 2**30:
        def reference_fn():
            with ops.use_backend("reference"):
                return ops.attention(q, k, v, mask=mask, **kw)

        fns["fusedlm[reference]"] = reference_fn
    with torch.no_grad():
        for impl, (ms, after) in _interleaved(fns).items():
            rows.append(Row(SUITE, case, impl, ms, extra.get(impl, {}), ms_after_torch=after))
    _with_flops(rows, case, _flops(b, n, d, mask, prefix))


def _backward_case(rows, b, n, d, dtype, mask):
    name = str(dtype).removeprefix("torch.")
    case = f"fwd+bwd {mask} B={b} H={H} N={n} D={d} {name}"
    prefix = n // 4
    q, k, v = _inputs(b, n, d, dtype, requires_grad=True)
    kw = {"prefix_len": prefix} if mask == "prefix" else {}

    def ours():
        with ops.use_backend("cpu"):
            ops.attention(q, k, v, mask=mask, **kw).sum().backward()

    bool_mask = ref.visible(n, n, ref.PREFIX, prefix) if mask == "prefix" else None

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, is_causal=mask == "causal").sum().backward()

    sdpa_name = "torch SDPA" + (" (bool mask)" if mask == "prefix" else "")
    for impl, (ms, after) in _interleaved({"fusedlm[cpu]": ours, sdpa_name: sdpa}, rounds=3).items():
        rows.append(Row(SUITE, case, impl, ms, ms_after_torch=after))
    _with_flops(rows, case, _flops(b, n, d, mask, prefix, backward=True))


def _bf16_case(rows, n, d, mask):
    """bf16 forward against our own fp32 forward (the peer row's ratio is the bf16 speed-up)."""
    case = f"fwd {mask} B=1 H={H} N={n} D={d} bf16 vs fp32"
    q, k, v = _inputs(1, n, d, torch.float32)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    fns = {
        "fusedlm[cpu] bf16": lambda: ops.attention(qb, kb, vb, mask=mask),
        "fusedlm[cpu] fp32": lambda: ops.attention(q, k, v, mask=mask),
        "torch SDPA bf16": lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=mask == "causal"),
    }
    with torch.no_grad(), ops.use_backend("cpu"):
        for impl, (ms, after) in _interleaved(fns).items():
            rows.append(Row(SUITE, case, impl, ms, ms_after_torch=after))
    _with_flops(rows, case, _flops(1, n, d, mask, n // 4))


# Run in a fresh interpreter: allocates the inputs, resets the peak RSS, runs one forward and prints
# the rise of the peak over the resident set before the call, in bytes.
_MEMORY_PROBE = r"""
import json, sys, time, torch, torch.nn.functional as F
from fusedlm import ops
impl, n, d, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
q, k, v = (torch.randn(1, 8, n, d) for _ in range(3))
small = [t[:, :, :64].contiguous() for t in (q, k, v)]
with torch.no_grad():
    run = (lambda q, k, v: ops.attention(q, k, v)) if impl == "fusedlm" else (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with ops.use_backend("cpu"):
        run(*small)  # first call: lazy initialisation
        before = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        out = run(q, k, v)
        ms = 1e3 * (time.perf_counter() - start)
        peak = status("VmHWM:")
print(json.dumps({"extra_bytes": peak - before, "out_bytes": out.numel() * out.element_size(), "ms": ms}))
"""


def _peak_memory(rows, n=8192, d=64):
    case = f"peak extra memory, fwd causal B=1 H={H} N={n} D={d} fp32"
    for impl, label in (("fusedlm", "fusedlm[cpu]"), ("sdpa", "torch SDPA (is_causal)")):
        result = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, impl, str(n), str(d), str(torch.get_num_threads())],
            capture_output=True, text=True, env={**os.environ, "FUSEDLM_BACKEND": ""},
        )
        if result.returncode != 0:
            print(f"  (memory probe for {impl} failed: {result.stderr.strip()[-300:]})")
            continue
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        extra = max(0, probe["extra_bytes"] - probe["out_bytes"]) / 2**20
        # ms: that one (cold) call
        rows.append(Row(SUITE, case, label, probe["ms"], {"peak_extra_MiB": extra, "output_MiB": probe["out_bytes"] / 2**20}))


def run(full: bool = False) -> list[Row]:
    rows: list[Row] = []
    if not full:
        for mask in ("causal", "bidirectional", "prefix"):
            _forward_case(rows, 1, 1024, 64, torch.float32, mask, flex=mask == "prefix", reference=True)
        _backward_case(rows, 1, 1024, 64, torch.float32, "causal")
        for mask in ("causal", "bidirectional"):
            _bf16_case(rows, 1024, 64, mask)
        _peak_memory(rows)
        return rows
    for b in (1, 4):
        for d in (64, 128):
            for n in (512, 1024, 2048, 4096):
                for dtype in (torch.float32, torch.bfloat16):
                    for mask in ("causal", "bidirectional", "prefix"):
                        _forward_case(rows, b, n, d, dtype, mask, flex=True, reference=n <= 2048)
                        _backward_case(rows, b, n, d, dtype, mask)
    for mask in ("causal", "bidirectional"):
        _bf16_case(rows, 1024, 64, mask)
    _peak_memory(rows)
    return rows
