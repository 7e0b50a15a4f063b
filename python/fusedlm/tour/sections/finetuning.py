"""Section 6: fine-tuning methods on a new task, from the same pretrained decoder: full fine-tuning,
LoRA, QLoRA, AdaPtLoRA (two tasks in one batch), prompt tuning, prefix tuning, P-tuning, and
Pfeiffer / Houlsby bottleneck adapters. Each trains with the same Trainer, data and steps.

The task is new to the pretrained model: read a passage about a person no corpus mentions and give
their birthplace ("... works as a baker.\\nBirthplace:" -> "Morvik"); AdaPtLoRA learns it together
with a second task, the job ("...\\nJob:" -> "baker"), each sequence of a batch naming its task.
"""
from __future__ import annotations

import copy
import time

import torch

from ... import peft
from ...training import lm_loss, pad_collate, sft
from ..context import Context
from ..report import Section, Table, plot
from ..train import exact_match, fit, mean_loss, sequence_logprob

TASKS = ("city", "job")
TEMPLATES = {"city": "Birthplace of {name} =", "job": "Job of {name} ="}


def examples(ctx: Context, people, task: str) -> tuple[list[list[int]], list[list[int]]]:
    tok = ctx.tok
    return ([tok.encode(TEMPLATES[task].format(name=p.name)) for p in people], [tok.encode(p.value(task)) for p in people])


def train_set(ctx: Context, people, tasks=("city",)) -> list[dict]:
    out = []
    for t, task in enumerate(tasks):
        for prompt, answer in zip(*examples(ctx, people, task)):
            ex = sft.sft_example(prompt, answer, eos_token_id=ctx.tok.eos_id)
            if len(tasks) > 1:
                ex["task_ids"] = t
            out.append(ex)
    return out


def resident_mib(model, optimizer) -> float:
    """MiB of the model's tensors (4-bit bytes included), its gradients and the optimizer state."""
    tensors = list(model.state_dict().values()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()) / 2**20


def methods(ctx: Context) -> dict:
    """name -> (make(base copy) -> model to train, learning rate, tasks)."""
    prompt_init = ctx.tok.encode("The birthplace of the person is")
    return {
        "full fine-tuning": (lambda m: m, 1e-3, ("city",)),
        "LoRA r=8 (q, v)": (lambda m: peft.apply_lora(m, r=8, alpha=16, targets=("q", "v")), 1e-2, ("city",)),
        # all seven targets adapt ~8x the parameters of q, v: at LoRA-q,v's 1e-2 they memorise the training
        # people (loss 0.004) and generalise worse, NF4 or not (seed 0, quick: QLoRA 0.175-0.325 task accuracy,
        # LoRA all 7 on the float base 0.275; at 3e-3: 0.55 and 0.425)
        "QLoRA r=8 (all, NF4)": (lambda m: peft.apply_qlora(m, r=8, alpha=16, targets="all"), 3e-3, ("city",)),
        "AdaPtLoRA (2 tasks)": (lambda m: peft.apply_adaptplora(m, n_tasks=2, n_prompt_tokens=8, r=8, targets=("q", "v")),
                                1e-2, TASKS),
        "prompt tuning (16)": (lambda m: peft.apply_prompt_tuning(m, n_virtual_tokens=16, init_token_ids=prompt_init),
                               3e-2, ("city",)),
        "prefix tuning (16)": (lambda m: peft.apply_prefix_tuning(m, n_virtual_tokens=16), 3e-2, ("city",)),
        "P-tuning (16, MLP)": (lambda m: peft.apply_p_tuning(m, n_virtual_tokens=16, encoder="MLP"), 1e-2, ("city",)),
        "Pfeiffer adapters": (lambda m: peft.apply_adapters(m, kind="pfeiffer"), 1e-2, ("city",)),
        "Houlsby adapters": (lambda m: peft.apply_adapters(m, kind="houlsby"), 1e-2, ("city",)),
    }


def evaluate(ctx: Context, model, people, tasks) -> tuple[list[float], float]:
    """Exact-answer accuracy on each task, and the mean log p(true answer) on the first."""
    acc = []
    for t, task in enumerate(tasks):
        prompts, answers = examples(ctx, people, task)
        kwargs = {"task_ids": torch.full((len(people),), t)} if len(tasks) > 1 else {}
        acc.append(exact_match(model, prompts, answers, ctx.tok.pad_id, **kwargs).float().mean().item())
        if t == 0:
            logp = sequence_logprob(model, prompts, answers, ctx.tok.pad_id, **kwargs).mean().item()
    return acc, logp


