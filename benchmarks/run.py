"""`fusedlm bench`: runs the benchmark suites and prints the side-by-side ratio table.

    fusedlm bench                 # the quick default set (a few minutes on 2 cores)
    fusedlm bench --full          # the whole grid of every suite
    fusedlm bench --suite nf4     # one suite (repeatable)
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedlm bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="run the whole grid (slow) instead of the quick set")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="run only this suite (repeatable)")
    parser.add_argument("--out", default="bench-results", help="folder for results.json and results.png (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch/fusedlm threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = _harness.machine_info()
    print("fusedlm bench — " + ", ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
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
