"""One call of every op on every backend this install has for the device, against the reference.

Run by .ci/gpu-check: on a GPU with CUDA tensors, in a dry run (no GPU) on CPU tensors with the
cpu backend and Triton's interpreter. Prints one line per (op, backend) and writes the results as
JSON: ``python .ci/gpu_smoke.py OUT.json``. Exits 1 if any call failed or disagreed.
"""
import json
import sys
import time
import traceback

import torch

from fusedlm import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the interpreter has no bfloat16
GPU_BACKENDS = ("triton", "cuda") if DEVICE == "cuda" else ("cpu", "triton")


def _g():
    return torch.Generator(device=DEVICE).manual_seed(0)


def _randn(*shape, dtype=DTYPE):
    return torch.randn(*shape, device=DEVICE, generator=_g()).to(dtype)


def attention():
    n = 256 if DEVICE == "cuda" else 17
    q, k, v = _randn(2, 8, n, 64), _randn(2, 2, n, 64), _randn(2, 2, n, 64)
    bias = (-torch.rand(1, 8, 1, n, device=DEVICE, generator=_g())).requires_grad_(True)  # ALiBi-like, with grad
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = ops.attention(*leaves, bias=bias)
    out.float().square().sum().backward()
    return [out, *(t.grad for t in leaves), bias.grad]


def lora():
    x, w = _randn(33, 128), _randn(96, 128) * 0.1
    a, b = _randn(3, 8, 128) * 0.1, _randn(3, 96, 8) * 0.1
    ids = torch.tensor([0, 1, 2, -1] * 8 + [1], device=DEVICE)
    return [ops.lora_linear(x, w, a, b, 2.0, adapter_ids=ids)]


def nf4():
    w = _randn(256, 512, dtype=torch.float32) * 0.05
    qw = ops.nf4_quantize(w, blocksize=64)
    x = _randn(3, 512)
    x_big = _randn(40 if DEVICE == "cuda" else 9, 512)  # > 8 rows: the tiled GEMM
    return [qw.data, qw.absmax, ops.nf4_dequantize(qw), ops.nf4_matmul(x, qw), ops.nf4_matmul(x_big, qw)]


def sampling():
    logits = torch.randn(8, 32000 if DEVICE == "cuda" else 500, device=DEVICE, generator=_g()) * 3
    kept = ops.filter_logits(logits, temperature=0.7, top_k=50, top_p=0.9)
    tokens = ops.sample(logits, temperature=0.7, top_k=50, top_p=0.9, generator=_g())
    return [kept, tokens]


OPS = {"attention": attention, "lora_linear": lora, "nf4": nf4, "sampling": sampling}
TOL = 5e-2 if DTYPE == torch.bfloat16 else 2e-3  # relative to the largest reference value


def _compare(got, want) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.detach(), w.detach()
        if g.dtype in (torch.int64, torch.uint8) or w.dtype in (torch.int64, torch.uint8):
            worst = max(worst, float((g != w).sum()))  # integer outputs: count of differences
            continue
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)):
            return float("inf")
        scale = w[finite].float().abs().max().clamp_min(1e-6) if finite.any() else torch.tensor(1.0)
        worst = max(worst, float(((g[finite].float() - w[finite].float()).abs().max() / scale) if finite.any() else 0))
    return worst


def main(path: str) -> int:
    results = []
    for name, fn in OPS.items():
        with ops.use_backend("reference"):
            want = fn()
        for backend in GPU_BACKENDS:
            if backend not in ops.available_backends():
                results.append({"op": name, "backend": backend, "ok": None, "error": "backend not available"})
                continue
            start = time.perf_counter()
            try:
                with ops.use_backend(backend):
                    got = fn()
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                err = _compare(got, want)
                # sampled tokens may differ in one row at a float rounding boundary; the rest must agree
                ok = err <= TOL if name != "sampling" else _compare(got[:1], want[:1]) == 0 and err <= 1
                results.append({"op": name, "backend": backend, "ok": bool(ok), "max_rel_err": err,
                                "seconds": round(time.perf_counter() - start, 2)})
            except NotImplementedError as e:
                results.append({"op": name, "backend": backend, "ok": None, "error": f"not implemented: {e}"})
            except Exception as e:  # a failure is the finding
                results.append({"op": name, "backend": backend, "ok": False, "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()[-3000:], "seconds": round(time.perf_counter() - start, 2)})
            r = results[-1]
            print(f"{'ok ' if r['ok'] else 'n/a' if r['ok'] is None else 'BAD'} {name:12s} {backend:8s} "
                  f"{r.get('max_rel_err', float('nan')):10.2e} {r.get('seconds', '')!s:>6}s {r.get('error', '')[:200]}", flush=True)
    with open(path, "w") as f:
        json.dump({"device": DEVICE, "results": results}, f, indent=1)
    return 1 if any(r["ok"] is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
