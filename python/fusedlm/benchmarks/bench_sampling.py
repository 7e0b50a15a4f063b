"""Token sampling (temperature -> top-k -> top-p -> draw) on the CPU: fusedlm vs the usual paths.

Per case (float32 logits ``[B, V]``, ``torch.randn`` scaled by 3 so the distribution is peaked
like a language model's): fusedlm's cpu kernel; transformers' Temperature/TopK/TopP logits
warpers + softmax + ``torch.multinomial`` (what ``generate(do_sample=True)`` runs); a plain torch
sort-based top-k/top-p + multinomial; fusedlm's reference; and the one-read limits
``logits.amax(-1)`` and ``logits.max(-1)`` (lower bounds for anything that reads the logits once).

Quick set: B=32, V=128256 with (T=0.7, k=50, p=0.9), top-p only (p=0.9), top-k only (k=50).
``--full``: B in {1, 32, 128} x V in {32000, 128256} x those three parameter sets.
Issue #10's targets (B=32, V=128256): each parameter set >= 50x transformers and within 10x of the
one-read floor ``logits.amax(-1)`` (``max(-1)`` also computes indices: a limit, not the floor).
"""
from __future__ import annotations

import torch

from fusedlm import ops

from ._harness import Row, timed, timeit

SUITE = "sampling"
PARAM_SETS = {"T=0.7 k=50 p=0.9": (0.7, 50, 0.9), "top-p 0.9": (1.0, 0, 0.9), "top-k 50": (1.0, 50, 1.0)}


def _transformers_sampler(temperature, top_k, top_p):
    try:
        from transformers.generation import logits_process as lp
    except ImportError:
        return None
    warpers = []
    if temperature != 1.0:
        warpers.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p))
    processors = lp.LogitsProcessorList(warpers)

    def run(logits, generator):
        scores = processors(None, logits)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]

    return run


def torch_sort_sampler(logits, temperature, top_k, top_p, generator):
    """The common plain-torch path: one descending sort serves both top-k and top-p."""
    x = logits / temperature
    values, indices = x.sort(dim=-1, descending=True)
    if top_k:
        values = values.masked_fill(values < values[:, top_k - 1 : top_k], float("-inf"))
    if top_p < 1.0:
        probs = values.softmax(-1)
        before = probs.cumsum(-1) - probs
        values = values.masked_fill(before >= top_p, float("-inf"))
    choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
    return indices.gather(1, choice)[:, 0]


def run(full: bool) -> list[Row]:
    shapes = [(b, v) for b in (1, 32, 128) for v in (32000, 128256)] if full else [(32, 128256)]
    g = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for B, V in shapes:
        logits = torch.randn(B, V, generator=torch.Generator().manual_seed(B + V)) * 3
        max_ms = timeit(lambda: logits.max(-1))
        amax_ms = timeit(lambda: logits.amax(-1))  # values only: the one-read floor
        for label, (t, k, p) in PARAM_SETS.items():
            case = f"B={B} V={V} {label} fp32"
            with ops.use_backend("cpu"):
                rows.append(timed(SUITE, case, "fusedlm[cpu]", lambda: ops.sample(logits, temperature=t, top_k=k, top_p=p, generator=g)))
            rows[-1].extra["x_amax_floor"] = rows[-1].ms / amax_ms
            hf = _transformers_sampler(t, k, p)
            if hf is None:
                print("  (transformers not installed: its warpers are skipped)")
            else:
                rows.append(timed(SUITE, case, "transformers warpers + multinomial", lambda: hf(logits, g), min_repeat=3))
            rows.append(timed(SUITE, case, "torch sort + multinomial", lambda: torch_sort_sampler(logits, t, k, p, g), min_repeat=3))
            if full or B * V <= 32 * 128256:
                with ops.use_backend("reference"):
                    ref_ms = timeit(lambda: ops.sample(logits, temperature=t, top_k=k, top_p=p, generator=g), warmup=1, min_repeat=3)
                rows.append(Row(SUITE, case, "fusedlm[reference]", ref_ms))
            rows.append(Row(SUITE, case, "logits.max(-1)", max_ms, floor=True))
            rows.append(Row(SUITE, case, "logits.amax(-1)", amax_ms, floor=True))
    return rows
