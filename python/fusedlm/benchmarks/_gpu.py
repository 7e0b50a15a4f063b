"""What the GPU benchmarks share: synchronised timing, the device's measured limits, dry runs.

Timing on a GPU is ``triton.testing.do_bench`` (CUDA events around many launches after a warm-up,
the median in milliseconds; the L2 cache is flushed between runs) or, without Triton, CUDA events
directly. Limits are measured in the same run, not taken from a spec sheet: the dense bf16 GEMM
rate of ``torch.matmul`` (TFLOP/s) and the copy bandwidth of a 1 GiB ``clone`` (GB/s), beside the
datasheet peaks of known devices (H100 / H200 SXM) for reference.

A dry run (no GPU: ``fusedlm.benchmarks.gpu_run --dry-run``) runs every case on CPU tensors at toy
sizes with wall-clock timing, so the code paths are exercised where no GPU is; its numbers mean
nothing.
"""
from __future__ import annotations

import dataclasses

import torch

from ._harness import timeit

# datasheet peaks (dense bf16 TFLOP/s, HBM GB/s), matched on the device name
DATASHEET = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "A100": (312.0, 2039.0)}


@dataclasses.dataclass
class Setup:
    device: str  # "cuda" or "cpu" (dry run)
    dry: bool
    scale: float = 1.0  # shapes are multiplied by this (dry runs use toy sizes)

    def size(self, n: int, minimum: int = 1) -> int:
        return max(minimum, int(n * self.scale))


def setup(dry: bool) -> Setup:
    if not dry and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: pass --dry-run to exercise the GPU benchmarks on CPU tensors")
    return Setup("cpu", True, 1 / 64) if dry else Setup("cuda", False)


def bench_ms(fn, s: Setup) -> float:
    """Median milliseconds of fn(), synchronised with the device."""
    if s.dry:
        return timeit(fn, warmup=1, min_repeat=1, min_seconds=0.0, max_repeat=2)
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        return _events_ms(fn)


def _events_ms(fn, repeat: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def limits(s: Setup) -> dict:
    """Measured dense bf16 GEMM TFLOP/s and copy GB/s of this device (and its datasheet peaks)."""
    if s.dry:
        return {"gemm_tflops": 1.0, "copy_gbs": 1.0, "datasheet": None, "device": "cpu (dry run)"}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm_ms = bench_ms(lambda: a @ b, s)
    big = torch.empty(256 * 1024 * 1024, device="cuda", dtype=torch.float32)  # 1 GiB
    copy_ms = bench_ms(lambda: big.clone(), s)
    name = torch.cuda.get_device_name()
    sheet = next((v for k, v in DATASHEET.items() if k in name), None)
    return {"device": name, "gemm_tflops": 2 * n**3 / gemm_ms / 1e9, "copy_gbs": 2 * 2**30 / copy_ms / 1e6,
            "datasheet": {"bf16_tflops": sheet[0], "hbm_gbs": sheet[1]} if sheet else None}
