"""Section 5: alignment of the pretrained decoder: SFT (loss on the response only) -> a reward model
on preference pairs (correct vs fabricated answers) -> DPO and PPO from the SFT model."""
from __future__ import annotations

import copy
import random

from ...training import lm_loss, pad_collate, sft
from ..context import Context
from ..data import accuracy, generate_text, instruction_prompt, qa_prompt, reading_examples
from ..report import Section, Table, plot
from ..train import fit, mean_loss
from ..world import fresh_people


def qa_accuracy(ctx: Context, model, qas, with_passage: bool = False) -> float:
    """Greedy answers to `qas` (closed book, or with the person's passage and a distractor) vs the truth."""
    passages = {p.name: p.passage() for p in ctx.world.people}
    names = list(passages)
    prompts = []
    for i, q in enumerate(qas):
        if with_passage:
            distractor = passages[names[(names.index(q.person) + 1 + i) % len(names)]]
            prompts.append(qa_prompt(q.question, [passages[q.person], distractor][:: 1 if i % 2 else -1]))
        else:
            prompts.append(qa_prompt(q.question))
    return accuracy(generate_text(model, ctx.tok, prompts), [q.answer for q in qas])


def probes(ctx: Context, model) -> dict[str, float]:
    n = ctx.sizes.n_eval
    w = ctx.world
    return {"seen, closed book": qa_accuracy(ctx, model, w.qa["seen"][:n]),
            "unseen, closed book": qa_accuracy(ctx, model, w.qa["unseen"][:n]),
            "unseen, passage in the prompt": qa_accuracy(ctx, model, w.qa["unseen"][:n], with_passage=True)}


def sft_data(ctx: Context) -> list[dict]:
    """Closed-book QA of the train people (x3), reading questions about fresh people (only the
    context has the answer), and "Tell me about X" instructions: prompt + response token ids."""
    w, tok = ctx.world, ctx.tok
    pairs = [(qa_prompt(q.question), q.answer) for q in w.qa["train"]] * 3
    fresh = fresh_people(ctx.sizes.n_reading, ctx.seed + 1, exclude={p.name for p in w.people})
    pairs += reading_examples(fresh, ctx.seed)
    pairs += [(instruction_prompt(i), r) for i, r in w.instructions]
    random.Random(ctx.seed).shuffle(pairs)
    return [sft.sft_example(tok.encode(p), tok.encode(r), eos_token_id=tok.eos_id) for p, r in pairs]


def run(ctx: Context) -> Section:
    sec = Section("alignment", "Alignment: SFT, reward model, DPO, PPO")
    (base,) = ctx.need("decoder")
    s = ctx.sizes
    model = copy.deepcopy(base)
    before = probes(ctx, model)
    data = sft_data(ctx)
    history = fit(ctx, model, lm_loss, data, steps=s.sft_steps, lr=1e-3, salt=5, collate=pad_collate).history
    after = probes(ctx, model)
    ctx.models["sft"] = model
    sec.text.append(f"SFT on {len(data)} prompt/response examples with the loss on the response only "
                    "(`fusedlm.training.sft.sft_example`, `lm_loss`, the Trainer): closed-book questions about "
                    "the train people, reading questions about people in no corpus (the answer is only in the "
                    "passages of the prompt), and biographies on request.")
    sec.check("SFT loss", mean_loss(history, True), mean_loss(history, False), "down")
    sec.check("SFT: seen questions answered (closed book)", before["seen, closed book"], after["seen, closed book"], "up")
    sec.check("SFT: unseen questions answered from the passage", before["unseen, passage in the prompt"],
              after["unseen, passage in the prompt"], "up")
    stages = {"pretrained": before, "SFT": after}
    sec.tables.append(Table("Answer accuracy (greedy, exact) after each stage", ["stage", *before],
                            [[k, *v.values()] for k, v in stages.items()]))

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for i, probe in enumerate(before):
            ax.bar([j + 0.25 * i for j in range(len(stages))], [v[probe] for v in stages.values()], width=0.25, label=probe)
        ax.set_xticks([j + 0.25 for j in range(len(stages))], list(stages))
        ax.set_ylabel("answer accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Accuracy through the alignment stages")

    sec.plots.append(plot(ctx.path("alignment.png"), draw))
    return sec
