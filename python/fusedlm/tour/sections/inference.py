"""Section 9: inference: the SFT model with its block linears in 4-bit NF4 (memory, decode tokens/s,
quality against the float32 model), and the kernel speed-ups `fusedlm bench` measures here (a
short run of its quick set)."""
from __future__ import annotations

import copy
import importlib
import statistics
import time

import torch

from ... import peft
from ..context import Context
from ..data import accuracy, generate_text, instruction_prompt, left_pad, pack, qa_prompt
from ..report import Section, Table

NEW_TOKENS = 32


def model_mib(model) -> float:
    """MiB of the model's parameters and buffers (the NF4 bytes and quantisation state included)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


@torch.no_grad()
def decode_tokens_per_s(ctx: Context, model, batch: int) -> float:
    """Greedy decoding of NEW_TOKENS tokens (no early stop) for `batch` prompts: median of 3 runs."""
    from ...generation import generate

    prompts = [instruction_prompt(f"Tell me about {p.name}.") for p in ctx.world.seen[:batch]]
    ids, mask = left_pad([ctx.tok.encode(p) for p in prompts], ctx.tok.pad_id)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                 eos_token_id=ctx.tok.eos_id, pad_token_id=ctx.tok.pad_id)
        times.append(time.perf_counter() - start)
    return batch * NEW_TOKENS / statistics.median(times)


@torch.no_grad()
def corpus_nll(ctx: Context, model) -> float:
    """Mean next-token loss on the first rows of the pretraining corpus."""
    rows = pack(ctx.tok, ctx.world.corpus, ctx.sizes.seq_len)[: ctx.sizes.batch]
    return model(rows, labels=rows).loss.item()


def bench(ctx: Context, sec: Section, suites: tuple[str, ...]) -> None:
    from ...benchmarks import _harness
    from ...benchmarks.run import SUITES

    rows = []
    for name in suites:
        rows += importlib.import_module(f"fusedlm.benchmarks.{SUITES[name]}").run(full=False)
    _, png = _harness.write_results(rows, ctx.out_dir, name="bench")
    sec.text += [f"`fusedlm bench --suite {' --suite '.join(suites)}` (the quick set), on this machine: peer time / "
                 "fusedlm time, > 1 means fusedlm is faster.", _harness.ratio_table(rows)]
    if png:
        sec.plots.append(png)


def run(ctx: Context) -> Section:
    sec = Section("inference", "Inference: NF4 and the kernels")
    (model,) = ctx.need("sft")
    q = peft.quantize(copy.deepcopy(model), blocksize=64, double_quant=True)
    questions = ctx.world.qa["seen"][: ctx.sizes.n_eval]
    prompts = [qa_prompt(x.question) for x in questions]
    truth = [x.answer for x in questions]
    answers = {name: generate_text(m, ctx.tok, prompts) for name, m in (("float32", model), ("NF4", q))}
    rows = []
    for name, m in (("float32", model), ("NF4 (blocksize 64, double quant)", q)):
        a = answers["float32" if m is model else "NF4"]
        rows.append([name, round(model_mib(m), 3), decode_tokens_per_s(ctx, m, 1), decode_tokens_per_s(ctx, m, 8),
                     corpus_nll(ctx, m), accuracy(a, truth)])
    agree = accuracy(answers["NF4"], answers["float32"])
    sec.text.append(Table("The SFT model in float32 and with every block linear in NF4",
                            ["weights", "MiB", "decode tok/s (batch 1)", "decode tok/s (batch 8)", "corpus loss",
                             "QA accuracy (seen, greedy)"], rows))
    sec.text.append(f"Greedy answers identical in both: {100 * agree:.0f}%. Embeddings, norms and the head stay "
                    f"in float32 (as bitsandbytes' load_in_4bit). Decode: {NEW_TOKENS} new tokens, median of 3. "
                    "At this model's size the matrices are tiny and per-call costs dominate; the NF4 kernels' "
                    "speed shows at real sizes, below.")
    sec.check("NF4 model memory (MiB, vs float32)", rows[0][1], rows[1][1], "down")
    sec.claim("NF4 keeps the corpus loss within 10%", rows[0][4], rows[1][4], "<= 1.1x", passed=rows[1][4] <= 1.1 * rows[0][4])
    if ctx.sizes.bench:
        bench(ctx, sec, ("nf4",) if ctx.mode == "quick" else ("nf4", "sampling", "lora", "attention"))
    else:
        sec.text.append(f"(`fusedlm bench` is not run in --{ctx.mode} mode.)")
    return sec
