"""Shared benchmark plumbing: timing, machine description, ratio tables, JSON and PNG output.

A suite (``bench_<op>.py``) exposes ``run(full: bool) -> list[Row]``. Each Row is one
implementation timed on one case; rows of the same case are compared with the row whose
``impl`` starts with "fusedlm" (the suite may name several fusedlm rows, e.g. cpu and reference
backends: the first one listed for the case is the baseline of the ratios). Ratios are
``peer time / fusedlm time``, so > 1 means fusedlm is faster. All rows of a table are measured in
the same process, one after the other.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Row:
    suite: str
    case: str  # e.g. "M=1 4096->11008 fp32"
    impl: str  # e.g. "fusedlm[cpu]", "bitsandbytes", "torch fp32 matmul"
    ms: float  # median wall time in milliseconds
    extra: dict = dataclasses.field(default_factory=dict)  # GB/s, peak MiB, compile s, ...


def timeit(fn: Callable[[], object], *, warmup: int = 2, min_repeat: int = 5, min_seconds: float = 0.2, max_repeat: int = 200) -> float:
    """Median wall time of fn() in milliseconds (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_repeat and (len(times) < min_repeat or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """What the numbers were measured on: CPU, threads, SIMD level, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from fusedlm import _C

        isa = _C.active_isa()
    except ImportError:
        isa = "fusedlm._C not built"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fusedlm_isa": isa,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        **{name: _version(name) for name in ("fusedlm", "torch", "triton", "transformers", "peft", "bitsandbytes")},
    }


def ratio_table(rows: list[Row]) -> str:
    """Markdown table: per case, each implementation's time and its time / fusedlm's time."""
    lines = ["| suite | case | impl | ms | peer/fusedlm | notes |", "|---|---|---|---:|---:|---|"]
    by_case: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by_case.setdefault((row.suite, row.case), []).append(row)
    for (suite, case), case_rows in by_case.items():
        ours = next((r for r in case_rows if r.impl.startswith("fusedlm")), None)
        for r in case_rows:
            ratio = "" if ours is None or r is ours else f"{r.ms / ours.ms:.2f}x"
            notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
            lines.append(f"| {suite} | {case} | {r.impl} | {r.ms:.3f} | {ratio} | {notes} |")
    return "\n".join(lines)


def write_results(rows: list[Row], out_dir: str, name: str = "results") -> tuple[str, str | None]:
    """Writes <out_dir>/<name>.json (machine + rows) and, if matplotlib is there, <name>.png."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump({"machine": machine_info(), "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return json_path, _chart(rows, os.path.join(out_dir, f"{name}.png"))


def _chart(rows: list[Row], path: str) -> str | None:
    """One horizontal bar per (case, peer): peer time / fusedlm time, log scale, 1.0 marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels, ratios = [], []
    by_case: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by_case.setdefault((row.suite, row.case), []).append(row)
    for (suite, case), case_rows in by_case.items():
        ours = next((r for r in case_rows if r.impl.startswith("fusedlm")), None)
        if ours is None:
            continue
        for r in case_rows:
            if r is not ours:
                labels.append(f"{suite}: {case} vs {r.impl}")
                ratios.append(r.ms / ours.ms)
    if not ratios:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(ratios) + 1.2))
    ax.barh(range(len(ratios)), ratios, color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
    ax.set_yticks(range(len(ratios)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("peer time / fusedlm time  (> 1: fusedlm faster)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
