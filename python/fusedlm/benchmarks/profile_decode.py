"""Where one decode step of the decode suite's fusedlm model spends its time (issue #21).

    python -m fusedlm.benchmarks.profile_decode                  # NF4, 4 TinyLlama-shape layers
    python -m fusedlm.benchmarks.profile_decode --full           # all 22 layers
    python -m fusedlm.benchmarks.profile_decode --dtype bf16     # nf4 | bf16 | fp32
    python -m fusedlm.benchmarks.profile_decode --isa avx2       # kernels and torch capped at AVX2

The model is the decode suite's (``bench_decode``: same shape, same random weights; NF4 is the
bf16 model with every block linear quantised, bf16 head). After a prompt, greedy steps of one
token run under ``torch.profiler``, each compiled fusedlm kernel wrapped in a ``record_function``
named ``fusedlm._C.<entry>``. A step's wall time is split into

* fusedlm kernels: the self time of those ``fusedlm._C.*`` ranges;
* torch matmuls: the self time of ``aten::mm`` / ``addmm`` / ``bmm`` (dense weights, the LM head);
* other aten ops: the self time of every other ``aten::`` op (norms, RoPE, residual adds, cache
  writes, copies: the small ops);
* outside any op: the rest (Python, custom-op dispatch, argument checks).

The profiler adds a few microseconds to each op it records, which lands in "outside"; the step
time without the profiler is printed beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

KERNEL_PREFIX = "fusedlm._C."
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
# entry points of fusedlm._C that run a kernel (the profile wraps each in a record_function)
KERNEL_ENTRIES = ("nf4_gemv", "attention_forward", "dense_gemv", "rms_norm", "rope_cache")


def build_model(dtype: str, n_layers: int):
    """The decode suite's fusedlm model in `dtype` ("nf4", "bf16", "fp32") with `n_layers` layers."""
    from fusedlm.peft import qlora

    from .bench_decode import BLOCKSIZE, SHAPE, _fusedlm_model

    model = _fusedlm_model({**SHAPE, "n_layers": n_layers})
    if dtype == "fp32":
        return model
    model = model.to(torch.bfloat16)
    return qlora.quantize(model, blocksize=BLOCKSIZE) if dtype == "nf4" else model


@contextlib.contextmanager
def _kernel_ranges():
    """Wraps each compiled entry point of fusedlm._C in a profiler range while inside."""
    from fusedlm.ops._backends import cpu_module

    module = cpu_module()
    originals = {name: getattr(module, name) for name in KERNEL_ENTRIES if hasattr(module, name)}

    def wrapped(name, fn):
        def call(*args):
            with torch.profiler.record_function(KERNEL_PREFIX + name):
                return fn(*args)
        return call

    for name, fn in originals.items():
        setattr(module, name, wrapped(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def _decode_steps(model, prompt_len: int, steps: int):
    """A function that decodes `steps` greedy tokens after a prompt (the cache reset each time)."""
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, prompt_len + steps + 1)
    last = model(prompt, cache=cache, last_logits_only=True).logits[:, -1:].argmax(-1)

    def run():
        cache.truncate(prompt_len)
        token = last
        for _ in range(steps):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)  # (1, 1)
        return token

    return run


def profile(dtype: str = "nf4", n_layers: int = 4, steps: int = 8, prompt_len: int = 32, top: int = 15) -> dict:
    """Profiles `steps` decode steps; returns the split (ms per step) and the top ops."""
    from fusedlm.ops._backends import cpu_module

    model = build_model(dtype, n_layers).eval()
    with torch.inference_mode():
        run = _decode_steps(model, prompt_len, steps)
        run()
        plain = []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            plain.append((time.perf_counter() - t0) * 1e3 / steps)
        with _kernel_ranges(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run()
            wall = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    split = {"fusedlm kernels": 0.0, "torch matmuls": 0.0, "other aten ops": 0.0}
    rows = []
    for e in events:
        self_ms = e.self_cpu_time_total / 1e3 / steps
        if e.key.startswith(KERNEL_PREFIX):
            split["fusedlm kernels"] += self_ms
        elif e.key in MATMULS:
            split["torch matmuls"] += self_ms
        elif e.key.startswith("aten::"):
            split["other aten ops"] += self_ms
        else:
            continue
        rows.append((self_ms, e.count // steps, e.key))
    split["outside any op"] = max(0.0, wall - sum(split.values()))
    rows.sort(reverse=True)
    return {"dtype": dtype, "n_layers": n_layers, "steps": steps, "isa": cpu_module().active_isa(),
            "threads": torch.get_num_threads(), "step_ms_profiled": wall, "step_ms": sorted(plain)[1],
            "split_ms": split, "top": rows[:top]}


def report(result: dict) -> str:
    wall = result["step_ms_profiled"]
    lines = [f"decode step, fusedlm {result['dtype']}, {result['n_layers']} TinyLlama-shape layers, "
             f"{result['steps']} steps, isa {result['isa']}, {result['threads']} threads",
             f"  step {result['step_ms']:.2f} ms without the profiler, {wall:.2f} ms under it "
             f"({1e3 / result['step_ms']:.1f} tok/s)"]
    for name, ms in result["split_ms"].items():
        lines.append(f"  {name:16s} {ms:8.2f} ms  {100 * ms / wall:5.1f}%")
    lines.append("  top ops by self time per step:")
    for ms, count, key in result["top"]:
        lines.append(f"    {ms:8.3f} ms  {count:5d} calls  {1e3 * ms / max(count, 1):8.1f} us/call  {key}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm.benchmarks.profile_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="all 22 layers (default: the quick suite's 4)")
    parser.add_argument("--dtype", choices=("nf4", "bf16", "fp32"), default="nf4")
    parser.add_argument("--steps", type=int, default=8, help="decode steps profiled (default: %(default)s)")
    parser.add_argument("--top", type=int, default=15, help="ops listed (default: %(default)s)")
    parser.add_argument("--isa", choices=("scalar", "avx2", "avx512", "avx512_bf16"), default=None,
                        help="cap fusedlm's and torch's SIMD level (a fresh process is started)")
    args = parser.parse_args(argv)
    if args.isa is not None:
        from .run import _capped_environment

        env = _capped_environment(args.isa)
        if env is not None:
            rest = [a for a in (argv if argv is not None else sys.argv[1:])]
            os.execve(sys.executable, [sys.executable, "-m", "fusedlm.benchmarks.profile_decode", *rest], env)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    print(report(profile(args.dtype, 22 if args.full else 4, args.steps, top=args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
