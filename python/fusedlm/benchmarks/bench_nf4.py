"""NF4 dequant-matmul, dequantise and quantise on the CPU: fusedlm vs bitsandbytes and dense torch.

Quick set:
  * the decode GEMV, M=1, 4096->11008, fp32 x (exact float32 products, and at
    ``torch.set_float32_matmul_precision("medium")``: bf16 dot products), bf16 x and fp16 x, with
    the weight read from memory as in a model (the call cycles through copies of the weight that
    together exceed the last-level cache): fusedlm's GEMV vs bitsandbytes' inference path as
    transformers runs it (a ``Linear4bit`` in eval mode under ``no_grad``: on CPUs with avx512_bf16
    it repacks the weight on the first forward and then runs its fused bf16 GEMV,
    ``gemv_4bit_inference_cpu_nf4_bf16``), bitsandbytes' generic ``matmul_4bit``, and dense
    ``torch.matmul`` in x's dtype; the weight bandwidth (packed bytes + absmax per call) as a % of
    the read bandwidth probed right around it (``torch.sum`` over 1 GiB), and the time those bytes
    take at that bandwidth as a limit row;
  * prefill, M=128, 4096->4096, fp32 and bf16 x (M=512 bf16 too): fusedlm's NF4 matmul (a GEMM
    over the tiles on AVX-512, decode + torch's GEMM on AVX2) vs the dense ``torch.matmul`` in x's
    dtype and bitsandbytes' ``matmul_4bit``, with the peak extra memory of each call (torch
    allocations beyond the output, from torch.profiler's memory events) as a fraction of the fp32
    weight's size, and ``x_dense_same_dtype`` = fusedlm time / the dense matmul's in x's dtype;
  * quantisation of a 4096x4096 fp32 weight vs bitsandbytes ``quantize_4bit``, with the relative
    Frobenius error of dequant(quant(W)) of both.
``--full``: LLaMA-7B projection shapes (4096->4096, 4096->11008, 11008->4096): the GEMV (fp16 x
too) and M in {8, 128, 512}.
"""
from __future__ import annotations

import torch

from fusedlm import ops

from ._harness import Row, quiet, read_bandwidth, timed, timeit

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


def _weight_bytes(qw) -> int:
    return qw.data.numel() + qw.absmax.numel() * qw.absmax.element_size()


# The weights a GEMV case cycles through together exceed this (a few times the last-level cache of
# the CPUs measured), so that each call reads its weight from memory, as a model's layers do.
CYCLE_BYTES = 192 << 20


def _bnb_inference_layers(weights, dtype):
    """bitsandbytes ``Linear4bit`` layers (NF4, blocksize 64, no double quantisation) holding
    `weights`, in eval mode and already run once: what transformers runs at inference."""
    import bitsandbytes as bnb

    layers = []
    for w in weights:
        layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dtype, quant_type="nf4",
                                  compress_statistics=False)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=BLOCKSIZE,
                                         compress_statistics=False)
        layer = layer.to("cpu").eval()
        with torch.no_grad():
            layer(torch.zeros(1, w.shape[1], dtype=dtype))  # the first forward repacks (avx512_bf16 CPUs)
        layers.append(layer)
    return layers