def run(ctx: Context) -> Section:
    from ...benchmarks.bench_nf4 import peak_alloc_mib

    sec = Section("finetuning", "Fine-tuning methods on a new task")
    (base,) = ctx.need("decoder")
    s = ctx.sizes
    trained = {q.person for q in ctx.world.qa["train"]}
    train_people = [p for p in ctx.world.seen if p.name in trained]
    test_people = [p for p in ctx.world.seen if p.name not in trained]
    batch = s.batch // 2
    (before,), logp_before = evaluate(ctx, base, test_people, ("city",))
    rows, results = [], {}
    for name, (make, lr, tasks) in methods(ctx).items():
        model = make(copy.deepcopy(base))
        trainable, total = peft.trainable_parameters(model)
        start = time.perf_counter()
        trainer = fit(ctx, model, lm_loss, train_set(ctx, train_people, tasks), steps=s.finetune_steps, lr=lr, salt=6,
                      collate=pad_collate, batch_size=batch)
        step_ms = 1e3 * (time.perf_counter() - start) / s.finetune_steps
        peak = resident_mib(model, trainer.optimizer) + peak_alloc_mib(trainer.train_step)  # one more step, lr ~ 0
        acc, logp = evaluate(ctx, model, test_people, tasks)
        results[name] = (trainable, total, acc[0], logp, mean_loss(trainer.history, True, 5), mean_loss(trainer.history, False, 5))
        rows.append([name, trainable, f"{100 * trainable / total:.3f}%", round(peak, 1), round(step_ms, 1), acc[0],
                     acc[1] if len(acc) > 1 else None])
    sec.text.append(f"Task: \"{TEMPLATES['city'].format(name='<name>')}\" -> the birthplace, {len(train_people)} training "
                    f"people, {len(test_people)} test people (seen in pretraining, never asked). Every method: "
                    f"{s.finetune_steps} steps of batch {batch}, the same Trainer (AdamW, cosine; the learning rate "
                    "each method is usually run with). Accuracy: exact answer (teacher-forced argmax). "
                    f"Before fine-tuning: {before:.3f}. Peak memory: the model's tensors, gradients and optimizer state "
                    "plus the peak of torch's allocations during one step (torch.profiler). Time per step includes "
                    "batching; tiny models make the NF4 kernels look slow (their cost is fixed per call).")
    sec.tables.append(Table("Fine-tuning methods", ["method", "trainable", "trainable %", "peak MiB", "ms / step",
                                                    "birthplace accuracy", "job accuracy (AdaPtLoRA's 2nd task)"], rows))
    peft_results = [v for k, v in results.items() if k != "full fine-tuning"]
    worst = max(results, key=lambda k: results[k][5] / results[k][4])
    sec.check(f"every method lowers its training loss (first vs last 5 steps; the least: {worst})", results[worst][4],
              results[worst][5], "down")
    sec.claim("full fine-tuning: log p(true answer), test people", logp_before, results["full fine-tuning"][3], "up")
    sec.claim("every PEFT method: log p(true answer), test people (the lowest)", logp_before,
              min(v[3] for v in peft_results), "up")
    sec.claim("full fine-tuning: task accuracy", before, results["full fine-tuning"][2], "up")
    sec.claim("best PEFT method: task accuracy", before, max(v[2] for v in peft_results), "up")
    lora = results["LoRA r=8 (q, v)"]
    sec.check("LoRA trains < 5% of the parameters (%)", None, 100 * lora[0] / lora[1], "< 5", passed=lora[0] < 0.05 * lora[1])

    def draw(fig):
        names = list(results)
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        ax1.barh(names, [100 * v[0] / v[1] for v in results.values()], color="tab:blue")
        ax1.set_xscale("log")
        ax1.set_xlabel("trainable parameters (% of the model, log)")
        ax1.invert_yaxis()
        ax2.barh(names, [v[2] for v in results.values()], color="tab:green")
        ax2.axvline(before, color="gray", ls="--", label="before")
        ax2.set_xlim(0, 1)
        ax2.set_xlabel("task accuracy")
        ax2.set_yticks([])
        ax2.invert_yaxis()
        ax2.legend(fontsize=8)

    sec.plots.append(plot(ctx.path("finetuning.png"), draw, figsize=(10, 4)))
    return sec
