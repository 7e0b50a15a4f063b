"""NF4 dequant-matmul, dequantise and quantise on the CPU: fusedlm vs bitsandbytes and dense torch.

Quick set (issues #4 and #10's targets):
  * M=1, 4096->11008 (fp32 and bf16 x): fusedlm's fused GEMV vs bitsandbytes ``matmul_4bit``,
    dense fp32/bf16 ``torch.matmul`` on the unquantised weight, and dequantise-then-matmul; the
    effective weight bandwidth (packed bytes + absmax per call) next to a plain read-bandwidth
    probe (``torch.sum`` over a 1 GiB tensor) measured in the same run, and the time those bytes
    take at that bandwidth as a limit row;
  * M=512, 4096->4096, bf16 x: fusedlm's tiled path vs dense bf16 ``torch.matmul``, with the peak
    extra memory of each call (torch allocations beyond the output, from torch.profiler's memory
    events) as a fraction of the fp32 weight's size, and ``x_best_dense`` = fusedlm time / the
    faster of the dense fp32 and bf16 matmuls;
  * quantisation of a 4096x4096 fp32 weight vs bitsandbytes ``quantize_4bit``, with the relative
    Frobenius error of dequant(quant(W)) of both.
``--full``: LLaMA-7B projection shapes (4096->4096, 4096->11008, 11008->4096) x M in {1, 8, 128, 512}.
"""
from __future__ import annotations

import torch

from fusedlm import ops

from ._harness import Row, quiet, timed, timeit

SUITE = "nf4"
BLOCKSIZE = 64


def _bnb():
    import logging

    # bitsandbytes logs a warning at import when an optional kernel package is missing
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf

        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb, bnbf


def peak_alloc_mib(fn) -> float:
    """Peak of the bytes torch allocated and not yet freed during fn() (CPU allocator events
    recorded by torch.profiler), in MiB."""
    from torch.profiler import ProfilerActivity, profile

    with quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:  # kineto prints to stderr
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak / 2**20


def read_bandwidth_gbs() -> tuple[float, float]:
    """(ms, GB/s) of torch.sum over a 1 GiB float32 tensor: the plain memory-read bandwidth."""
    big = torch.ones(256 * 1024 * 1024)
    ms = timeit(lambda: big.sum(), min_repeat=5)
    return ms, big.numel() * 4 / ms / 1e6


def _weight_bytes(qw) -> int:
    return qw.data.numel() + qw.absmax.numel() * qw.absmax.element_size()


def _matmul_case(rows: list[Row], m: int, n: int, k: int, dtype: torch.dtype, *, probe_gbs: float | None, bnb_mods, memory: bool):
    case = f"M={m} {k}->{n} {str(dtype).removeprefix('torch.')} x, blocksize {BLOCKSIZE}"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g).to(dtype)
    qw = ops.nf4_quantize(w, blocksize=BLOCKSIZE)
    fp32_weight_mib = w.numel() * 4 / 2**20

    def add(impl, fn, **extra):
        rows.append(timed(SUITE, case, impl, fn, extra))
        if memory:
            # extra = allocations beyond the output itself
            peak = max(0.0, peak_alloc_mib(fn) - m * n * x.element_size() / 2**20)
            extra.update(peak_extra_MiB=peak, extra_pct_of_fp32_W=100 * peak / fp32_weight_mib)
        return rows[-1].ms

    ms = add("fusedlm[cpu]", lambda: ops.nf4_matmul(x, qw))
    ours = rows[-1]
    if m == 1:
        gbs = _weight_bytes(qw) / ms / 1e6
        ours.extra["weight_GB/s"] = gbs
        if probe_gbs:
            ours.extra["pct_of_read_bw"] = 100 * gbs / probe_gbs
            rows.append(Row(SUITE, case, "weight bytes at the read bandwidth", _weight_bytes(qw) / probe_gbs / 1e6, floor=True))
    if bnb_mods is not None:
        bnb, bnbf = bnb_mods
        data, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
        add("bitsandbytes matmul_4bit", lambda: bnb.matmul_4bit(x, data.t(), quant_state=state))
    else:
        rows.append(Row(SUITE, case, "bitsandbytes (not installed)", float("nan")))
    add("dequantise-then-matmul", lambda: x @ ops.nf4_dequantize(qw).to(dtype).T)
    add("torch fp32 matmul (dense W)", lambda: x.float() @ w.T)
    w_bf16 = w.bfloat16()
    x_bf16 = x.bfloat16()
    add("torch bf16 matmul (dense W)", lambda: x_bf16 @ w_bf16.T)
    dense = [r.ms for r in rows[-2:]]
    ours.extra["x_best_dense"] = ms / min(dense)  # fusedlm time / the faster dense matmul


def _quantize_case(rows: list[Row], n: int, k: int, bnb_mods):
    case = f"quantise {n}x{k} fp32, blocksize {BLOCKSIZE}"
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    qw = ops.nf4_quantize(w, blocksize=BLOCKSIZE)
    err = ((ops.nf4_dequantize(qw) - w).norm() / w.norm()).item()
    ms = timeit(lambda: ops.nf4_quantize(w, blocksize=BLOCKSIZE))
    rows.append(Row(SUITE, case, "fusedlm[cpu]", ms, {"in_GB/s": w.numel() * 4 / ms / 1e6, "rel_frob_err": err}))
    if bnb_mods is not None:
        _, bnbf = bnb_mods
        data, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
        bnb_err = ((bnbf.dequantize_4bit(data, state) - w).norm() / w.norm()).item()
        ms = timeit(lambda: bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4"))
        rows.append(Row(SUITE, case, "bitsandbytes quantize_4bit", ms,
                        {"in_GB/s": w.numel() * 4 / ms / 1e6, "rel_frob_err": bnb_err, "bytes_identical": torch.equal(data, qw.data)}))


def run(full: bool = False) -> list[Row]:
    rows: list[Row] = []
    bnb_mods = _bnb()
    probe_ms, probe_gbs = read_bandwidth_gbs()
    rows.append(Row(SUITE, "read bandwidth probe", "torch.sum over 1 GiB fp32", probe_ms, {"GB/s": probe_gbs}))
    if not full:
        for dtype in (torch.float32, torch.bfloat16):
            _matmul_case(rows, 1, 11008, 4096, dtype, probe_gbs=probe_gbs, bnb_mods=bnb_mods, memory=False)
        _matmul_case(rows, 512, 4096, 4096, torch.bfloat16, probe_gbs=None, bnb_mods=bnb_mods, memory=True)
        _quantize_case(rows, 4096, 4096, bnb_mods)
        return rows
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for m in (1, 8, 128, 512):
            for dtype in ((torch.float32, torch.bfloat16) if m == 1 else (torch.bfloat16,)):
                _matmul_case(rows, m, n, k, dtype, probe_gbs=probe_gbs if m == 1 else None, bnb_mods=bnb_mods, memory=m >= 128)
    _quantize_case(rows, 4096, 4096, bnb_mods)
    _quantize_case(rows, 11008, 4096, bnb_mods)
    return rows