def _cycle(fns):
    """A function that calls the next of `fns` each time."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


def _gemv_case(rows: list[Row], n: int, k: int, dtype: torch.dtype, *, precision: str = "highest", bnb_mods):
    """M=1 with the weight from memory (see CYCLE_BYTES), beside the read bandwidth probed around it."""
    name = str(dtype).removeprefix("torch.")
    numerics = "bf16 dots" if name == "bfloat16" or precision == "medium" else "exact fp32 products"
    case = f"GEMV M=1 {k}->{n} {name} x, weights from memory" + (", float32 matmul precision medium" if precision == "medium" else "")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(1, k, generator=g).to(dtype)
    qw = ops.nf4_quantize(w, blocksize=BLOCKSIZE)
    nbytes = _weight_bytes(qw)
    copies = max(2, -(-CYCLE_BYTES // nbytes))
    qws = [qw] + [ops.nf4_quantize(w * (1 + 1e-3 * i), blocksize=BLOCKSIZE) for i in range(1, copies)]
    for q in qws:
        q.cpu_tiles()  # made on first use, as in a model's first token
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        probe_before = read_bandwidth()[1]
        rows.append(timed(SUITE, case, "fusedlm[cpu]", _cycle([lambda q=q: ops.nf4_matmul(x, q) for q in qws]),
                          {"numerics": numerics}))
        probe_gbs = max(probe_before, read_bandwidth()[1])
    finally:
        torch.set_float32_matmul_precision(before)
    ours = rows[-1]
    ours.extra["weight_GB/s"] = nbytes / ours.ms / 1e6
    ours.extra["pct_of_read_bw"] = 100 * nbytes / ours.ms / 1e6 / probe_gbs
    ours.extra["read_bw_GB/s"] = probe_gbs
    rows.append(Row(SUITE, case, "weight bytes at the read bandwidth", nbytes / probe_gbs / 1e6, floor=True))
    if bnb_mods is not None:
        bnb, bnbf = bnb_mods
        if precision == "highest":
            layers = _bnb_inference_layers([q_w for q_w in (w * (1 + 1e-3 * i) for i in range(copies))], dtype)
            with torch.no_grad():
                rows.append(timed(SUITE, case, "bitsandbytes Linear4bit (inference, as transformers runs it)",
                                  _cycle([lambda layer=layer: layer(x) for layer in layers])))
            del layers
        data, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
        rows.append(timed(SUITE, case, "bitsandbytes matmul_4bit (generic)", lambda: bnb.matmul_4bit(x, data.t(), quant_state=state),
                          min_repeat=3, min_seconds=0.05))
    else:
        rows.append(Row(SUITE, case, "bitsandbytes (not installed)", float("nan")))
    dense = w.to(dtype)
    rows.append(timed(SUITE, case, f"torch {name} matmul (dense W)", lambda: x @ dense.T))
    del qws


def _matmul_case(rows: list[Row], m: int, n: int, k: int, dtype: torch.dtype, *, bnb_mods, memory: bool):
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
    if bnb_mods is not None:
        bnb, bnbf = bnb_mods
        data, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
        add("bitsandbytes matmul_4bit", lambda: bnb.matmul_4bit(x, data.t(), quant_state=state))
    else:
        rows.append(Row(SUITE, case, "bitsandbytes (not installed)", float("nan")))
    add("dequantise-then-matmul", lambda: x @ ops.nf4_dequantize(qw).to(dtype).T)
    rows[-1].kind = "context"  # fusedlm's own dequantise + torch's matmul: another way with fusedlm, not a peer
    w_dense = w.to(dtype)
    add(f"torch {str(dtype).removeprefix('torch.')} matmul (dense W)", lambda: x @ w_dense.T)
    ours.extra["x_dense_same_dtype"] = ms / rows[-1].ms  # fusedlm time / the dense matmul's in x's dtype


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
    probe_ms, probe_gbs = read_bandwidth()
    rows.append(Row(SUITE, "read bandwidth probe", "torch.sum over 1 GiB fp32", probe_ms, {"GB/s": probe_gbs}))
    shapes = [(11008, 4096)] if not full else [(4096, 4096), (11008, 4096), (4096, 11008)]
    for n, k in shapes:
        _gemv_case(rows, n, k, torch.float32, bnb_mods=bnb_mods)
        _gemv_case(rows, n, k, torch.float32, precision="medium", bnb_mods=bnb_mods)
        _gemv_case(rows, n, k, torch.bfloat16, bnb_mods=bnb_mods)
        if full:
            _gemv_case(rows, n, k, torch.float16, bnb_mods=bnb_mods)
    if not full:
        for dtype in (torch.float32, torch.bfloat16):
            _matmul_case(rows, 128, 4096, 4096, dtype, bnb_mods=bnb_mods, memory=False)
        _matmul_case(rows, 512, 4096, 4096, torch.bfloat16, bnb_mods=bnb_mods, memory=True)
        _quantize_case(rows, 4096, 4096, bnb_mods)
        return rows
    for n, k in shapes:
        for m in (8, 128, 512):
            for dtype in (torch.float32, torch.bfloat16):
                _matmul_case(rows, m, n, k, dtype, bnb_mods=bnb_mods, memory=m >= 128)
    _quantize_case(rows, 4096, 4096, bnb_mods)
    _quantize_case(rows, 11008, 4096, bnb_mods)
    return rows
