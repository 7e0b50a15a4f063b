"""Shared benchmark plumbing: timing, machine description, ratio tables, JSON and PNG output.

A suite (``bench_<op>.py``) exposes ``run(full: bool) -> list[Row]``. Each Row is one
implementation timed on one case; rows of the same case are compared with the row whose
``impl`` starts with "fusedlm" (the suite may name several fusedlm rows, e.g. cpu and reference
backends: the first one listed for the case is the baseline of the ratios). Ratios are
``peer time / fusedlm time``, so > 1 means fusedlm is faster. All rows of a table are measured in
the same process, one after the other. A row marked ``floor`` is a limit, not a peer: the time
nothing that does the case's work can beat (one read of the input, the machine's sgemm rate);
its ratio says how close fusedlm comes to it.

Each row has a ``kind`` (:func:`kind_of`): "peer" (another library doing the same work: its
ratio is a win or a loss), "context" (fusedlm against its own reference or another fusedlm
variant, one PEFT method against full fine-tuning: informative, not a contest) or "limit" (a
floor row). A suite sets it where the impl name does not say it; the chart draws only peers as
wins (green) or losses (red).

Ops are timed twice (DESIGN.md rule 7): alone, call after call (``ms``), and as a model runs
them, each call right after a torch op (``ms_after_torch``, see :func:`torch_op`): torch's OpenMP
workers still spin then, and a kernel that does not share them with torch pays for it there
only. The table shows both, with a ratio for each.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import math
import os
import platform
import statistics
import time
import warnings
from typing import Callable, Iterator

import torch

from .. import _io


@dataclasses.dataclass
class Row:
    suite: str
    case: str  # e.g. "M=1 4096->11008 fp32"
    impl: str  # e.g. "fusedlm[cpu]", "bitsandbytes", "torch fp32 matmul"
    ms: float  # median wall time in milliseconds
    extra: dict = dataclasses.field(default_factory=dict)  # GB/s, peak MiB, compile s, ...
    floor: bool = False  # a limit (see the module docstring), not a peer
    ms_after_torch: float | None = None  # median wall time of calls each made right after a torch op
    kind: str | None = None  # "peer", "context" or "limit"; None: derived from impl and floor (kind_of)


KINDS = ("peer", "context", "limit")


def kind_of(row: Row) -> str:
    """What a row is beside its case's fusedlm row: its ``kind`` if the suite set one, else a limit
    if it is a floor row, context if its impl is fusedlm's own (another backend or variant, e.g.
    "fusedlm[reference]", "fusedlm LoRA") or names a reference, else a peer."""
    if row.kind is not None:
        if row.kind not in KINDS:
            raise ValueError(f"Row.kind must be one of {KINDS} or None, got {row.kind!r} (impl {row.impl!r})")
        return row.kind
    if row.floor:
        return "limit"
    if row.impl.startswith("fusedlm") or "reference" in row.impl:
        return "context"
    return "peer"


def timeit(fn: Callable[[], object], *, warmup: int = 2, min_repeat: int = 5, min_seconds: float = 0.2, max_repeat: int = 200,
           before: Callable[[], object] | None = None) -> float:
    """Median wall time of fn() in milliseconds (after `warmup` calls). `before`, if given, runs
    before every call, untimed (see :func:`timeit_after_torch`)."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_repeat and (len(times) < min_repeat or time.perf_counter() - start < min_seconds):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@functools.cache
def torch_op() -> Callable[[], object]:
    """A torch op as a model runs one before each fused op: a [64, 1024] x [1024, 1024] float32
    matmul (a projection of a short sequence) on torch's threads. It leaves torch's OpenMP workers
    spinning, as they are when the next op of a model starts."""
    a, b = torch.randn(64, 1024), torch.randn(1024, 1024)
    return lambda: torch.mm(a, b)


def timeit_after_torch(fn: Callable[[], object], **kw) -> float:
    """Median ms of fn(), each call made right after :func:`torch_op` (which is not timed)."""
    return timeit(fn, before=torch_op(), **kw)


def timed(suite: str, case: str, impl: str, fn: Callable[[], object], extra: dict | None = None, **kw) -> Row:
    """A Row for fn() timed both ways: alone and right after a torch op."""
    extra = {} if extra is None else extra
    return Row(suite, case, impl, timeit(fn, **kw), extra, ms_after_torch=timeit_after_torch(fn, **kw))


