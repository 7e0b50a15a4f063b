"""Ahead-of-time compilation of every Triton kernel fusedlm launches, for a GPU it does not need.

The interpreter (``TRITON_INTERPRET=1``, how the tests run Triton on a CPU) accepts code that the
real compiler rejects, and it says nothing about registers, spills or shared memory. This module
compiles what a real launch would compile, on any machine with Triton's NVIDIA backend:

* each case of :data:`CASES` calls a launcher of this package (``attention.forward``,
  ``nf4.matmul``, ...) on CPU tensors of a real shape;
* while it runs, ``JITFunction.run`` is replaced by :func:`_compile_launch`, which specialises the
  arguments with the JIT's own binder (pointer dtypes, 16-byte alignment, integers equal to 1 or
  divisible by 16: exactly the variant a launch on the GPU builds), compiles it for the target
  with ``triton.compile`` and records what ptxas reports; nothing runs, outputs stay garbage.

Run it in a process without ``TRITON_INTERPRET`` (the launchers pick their GPU block sizes then)::

    python -m fusedlm.kernels._aot [--arch 90] [--quick] [--json out.json]

It prints one line per compiled variant (registers, spill bytes, shared memory, compile seconds)
and exits 1 if any variant failed to compile or launches a grid past the hardware's limits.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import tempfile
import time
from typing import Callable

import torch

GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA: blocks along grid x, y, z
SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (sm_90: 227 KiB)


@dataclasses.dataclass
class Build:
    case: str  # the CASES entry that launched it
    kernel: str  # the @triton.jit function's name
    constants: str  # its constexpr arguments (and arguments specialised to constants)
    num_warps: int = 0
    num_stages: int = 0
    grid: tuple = ()
    seconds: float = 0.0  # compile time (cold cache)
    registers: int | None = None  # per thread, from ptxas
    spill_stores: int | None = None  # bytes per thread
    spill_loads: int | None = None
    stack: int | None = None  # bytes of stack frame per thread
    shared: int | None = None  # bytes of shared memory per block
    error: str | None = None  # compile error or a limit the launch exceeds

    def line(self) -> str:
        if self.error:
            lines = [s for s in self.error.splitlines() if s.strip()]
            return f"FAIL {self.case:34s} {self.kernel:22s} {lines[0][:120]} ... {lines[-1][:200]}"
        return (f"ok   {self.case:34s} {self.kernel:22s} regs {self.registers!s:>4} spill {self.spill_stores!s:>5} B "
                f"stack {self.stack!s:>5} B smem {self.shared:>6} B warps {self.num_warps} stages {self.num_stages} "
                f"{self.seconds:5.1f} s  {self.constants}")


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas(log: str, build: Build) -> None:
    if m := _PTXAS.search(log):
        build.stack, build.spill_stores, build.spill_loads = (int(g) for g in m.groups())
    if m := _REGS.search(log):
        build.registers = int(m.group(1))


def _constants(fn, constexprs: dict) -> str:
    names = fn.arg_names
    parts = []
    for path, value in sorted(constexprs.items()):
        name = names[path[0]] if isinstance(path, tuple) else str(path)
        parts.append(f"{name}={value}")
    return " ".join(parts)


@contextlib.contextmanager
def capture(arch: int, builds: list[Build], case: str):
    """Inside the block every kernel launch is compiled for sm_`arch` and recorded, not run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    original = jit.JITFunction.run

    def _compile_launch(self, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", False)
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        build = Build(case, self.__name__, _constants(self, constexprs), options.num_warps, options.num_stages)
        build.grid = tuple(grid(bound) if callable(grid) else grid)
        log = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1 prints ptxas -v here
                kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
        except Exception as e:  # a compile error is the finding: record it and go on
            build.error = f"{type(e).__name__}: {e}".strip()
        else:
            build.seconds = time.perf_counter() - start
            build.shared = kernel.metadata.shared
            _parse_ptxas(log.getvalue(), build)
            over = [f"grid[{i}]={g} > {limit}" for i, (g, limit) in enumerate(zip(build.grid, GRID_LIMITS)) if g > limit]
            if build.shared > SHARED_LIMIT.get(arch, 232448):
                over.append(f"shared memory {build.shared} B > {SHARED_LIMIT.get(arch)} B")
            build.error = "; ".join(over) or None
        builds.append(build)
        return None

    jit.JITFunction.run = _compile_launch
    try:
        yield
    finally:
        jit.JITFunction.run = original


# ---------------------------------------------------------------------------------------------
# The cases: one launcher call each, on CPU tensors shaped as a real call on the GPU would be
# ---------------------------------------------------------------------------------------------
def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _attention(dtype, d, mode, *, nq=256, nk=256, bias=None, pad=False, backward=True, hq=8, hkv=2, b=2):
    def run():
        from . import attention as tk

        q = _randn(b, hq, nq, d, dtype=dtype)
        k, v = _randn(b, hkv, nk, d, dtype=dtype), _randn(b, hkv, nk, d, dtype=dtype)
        prefix = torch.full((b,), nk // 3, dtype=torch.int64) if mode == 1 else None
        mask = torch.ones(b, nk, dtype=torch.bool) if pad else None
        shape = {None: None, "full": (b, hq, nq, nk), "alibi": (1, hq, 1, nk), "rows": (1, 1, nq, nk),
                 "keys": (b, 1, 1, nk)}[bias]
        bias_t = _randn(*shape).expand(b, hq, nq, nk) if shape else None
        out, lse = tk.forward(q, k, v, mode, prefix, mask, bias_t, d ** -0.5)
        if backward:
            grad = torch.randn_like(out)
            extra = {"bias_grad_shape": shape} if "bias_grad_shape" in inspect.signature(tk.backward).parameters else {}
            tk.backward(grad, q, k, v, out, lse, mode, prefix, mask, bias_t, d ** -0.5, **extra)
    return run


def _lora(dtype, *, adapters=1, nf4_base=False, bias=True, m=64, k=512, n=768, r=16):
    def run():
        from . import lora as tl_lora

        x = _randn(m, k, dtype=dtype)
        weight = None if nf4_base else _randn(n, k, dtype=dtype)
        base = _randn(m, n, dtype=dtype) if nf4_base else None
        h = torch.randn(m, r)
        lora_b = _randn(adapters, n, r, dtype=dtype)
        ids = torch.randint(-1, adapters, (m,))
        tl_lora.lora_linear(x, weight, base, h, lora_b, ids, torch.rand(m), _randn(n, dtype=dtype) if bias else None)
    return run


def _nf4_quantize(dtype, blocksize, n=4096 * 3 + 17):
    def run():
        from ..reference import nf4 as ref
        from . import nf4

        w = _randn(n, dtype=dtype)
        nf4.quantize(w, blocksize, ref.NF4_MIDPOINTS, torch.empty((n + 1) // 2, dtype=torch.uint8),
                     torch.empty(-(-n // blocksize)))
    return run


def _nf4_dequantize(dtype, n=4096 * 3 + 17, blocksize=64):
    def run():
        from ..reference import nf4 as ref
        from . import nf4

        data = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
        nf4.dequantize(data, torch.rand(-(-n // blocksize)), blocksize, ref.NF4_CODE, torch.empty(n, dtype=dtype))
    return run


def _nf4_matmul(dtype, m, *, n=4096, k=4096, blocksize=64):
    def run():
        from ..reference import nf4 as ref
        from . import nf4

        data = torch.randint(0, 256, ((n * k + 1) // 2,), dtype=torch.uint8)
        nf4.matmul(_randn(m, k, dtype=dtype), data, torch.rand(-(-n * k // blocksize)), blocksize, n, ref.NF4_CODE)
    return run


def _sampling(dtype, vocab, *, tokens=True, filtered=False, rows=4):
    def run():
        from . import sampling

        logits = _randn(rows, vocab, dtype=dtype)
        sampling.sample(logits, torch.ones(rows), torch.full((rows,), 50), torch.full((rows,), 0.9, dtype=torch.float64),
                        1234, tokens, filtered)
    return run


BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
_DT = {BF16: "bf16", F16: "fp16", F32: "fp32"}


def _cases() -> dict[str, Callable[[], None]]:
    cases: dict[str, Callable[[], None]] = {}
    # attention: every launch configuration (kernel x bias x head-dim bucket x 16/32-bit), every mask
    # mode, padding, each shape of bias gradient, decode (Nq = 1), GQA
    for dtype in (BF16, F16, F32):
        for d, mode, bias, pad in ((64, 0, None, False), (128, 1, "alibi", True), (256, 2, "full", False),
                                   (128, 0, "rows", False), (64, 2, "keys", True)):
            cases[f"attention {_DT[dtype]} D{d} mode{mode} bias={bias} pad={int(pad)}"] = _attention(dtype, d, mode, bias=bias,
                                                                                                   pad=pad)
        cases[f"attention decode {_DT[dtype]} D128"] = _attention(dtype, 128, 0, nq=1, nk=4096, backward=False, pad=True)
    cases["attention decode bf16 D64 MQA"] = _attention(BF16, 64, 0, nq=1, nk=1000, hq=32, hkv=1, backward=False)
    cases["attention bf16 D80 GQA Nq>Nk"] = _attention(BF16, 80, 0, nq=300, nk=129, hq=8, hkv=1)
    for dtype in (BF16, F16, F32):
        cases[f"lora {_DT[dtype]} one adapter"] = _lora(dtype)
        cases[f"lora {_DT[dtype]} 8 adapters"] = _lora(dtype, adapters=8)
        cases[f"lora {_DT[dtype]} nf4 base"] = _lora(dtype, nf4_base=True, bias=False)
        cases[f"nf4 dequantize {_DT[dtype]}"] = _nf4_dequantize(dtype)
        cases[f"nf4 gemv {_DT[dtype]} M=1"] = _nf4_matmul(dtype, 1)
        cases[f"nf4 gemv {_DT[dtype]} M=4 bs4096"] = _nf4_matmul(dtype, 4, blocksize=4096)
        cases[f"nf4 gemm {_DT[dtype]} M=64"] = _nf4_matmul(dtype, 64)
        cases[f"sampling {_DT[dtype]} V=128256"] = _sampling(dtype, 128256)
    cases["nf4 gemv fp32 M=2 K odd"] = _nf4_matmul(F32, 2, n=300, k=4095)
    cases["nf4 gemm bf16 M=64 K odd"] = _nf4_matmul(BF16, 64, n=300, k=4095)
    for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        for dtype in (BF16, F16, F32):
            cases[f"nf4 quantize {_DT[dtype]} bs{blocksize}"] = _nf4_quantize(dtype, blocksize)
    cases["sampling fp32 V=1000 filter"] = _sampling(F32, 1000, tokens=False, filtered=True)
    cases["sampling fp32 V=256000 tokens+filter"] = _sampling(F32, 256000, filtered=True)
    cases["sampling bf16 V=17"] = _sampling(BF16, 17)
    return cases


QUICK = ("attention bf16 D64", "attention bf16 D128", "attention fp32 D256", "attention fp16 D128 mode0 bias=rows",
         "attention decode bf16", "attention bf16 D80", "lora", "nf4 quantize bf16 bs64", "nf4 quantize fp32 bs4096",
         "nf4 dequantize", "nf4 gemv", "nf4 gemm", "sampling")


def case_names(quick: bool = False, only: str | None = None) -> list[str]:
    """The cases to compile: all, the QUICK subset (one per kernel path), or those containing `only`."""
    return [n for n in _cases() if (not quick or n.startswith(QUICK)) and (not only or only in n)]


def compile_case(name: str, arch: int = 90) -> list[Build]:
    """The builds one case launches, compiled for sm_`arch`."""
    builds: list[Build] = []
    torch.manual_seed(0)
    with capture(arch, builds, name):
        try:
            _cases()[name]()
        except Exception as e:  # a launcher failing before its launch is a finding too
            builds.append(Build(name, "(launcher)", "", error=f"{type(e).__name__}: {e}"))
    return builds


def compile_all(arch: int = 90, quick: bool = False, only: str | None = None, echo=None, jobs: int = 1,
                on_case=None) -> list[Build]:
    """Compiles every case (``quick``: one of each kernel path, see QUICK) for sm_`arch`, in `jobs`
    processes; `echo` gets a line per build, `on_case` the builds so far after each case."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the launchers must pick their GPU configurations")
    names = case_names(quick, only)
    builds: list[Build] = []

    def done(case_builds):
        builds.extend(case_builds)
        if echo:
            for b in case_builds:
                echo(b.line())
        if on_case:
            on_case(builds)

    if jobs <= 1:
        for name in names:
            done(compile_case(name, arch))
        return builds
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for case_builds in pool.map(compile_case, names, [arch] * len(names)):
            done(case_builds)
    return builds


def summary(builds: list[Build]) -> dict:
    import triton

    return {
        "triton": triton.__version__,
        "triton_path": os.path.dirname(triton.__file__),
        "torch": torch.__version__,
        "compiled": sum(b.error is None for b in builds),
        "failed": [dataclasses.asdict(b) for b in builds if b.error],
        "compile_seconds": round(sum(b.seconds for b in builds), 1),
        "max_spill_stores": max((b.spill_stores or 0 for b in builds), default=0),
        "builds": [dataclasses.asdict(b) for b in builds],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm.kernels._aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90, H100/H200)")
    parser.add_argument("--quick", action="store_true", help="one case per kernel path (CI)")
    parser.add_argument("--only", help="cases whose name contains this text")
    parser.add_argument("--json", help="write the builds and a summary here (rewritten after every case)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)

    def write(builds):
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(summary(builds), f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    # A cold cache in a temporary folder: every variant is compiled (compile time, ptxas's report).
    with tempfile.TemporaryDirectory() as cache:
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
        builds = compile_all(args.arch, args.quick, args.only, echo=lambda s: print(s, flush=True), jobs=args.jobs,
                             on_case=write)
    result = summary(builds)
    write(builds)
    print(f"triton {result['triton']}: {result['compiled']} variants compiled for sm_{args.arch}, "
          f"{len(result['failed'])} failed, {result['compile_seconds']} s of compilation, "
          f"max spill {result['max_spill_stores']} B/thread", flush=True)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
