"""The four ops on CUDA tensors: fusedlm's triton and cuda backends against the GPU peers.

    python -m fusedlm.benchmarks.gpu_run [--json results.json] [--suite attention ...]
    python -m fusedlm.benchmarks.gpu_run --dry-run     # no GPU: every case at toy sizes on CPU tensors

Cases (bf16 unless said; ratios are peer time / fusedlm time, > 1 = fusedlm faster, as on the CPU):

* attention: causal prefill B4 H32 N2048 D128 forward, and forward + backward, vs torch SDPA
  (``enable_gqa``) and FlashAttention's ``flash_attn_func`` where installed; prefix-LM vs SDPA with a
  boolean mask; decode (one query, 4096 cached keys, GQA 32/8) vs SDPA. TFLOP/s counts the
  visible half of a causal score matrix; ``%gemm`` is that rate over the dense bf16 GEMM rate
  measured in the same run.
* nf4: decode GEMV M=1, 4096->11008 and 11008->4096, triton and cuda backends vs bitsandbytes'
  ``matmul_4bit`` (its ``gemv_4bit`` kernel) where installed, and the dense bf16 matmul; GB/s of
  the packed weight + absmax read per call, ``%copy`` over the measured copy bandwidth.
* sampling: B64 V128256, T 0.7 top-k 50 top-p 0.9 (and top-p alone at V 256000), triton and cuda vs
  the torch sort-based sampler (``bench_sampling.torch_sort_sampler``) and transformers' warpers.
* lora: M4096 K=N=4096 r16 forward vs peft ``lora.Linear`` where installed (else the same
  composition in torch: ``F.linear`` three times) and the base ``F.linear`` alone; 8 adapters at
  M=8 (decode) vs peft's mixed batch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from fusedlm import ops

from . import _gpu
from ._harness import Row, machine_info, ratio_table

BF16 = torch.bfloat16


def _randn(s, *shape, dtype=BF16):
    return torch.randn(*shape, device=s.device, dtype=torch.float32).to(dtype)


def _backends(*names):
    return [b for b in names if b in ops.available_backends()]


def _fused(backend, fn):
    def run():
        with ops.use_backend(backend):
            return fn()
    return run


def _attention(s: _gpu.Setup, lim: dict) -> list[Row]:
    rows = []
    suite = "attention"
    dtype = torch.float32 if s.dry else BF16  # the interpreter widens 16-bit inputs anyway
    b, h, hkv, n, d = (4, 32, 8, 2048, 128) if not s.dry else (1, 4, 2, 32, 16)
    q, k, v = _randn(s, b, h, n, d, dtype=dtype), _randn(s, b, hkv, n, d, dtype=dtype), _randn(s, b, hkv, n, d, dtype=dtype)
    flops = 4 * b * h * n * n * d / 2  # causal: half the score matrix

    def extra(ms, f=flops):
        tflops = f / ms / 1e9
        return {"TFLOP/s": tflops, "%gemm": 100 * tflops / lim["gemm_tflops"]}

    flash = None
    if not s.dry:
        try:
            from flash_attn import flash_attn_func as flash
        except ImportError:
            pass
    case = f"causal fwd B{b} H{h}/{hkv} N{n} D{d}"
    for backend in _backends("triton"):
        ms = _gpu.bench_ms(_fused(backend, lambda: ops.attention(q, k, v)), s)
        rows.append(Row(suite, case, f"fusedlm[{backend}]", ms, extra(ms)))
    ms = _gpu.bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), s)
    rows.append(Row(suite, case, "torch SDPA", ms, extra(ms)))
    if flash is not None:
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        ms = _gpu.bench_ms(lambda: flash(qt, kt, vt, causal=True), s)
        rows.append(Row(suite, case, "flash_attn", ms, extra(ms)))

    case = f"causal fwd+bwd B{b} H{h}/{hkv} N{n} D{d}"
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    grad = torch.randn_like(q)

    def fwd_bwd(fn):
        def run():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad)
        return run

    for backend in _backends("triton"):
        ms = _gpu.bench_ms(_fused(backend, fwd_bwd(lambda q, k, v: ops.attention(q, k, v))), s)
        rows.append(Row(suite, case, f"fusedlm[{backend}]", ms, extra(ms, 3.5 * flops)))
    ms = _gpu.bench_ms(fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), s)
    rows.append(Row(suite, case, "torch SDPA", ms, extra(ms, 3.5 * flops)))

    case = f"prefix-LM fwd B{b} H{h}/{hkv} N{n} prefix {n // 4}"
    i = torch.arange(n, device=s.device)
    allowed = (i[None, :] <= i[:, None]) | (i[None, :] < n // 4)
    for backend in _backends("triton"):
        ms = _gpu.bench_ms(_fused(backend, lambda: ops.attention(q, k, v, mask="prefix", prefix_len=n // 4)), s)
        rows.append(Row(suite, case, f"fusedlm[{backend}]", ms, extra(ms)))
    ms = _gpu.bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True), s)
    rows.append(Row(suite, case, "torch SDPA bool mask", ms, extra(ms)))

    nk = s.size(4096, 32)
    case = f"decode B{8 if not s.dry else 1} H{h}/{hkv} Nk{nk} D{d}"
    qd = _randn(s, 8 if not s.dry else 1, h, 1, d, dtype=dtype)
    kd, vd = (_randn(s, qd.shape[0], hkv, nk, d, dtype=dtype) for _ in range(2))
    kv_bytes = 2 * kd.numel() * kd.element_size()

    def kv(ms):
        gbs = kv_bytes / ms / 1e6
        return {"GB/s": gbs, "%copy": 100 * gbs / lim["copy_gbs"]}

    for backend in _backends("triton"):
        ms = _gpu.bench_ms(_fused(backend, lambda: ops.attention(qd, kd, vd)), s)
        rows.append(Row(suite, case, f"fusedlm[{backend}]", ms, kv(ms)))
    ms = _gpu.bench_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), s)
    rows.append(Row(suite, case, "torch SDPA", ms, kv(ms)))
    return rows


def _nf4(s: _gpu.Setup, lim: dict) -> list[Row]:
    rows = []
    suite = "nf4"
    bnb = None
    if not s.dry:
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf
        except ImportError:
            bnb = None
    for n_out, k in ((11008, 4096), (4096, 11008)):
        n_out, k = s.size(n_out, 64), s.size(k, 64)
        w = torch.randn(n_out, k, device=s.device) * 0.02
        qw = ops.nf4_quantize(w, blocksize=64)
        x = _randn(s, 1, k, dtype=torch.float32 if s.dry else BF16)
        read = qw.data.numel() + 4 * qw.absmax.numel()

        def bw(ms):
            gbs = read / ms / 1e6
            return {"GB/s": gbs, "%copy": 100 * gbs / lim["copy_gbs"]}

        case = f"GEMV M=1 {k}->{n_out}"
        for backend in _backends("cuda", "triton"):
            ms = _gpu.bench_ms(_fused(backend, lambda: ops.nf4_matmul(x, qw)), s)
            rows.append(Row(suite, case, f"fusedlm[{backend}]", ms, bw(ms)))
        if bnb is not None:
            packed, state = bnbf.quantize_4bit(w.to(BF16), blocksize=64, quant_type="nf4")
            ms = _gpu.bench_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), s)
            rows.append(Row(suite, case, "bitsandbytes matmul_4bit (gemv_4bit)", ms, bw(ms)))
        dense = w.to(x.dtype)
        ms = _gpu.bench_ms(lambda: x @ dense.T, s)
        rows.append(Row(suite, case, "torch dense matmul", ms, {"GB/s": dense.numel() * dense.element_size() / ms / 1e6}))
    return rows


def _sampling(s: _gpu.Setup, lim: dict) -> list[Row]:
    from .bench_sampling import _transformers_sampler, torch_sort_sampler

    rows = []
    suite = "sampling"
    for vocab, (t, top_k, top_p) in ((128256, (0.7, 50, 0.9)), (256000, (1.0, 0, 0.9))):
        vocab = s.size(vocab, 100)
        batch = 64 if not s.dry else 2
        logits = torch.randn(batch, vocab, device=s.device) * 3
        g = torch.Generator(device=s.device).manual_seed(0)
        case = f"B{batch} V{vocab} T{t} k{top_k} p{top_p}"
        read = logits.numel() * 4

        def bw(ms):
            return {"GB/s (one read)": read / ms / 1e6}

        for backend in _backends("cuda", "triton"):
            ms = _gpu.bench_ms(_fused(backend, lambda: ops.sample(logits, temperature=t, top_k=top_k, top_p=top_p,
                                                                  generator=g)), s)
            rows.append(Row(suite, case, f"fusedlm[{backend}]", ms, bw(ms)))
        ms = _gpu.bench_ms(lambda: torch_sort_sampler(logits, t, top_k, top_p, g), s)
        rows.append(Row(suite, case, "torch sort-based", ms, bw(ms)))
        hf = _transformers_sampler(t, top_k, top_p)
        if hf is not None:
            ms = _gpu.bench_ms(lambda: hf(logits, g), s)
            rows.append(Row(suite, case, "transformers warpers + multinomial", ms, bw(ms)))
    return rows


def _lora(s: _gpu.Setup, lim: dict) -> list[Row]:
    rows = []
    suite = "lora"
    dtype = torch.float32 if s.dry else BF16
    m, k, n, r = s.size(4096, 8), s.size(4096, 32), s.size(4096, 32), 16
    x, w, bias = _randn(s, m, k, dtype=dtype), _randn(s, n, k, dtype=dtype) * 0.02, _randn(s, n, dtype=dtype)
    a, b = _randn(s, r, k, dtype=dtype) * 0.02, _randn(s, n, r, dtype=dtype) * 0.02
    flops = 2 * m * k * n

    def tf(ms):
        return {"TFLOP/s": flops / ms / 1e9, "%gemm": 100 * flops / ms / 1e9 / lim["gemm_tflops"]}

    case = f"fwd M{m} {k}->{n} r{r}"
    for backend in _backends("triton"):
        ms = _gpu.bench_ms(_fused(backend, lambda: ops.lora_linear(x, w, a, b, 2.0, bias=bias)), s)
        rows.append(Row(suite, case, f"fusedlm[{backend}]", ms, tf(ms)))
    peer = _peft(s, w, bias, [(a, b)], r)
    if peer is not None:
        with torch.no_grad():
            ms = _gpu.bench_ms(lambda: peer(x), s)
        rows.append(Row(suite, case, "peft lora.Linear", ms, tf(ms)))
    else:
        ms = _gpu.bench_ms(lambda: F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * 2.0, s)
        rows.append(Row(suite, case, "torch F.linear x3 (peft's composition; peft not installed)", ms, tf(ms)))
    ms = _gpu.bench_ms(lambda: F.linear(x, w, bias), s)
    rows.append(Row(suite, case, "base F.linear alone", ms, tf(ms), floor=True))

    adapters = 8
    xm = _randn(s, 8, k, dtype=dtype)
    am, bm = _randn(s, adapters, r, k, dtype=dtype) * 0.02, _randn(s, adapters, n, r, dtype=dtype) * 0.02
    ids = torch.arange(8, device=s.device) % adapters
    case = f"decode M8 {adapters} adapters {k}->{n} r{r}"
    for backend in _backends("triton"):
        ms = _gpu.bench_ms(_fused(backend, lambda: ops.lora_linear(xm, w, am, bm, 2.0, bias=bias, adapter_ids=ids)), s)
        rows.append(Row(suite, case, f"fusedlm[{backend}]", ms))
    peer = _peft(s, w, bias, [(am[i], bm[i]) for i in range(adapters)], r)
    if peer is not None:
        names = [f"a{i}" for i in range(adapters)]
        with torch.no_grad():
            ms = _gpu.bench_ms(lambda: peer(xm, adapter_names=[names[int(i)] for i in ids.tolist()]), s)
        rows.append(Row(suite, case, "peft mixed batch (adapter_names)", ms))
    return rows


def _peft(s: _gpu.Setup, weight, bias, adapters, r):
    try:
        from peft import LoraConfig
        from peft.tuners import lora as peft_lora
    except ImportError:
        return None
    n, k = weight.shape
    base = torch.nn.Linear(k, n, bias=True, device=s.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        base.bias.copy_(bias)
    names = ["default"] if len(adapters) == 1 else [f"a{i}" for i in range(len(adapters))]
    config = LoraConfig(r=r, lora_alpha=2 * r)
    layer = peft_lora.Linear(base, names[0], config, r=r, lora_alpha=2 * r)
    for name in names[1:]:
        layer.update_layer(name, r, 2 * r, config)
    layer.to(device=s.device, dtype=weight.dtype)
    with torch.no_grad():
        for name, (a, b) in zip(names, adapters):
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    return layer


SUITES = {"attention": _attention, "nf4": _nf4, "sampling": _sampling, "lora": _lora}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm.benchmarks.gpu_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: toy sizes on CPU tensors (exercises the code only)")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES))
    parser.add_argument("--json", help="write machine, limits, rows and errors here")
    args = parser.parse_args(argv)
    s = _gpu.setup(args.dry_run)
    lim = _gpu.limits(s)
    print(f"fusedlm GPU bench — {lim['device']}: bf16 GEMM {lim['gemm_tflops']:.0f} TFLOP/s, copy {lim['copy_gbs']:.0f} GB/s "
          f"(measured; datasheet {lim['datasheet']})", flush=True)
    rows: list[Row] = []
    errors = {}
    for name in args.suite or list(SUITES):
        start = time.perf_counter()
        try:
            suite_rows = SUITES[name](s, lim)
        except Exception as e:  # one suite failing must not lose the others' figures
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"== {name}: FAILED {errors[name]}", flush=True)
            continue
        print(f"\n== {name} ({time.perf_counter() - start:.0f} s)\n{ratio_table(suite_rows)}", flush=True)
        rows += suite_rows
    if args.json:
        ratios = {}
        for r in rows:
            ours = next((o for o in rows if o.suite == r.suite and o.case == r.case and o.impl.startswith("fusedlm")), None)
            if ours is not None and r is not ours and math.isfinite(r.ms):
                ratios[f"{r.suite} | {r.case} | {r.impl} / {ours.impl}"] = r.ms / ours.ms
        result = {"machine": machine_info(), "limits": lim, "dry_run": s.dry, "errors": errors, "ratios": ratios,
                  "rows": [dict(suite=r.suite, case=r.case, impl=r.impl, ms=r.ms, extra=r.extra, floor=r.floor) for r in rows]}
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