def read_bandwidth() -> tuple[float, float]:
    """(ms, GB/s) of torch.sum over a 1 GiB float32 tensor, the best of a few calls: the plain
    memory-read bandwidth of this machine now (the limit of weight-streaming decode)."""
    big = torch.ones(256 * 1024 * 1024)
    ms = min(timeit(lambda: big.sum(), warmup=1, min_repeat=3, min_seconds=0.0) for _ in range(3))
    return ms, big.numel() * 4 / ms / 1e6


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """What the numbers were measured on: CPU, threads, SIMD levels, library versions."""
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

        detected, active, threads = _C.detected_isa(), _C.active_isa(), _C.thread_runtime()
    except ImportError:
        detected = active = threads = "fusedlm._C not built"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fusedlm_isa_detected": detected,
        "fusedlm_isa": active,
        "fusedlm_threads": threads,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        **{name: _version(name) for name in ("fusedlm", "torch", "triton", "transformers", "peft", "bitsandbytes")},
    }


def header(info: dict) -> str:
    """The first lines of `fusedlm bench`: the machine and the SIMD level each side runs."""
    capped = "" if info["fusedlm_isa"] == info["fusedlm_isa_detected"] else " (capped by --isa / FUSEDLM_MAX_ISA)"
    lines = [
        f"fusedlm bench — {info['cpu']}, {info['cores']} cores, {info['torch_threads']} threads",
        f"  fusedlm kernels: {info['fusedlm_isa']}{capped}; the CPU supports {info['fusedlm_isa_detected']};"
        f" parallel regions on {info['fusedlm_threads']}",
        f"  torch kernels: {info['torch_cpu_capability']}"
        + "".join(f", {k}={os.environ[k]}" for k in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA") if k in os.environ),
        "  " + ", ".join(f"{k} {info[k]}" for k in ("python", "fusedlm", "torch", "triton", "transformers", "peft", "bitsandbytes")),
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences the process's stdout and stderr (file descriptors 1 and 2) inside the block: native
    libraries (torch.profiler's kineto) print there, past Python's sys.stdout."""
    import sys

    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        try:
            os.dup2(null.fileno(), 1), os.dup2(null.fileno(), 2)
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def sgemm_row(suite: str, case: str, flops: float) -> Row:
    """A torch float32 GEMM of (about) `flops` floating-point operations, square n x n @ n x n, as a
    floor row: the rate this machine's BLAS reaches, measured in the same run."""
    n = max(16, round((flops / 2) ** (1 / 3)))
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = timeit(lambda: a @ b)
    return Row(suite, case, f"torch sgemm {n}^3 (same FLOPs)", ms, {"GFLOP/s": 2 * n**3 / ms / 1e6}, floor=True)


def ratio_table(rows: list[Row]) -> str:
    """Markdown table: per case, each implementation's time and its time / fusedlm's time, alone and
    (where measured) right after a torch op."""
    both = any(r.ms_after_torch is not None for r in rows)
    head = "| suite | case | impl | ms | peer/fusedlm |" + (" ms after torch op | peer/fusedlm after torch op |" if both else "")
    lines = [head + " notes |", "|---|---|---|---:|---:|" + ("---:|---:|" if both else "") + "---|"]
    for (suite, case), case_rows in _by_case(rows).items():
        ours = next((r for r in case_rows if r.impl.startswith("fusedlm")), None)
        for r in case_rows:
            ratio = "" if ours is None or r is ours else f"{r.ms / ours.ms:.2f}x"
            cells = f"| {suite} | {case} | {f'{r.impl} (limit)' if r.floor else r.impl} | {r.ms:.3f} | {ratio} |"
            if both:
                after = "" if r.ms_after_torch is None else f"{r.ms_after_torch:.3f}"
                mine = None if ours is None else ours.ms_after_torch
                ratio = "" if r is ours or mine is None or r.ms_after_torch is None else f"{r.ms_after_torch / mine:.2f}x"
                cells += f" {after} | {ratio} |"
            notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
            lines.append(f"{cells} {notes} |")
    return "\n".join(lines)


def _by_case(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    by_case: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by_case.setdefault((row.suite, row.case), []).append(row)
    return by_case


def write_results(rows: list[Row], out_dir: str, name: str = "results") -> tuple[str, str | None]:
    """Writes <out_dir>/<name>.json (machine + rows) and, if matplotlib is there, <name>.png."""
    os.makedirs(out_dir, exist_ok=True)
    info = machine_info()
    json_path = os.path.join(out_dir, f"{name}.json")
    _io.write_json(json_path, {"machine": info, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)  # atomically
    return json_path, _chart(rows, info, os.path.join(out_dir, f"{name}.png"))


def _chart_bars(rows: list[Row]) -> dict[str, list[tuple[str, float, str]]]:
    """Per suite, one (label, peer time / fusedlm time, kind) per row compared with its case's
    fusedlm row (see :func:`kind_of`)."""
    panels: dict[str, list[tuple[str, float, str]]] = {}
    for (suite, case), case_rows in _by_case(rows).items():
        ours = next((r for r in case_rows if r.impl.startswith("fusedlm")), None)
        if ours is None:
            continue
        for r in case_rows:
            if r is not ours and math.isfinite(r.ms / ours.ms):  # a peer that did not run (NaN) has no bar
                kind = kind_of(r)
                label = f"{case}: {'limit: ' if kind == 'limit' else ''}{r.impl} vs {ours.impl}"
                panels.setdefault(suite, []).append((label, r.ms / ours.ms, kind))
    return panels


def bar_style(ratio: float, kind: str) -> tuple[str, str]:
    """(colour, hatch) of a chart bar: a peer is a win (green, ratio >= 1: fusedlm faster) or a
    loss (red); context is neutral grey whatever its ratio; a limit is hatched light grey."""
    if kind == "peer":
        return ("tab:green" if ratio >= 1 else "tab:red"), ""
    if kind == "context":
        return "darkgrey", ""
    if kind == "limit":
        return "lightgrey", "//"
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _chart(rows: list[Row], info: dict, path: str) -> str | None:
    """One panel per suite, one horizontal bar per (case, other row): its time / fusedlm's time,
    log scale, 1.0 marked. Only peers are wins (green, fusedlm faster) or losses (red); context
    rows (fusedlm's own reference or variants, PEFT methods against full fine-tuning) are grey;
    limits (floor rows) are hatched light grey: a bar below 1 there is how far fusedlm is from
    the limit, not a loss."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    panels = _chart_bars(rows)
    if not panels:
        return None
    sizes = [len(bars) for bars in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.26 * sum(sizes) + 1.1 * len(panels) + 1.2),
                             gridspec_kw={"height_ratios": [n + 2 for n in sizes]}, squeeze=False)
    for ax, (suite, bars) in zip(axes[:, 0], panels.items()):
        labels, ratios, kinds = zip(*bars)
        styles = [bar_style(x, k) for x, k in zip(ratios, kinds)]
        drawn = ax.barh(range(len(ratios)), ratios, color=[c for c, _ in styles], edgecolor="grey")
        for bar, (_, hatch) in zip(drawn, styles):
            bar.set_hatch(hatch)
        ax.set_yticks(range(len(ratios)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"suite {suite}", fontsize=9, loc="left")
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("its time / fusedlm's time  (> 1: fusedlm faster)")
    capped = "" if info["fusedlm_isa"] == info["fusedlm_isa_detected"] else f" (CPU: {info['fusedlm_isa_detected']})"
    fig.suptitle(f"fusedlm bench — {info['cpu']}, {info['torch_threads']} threads\n"
                 f"fusedlm kernels {info['fusedlm_isa']}{capped}, torch kernels {info['torch_cpu_capability']}", fontsize=9)
    fig.legend(handles=[Patch(color="tab:green", label="peer, fusedlm faster"), Patch(color="tab:red", label="peer, fusedlm slower"),
                        Patch(color="darkgrey", label="context: fusedlm's reference / variants, PEFT vs full fine-tuning"),
                        Patch(facecolor="lightgrey", hatch="//", edgecolor="grey", label="limit (the closer to 1 the better)")],
               loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7, ncol=4)  # below the panels, clear of every bar
    with warnings.catch_warnings():  # long labels: tight_layout cannot always fit them, savefig's bbox does
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    with _io.atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")  # long case labels stay inside the image
    plt.close(fig)
    return path
