"""`fusedlm tour`: every idea of the library measured end to end on a synthetic world.

    fusedlm tour                  # --quick, the default: under ten minutes on 2 cores
    fusedlm tour --smoke          # tiny sizes, a minute or two (CI)
    fusedlm tour --full --out tour-full --seed 1

Writes OUT/report.md (tables and PNG plots), OUT/summary.json (every check) and OUT/tokenizer.json,
and prints the summary table. Offline, CPU, deterministic for a seed (and thread count: one by default); timings
(time per step, tokens/s) are measurements and vary.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import traceback

import torch

from .. import _io
from . import report
from .context import Context
from .sizes import MODES

# (key, module in tour.sections): the order is the order of the report, and later sections use
# the models earlier ones trained.
SECTIONS = (
    ("world", "world_section"),
    ("architectures", "architectures"),
    ("masks", "masks"),
    ("pretraining", "pretraining"),
    ("alignment", "alignment"),
    ("finetuning", "finetuning"),
    ("decoding", "decoding"),
    ("hallucination", "hallucination"),
    ("inference", "inference"),
)


# The packages outside fusedlm's own dependencies that each section needs (the [tour] extra):
# checked before anything runs, so a tour never trains for minutes to report sections missing.
NEEDS = {
    "world": ("tokenizers",),  # the BPE tokenizer every later section encodes with
    "masks": ("matplotlib",), "pretraining": ("matplotlib",), "alignment": ("matplotlib",),
    "finetuning": ("matplotlib",), "decoding": ("matplotlib",), "hallucination": ("matplotlib", "bm25s"),
}
ALWAYS = ("tqdm",)  # the progress bars


def missing_packages(sections: list[str]) -> dict[str, list[str]]:
    """{package: [sections that need it]} for the needed packages that are not installed."""
    out: dict[str, list[str]] = {}
    for package in ALWAYS:
        if importlib.util.find_spec(package) is None:
            out.setdefault(package, []).append("every section")
    for key in sections:
        for package in NEEDS.get(key, ()):
            if importlib.util.find_spec(package) is None:
                out.setdefault(package, []).append(key)
    return out


def _run_section(ctx: Context, index: int, key: str, module: str) -> report.Section:
    torch.manual_seed(ctx.seed * 1000 + index)
    start = time.perf_counter()
    try:
        sec = importlib.import_module(f"{__package__}.sections.{module}").run(ctx)
    except ImportError as e:  # a base package (fusedlm.peft / generation / training) or a name in it
        sec = report.Section(key, key.capitalize())
        sec.missing(f"{e.name or e} missing ({e})")
    except KeyError as e:  # a model an earlier section should have trained
        sec = report.Section(key, key.capitalize())
        sec.missing(str(e.args[0]) if e.args else str(e))
    except Exception:
        sec = report.Section(key, key.capitalize(), status="failed")
        sec.text.append("```\n" + traceback.format_exc() + "```")
    sec.seconds = time.perf_counter() - start
    return sec


def _header(ctx: Context, argv: list[str], wall: float) -> list[str]:
    from ..benchmarks._harness import machine_info

    info = machine_info()
    s = ctx.sizes
    return [
        "# fusedlm tour",
        "",
        f"`fusedlm tour {' '.join(argv)}` — mode **{ctx.mode}**, seed {ctx.seed}, {torch.get_num_threads()} torch "
        f"thread(s), wall time {wall:.0f} s.",
        "",
        "Machine: " + ", ".join(f"{k}: {v}" for k, v in info.items() if v is not None) + ".",
        "",
        f"Sizes: {s.n_seen} seen + {s.n_unseen} unseen people, vocabulary {s.vocab_size}, models d={s.d_model}, "
        f"{s.n_layers} layers, {s.n_heads} heads, sequences of {s.seq_len}, batch {s.batch}.",
    ]


def print_summary(sections: list[report.Section]) -> None:
    rows = [["section", "status", "s"]] + [[x.title, x.status, f"{x.seconds:.0f}"] for x in sections]
    checks = [["section", "kind", "metric", "before", "after", "held"]]
    checks += [[c.stage, "claim" if c.claim else "stage", c.metric, report.fmt(c.before), report.fmt(c.after),
                "yes" if c.passed else ("no" if c.claim else "NO")] for x in sections for c in x.checks]
    for table in (rows, checks):
        widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
        for r in table:
            print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
        print()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fusedlm tour", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    for name in MODES:
        mode.add_argument(f"--{name}", dest="mode", action="store_const", const=name, help=f"{name} sizes")
    parser.add_argument("--out", default="tour-report", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, the models and every draw (default: 0)")
    # One thread by default: the tour's matrices are small, and where other jobs share the cores two
    # torch threads spin waiting on each other (measured: --smoke 410 s with 2 threads, ~90 s with 1,
    # load ~4 on 2 cores); one thread also keeps the numbers independent of the core count.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s; 0: torch's default)")
    parser.add_argument("--only", action="append", choices=[k for k, _ in SECTIONS],
                        help="run only these sections (repeatable; the world always runs, and sections whose "
                             "models an unselected section trains report them missing)")
    args = parser.parse_args(argv)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        _io.check_writable_folder(args.out, "--out")
    except ValueError as e:
        parser.error(str(e))
    chosen = [k for k, _ in SECTIONS if not args.only or k == "world" or k in args.only]
    missing = missing_packages(chosen)
    if missing:
        needs = "; ".join(f"{p} ({', '.join(keys)})" for p, keys in missing.items())
        parser.error(f"packages the tour needs are not installed: {needs}. Install them with pip install 'fusedlm[tour]'"
                     + ("" if "every section" in sum(missing.values(), []) else ", or leave those sections out (--only)"))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _tour(args, argv)
    finally:  # a caller (a test session, a notebook) gets its threads and global RNG back
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def _tour(args, argv: list[str]) -> int:
    from tqdm.auto import tqdm

    os.makedirs(args.out, exist_ok=True)
    ctx = Context(args.mode or "quick", MODES[args.mode or "quick"], args.seed, args.out)
    chosen = [(i, k, m) for i, (k, m) in enumerate(SECTIONS) if not args.only or k == "world" or k in args.only]
    start, sections = time.perf_counter(), []
    bar = tqdm(chosen, desc="fusedlm tour", unit="section")
    for i, key, module in bar:
        bar.set_postfix_str(key)
        sections.append(_run_section(ctx, i, key, module))
        bar.write(f"  {key}: {sections[-1].status} ({sections[-1].seconds:.0f} s)")
    wall = time.perf_counter() - start
    path = report.write(args.out, _header(ctx, argv, wall), sections)
    print()
    print_summary(sections)
    print(f"wrote {path} ({wall:.0f} s)")
    return 1 if any(x.status == "failed" for x in sections) else 0
