"""`fusedlm bench`: runs the benchmark suites and prints the side-by-side ratio table.

    fusedlm bench                 # the quick default set (a few minutes on 2 cores)
    fusedlm bench --full          # the whole grid of every suite
    fusedlm bench --suite nf4     # one suite (repeatable)
    fusedlm bench --isa avx2      # fusedlm's kernels and torch's capped at AVX2 (as on an AVX2-only CPU)
    fusedlm bench --gpu           # the ops on CUDA tensors against the GPU peers (benchmarks/gpu_run.py)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

from .. import _io, _validate
from . import _harness

# suite name -> module in this package exposing run(full: bool) -> list[Row]
SUITES = {
    "attention": "bench_attention",
    "lora": "bench_lora",
    "nf4": "bench_nf4",
    "sampling": "bench_sampling",
    "models": "bench_models",
    "training": "bench_training",
    "peft": "bench_peft",
    "integrations": "bench_integrations",
    "generation": "bench_generation",
    "decode": "bench_decode",
}

# --isa LEVEL caps fusedlm's kernels (FUSEDLM_MAX_ISA) and torch's the same way, so one machine
# shows the paths another would take: ATen's own dispatch, MKL and oneDNN read these variables
# once, at start-up, hence the fresh process.
ISA_CAPS = {
    "scalar": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "avx512_bf16": {},
}


def _capped_environment(isa: str) -> dict[str, str] | None:
    """The environment of a process capped at `isa`, or None if this one already is."""
    wanted = {"FUSEDLM_MAX_ISA": isa, **ISA_CAPS[isa]}
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return None
    return {**os.environ, **wanted}


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    try:
        return _validate.integer("value", value, low=1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedlm bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="run the whole grid (slow) instead of the quick set")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="run only this suite (repeatable)")
    parser.add_argument("--out", default="bench-results", help="folder for results.json and results.png (default: %(default)s)")
    parser.add_argument("--threads", type=_threads, default=None, help="torch/fusedlm threads (default: torch's default)")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), default=None,
                        help="cap the SIMD level of fusedlm's kernels and of torch's (a fresh process is started)")
    parser.add_argument("--gpu", action="store_true", help="the GPU suites instead (python -m fusedlm.benchmarks.gpu_run)")
    args = parser.parse_args(argv)
    try:  # before any suite runs: a --full run must not end in an unwritable folder
        _io.check_writable_folder(args.out, "--out")
    except ValueError as e:
        parser.error(str(e))
    if args.gpu:
        from . import gpu_run

        return gpu_run.main(["--json", os.path.join(args.out, "gpu-results.json")]
                            + [f"--suite={s}" for s in args.suite or [] if s in gpu_run.SUITES])
    if args.isa:
        env = _capped_environment(args.isa)
        if env is not None:
            sys.stdout.flush()
            argv = sys.argv[1:] if argv is None else argv
            os.execve(sys.executable, [sys.executable, "-m", "fusedlm.benchmarks.run", *argv], env)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(_harness.header(_harness.machine_info()), flush=True)
    rows: list[_harness.Row] = []
    for name in args.suite or list(SUITES):
        module = importlib.import_module(f"{__package__}.{SUITES[name]}")
        start = time.perf_counter()
        print(f"\n== {name} ({'full grid' if args.full else 'quick set'}) ==", flush=True)
        suite_rows = module.run(full=args.full)
        print(_harness.ratio_table(suite_rows))
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
        rows += suite_rows
    json_path, png_path = _harness.write_results(rows, args.out)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
