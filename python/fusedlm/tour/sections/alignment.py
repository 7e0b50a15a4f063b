"""Section 5: alignment of the pretrained decoder: SFT (loss on the response only) -> a reward model
on preference pairs (correct vs fabricated answers) -> DPO and PPO from the SFT model."""
from __future__ import annotations

import copy
import random

import torch

from ...training import dpo, lm_loss, pad_collate, ppo, preference, reward, sft
from ..context import Context
from ..data import accuracy, generate_text, instruction_prompt, qa_prompt, reading_examples, right_pad
from ..report import Section, Table, plot
from ..train import fit, mean_loss
from ..world import fabricate, fresh_people


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


def preference_data(ctx: Context, pairs) -> list[dict]:
    tok = ctx.tok
    return [preference.preference_example(tok.encode(qa_prompt(q)), tok.encode(c), tok.encode(r), eos_token_id=tok.eos_id)
            for q, c, r in pairs]


def held_out_pairs(ctx: Context) -> list[tuple[str, str, str]]:
    """(question, true answer, fabricated answer) about the seen test people (never trained on)."""
    w, rng = ctx.world, random.Random(ctx.seed + 5)
    by_name = {p.name: p for p in w.people}
    return [(q.question, q.answer, fabricate(by_name[q.person], q.attribute, rng)) for q in w.qa["seen"][: ctx.sizes.n_eval]]


@torch.no_grad()
def rewards(ctx: Context, reward_model, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """(B,) the reward model's score of each prompt + answer + EOS."""
    tok = ctx.tok
    rows = [sft.sft_example(tok.encode(p), tok.encode(a) or [tok.unk_id], eos_token_id=tok.eos_id)["input_ids"]
            for p, a in zip(prompts, answers)]
    ids, mask = right_pad(rows, tok.pad_id)
    return reward_model.eval()(ids, attention_mask=mask)


def pair_accuracy(ctx: Context, reward_model, pairs) -> float:
    prompts = [qa_prompt(q) for q, _, _ in pairs]
    chosen = rewards(ctx, reward_model, prompts, [c for _, c, _ in pairs])
    rejected = rewards(ctx, reward_model, prompts, [r for _, _, r in pairs])
    return (chosen > rejected).float().mean().item()


def train_sft(ctx: Context, sec: Section, base):
    model = copy.deepcopy(base)
    data = sft_data(ctx)
    history = fit(ctx, model, lm_loss, data, steps=ctx.sizes.sft_steps, lr=1e-3, salt=5, collate=pad_collate).history
    sec.text.append(f"**SFT** on {len(data)} prompt/response examples with the loss on the response only "
                    "(`training.sft.sft_example`, `lm_loss`): closed-book questions about the train people, reading "
                    "questions about people in no corpus (the answer is only in the passages of the prompt), and "
                    "biographies on request.")
    sec.check("SFT loss", mean_loss(history, True), mean_loss(history, False), "down")
    return model


def train_reward(ctx: Context, sec: Section, sft_model):
    pairs = ctx.world.preferences
    rm = reward.RewardModel(copy.deepcopy(sft_model))
    held_out = held_out_pairs(ctx)
    before = pair_accuracy(ctx, rm, pairs), pair_accuracy(ctx, rm, held_out)
    fit(ctx, rm, reward.reward_step, preference_data(ctx, pairs), steps=ctx.sizes.reward_steps, lr=1e-4, salt=7,
        collate=pad_collate)
    after = pair_accuracy(ctx, rm, pairs), pair_accuracy(ctx, rm, held_out)
    sec.text.append(f"**Reward model**: the SFT model with a scalar head read at the last real token "
                    f"(`training.reward.RewardModel`), trained with the Bradley-Terry loss on {len(pairs)} pairs "
                    "(the true answer chosen, a fabricated one of the same kind rejected).")
    sec.tables.append(Table("Reward model: pair accuracy (r(chosen) > r(rejected))", ["pairs", "before", "after"],
                            [["training pairs", before[0], after[0]], ["held-out pairs (seen test people)", before[1], after[1]]]))
    sec.check("reward model: held-out pair accuracy", before[1], after[1], "up")
    return rm.requires_grad_(False)


def train_dpo(ctx: Context, sec: Section, sft_model):
    policy = copy.deepcopy(sft_model)
    stage = dpo.DPO(dpo.frozen_copy(policy), beta=0.1)
    data = preference_data(ctx, ctx.world.preferences)
    held_out = pad_collate(preference_data(ctx, held_out_pairs(ctx)))
    with torch.no_grad():
        before = stage(policy.eval(), held_out)[1]["rewards/margins"]
    fit(ctx, policy, stage, data, steps=ctx.sizes.dpo_steps, lr=1e-4, salt=8, collate=pad_collate)
    with torch.no_grad():
        after = stage(policy.eval(), held_out)[1]["rewards/margins"]
    sec.text.append(f"**DPO** (`training.dpo.DPO`, sigmoid loss, beta 0.1, a frozen copy of the SFT model as the "
                    f"reference) on the same pairs. Held-out implicit-reward margin "
                    f"beta·(Δ log-ratio chosen − rejected): {before:.3f} -> {after:.3f}.")
    sec.check("DPO: held-out chosen-minus-rejected margin", before, after, "up")
    return policy


def train_ppo(ctx: Context, sec: Section, sft_model, reward_model):
    tok, s = ctx.tok, ctx.sizes
    policy = copy.deepcopy(sft_model)
    model = ppo.PolicyAndValue(policy, copy.deepcopy(reward_model).requires_grad_(True))
    cfg = ppo.PPOConfig(rollout_batch_size=16, mini_batch_size=8, num_ppo_epochs=2, response_length=6, temperature=0.7,
                        stop_token_id=tok.eos_id, pad_token_id=tok.pad_id, seed=ctx.seed)
    prompts = [tok.encode(qa_prompt(q.question)) for q in ctx.world.qa["train"]]
    rollouts = ppo.PPORollouts(model, reward_model, prompts, ref_policy=copy.deepcopy(sft_model).requires_grad_(False),
                               config=cfg)
    per_batch = cfg.num_ppo_epochs * cfg.rollout_batch_size // cfg.mini_batch_size
    history = fit(ctx, model, ppo.PPOLoss(cfg), rollouts, steps=s.ppo_steps * per_batch, lr=3e-5, salt=9,
                  max_grad_norm=None).history
    scores = [r["objective/scores"] for r in history[::per_batch]]
    sec.text.append(f"**PPO** (`training.ppo`, trl 1.12's recipe: value head from the reward model, KL penalty "
                    f"{cfg.kl_coef} against the SFT model, GAE, clipped losses): {s.ppo_steps} batches of "
                    f"{cfg.rollout_batch_size} sampled answers (T={cfg.temperature}) to the train questions, "
                    f"{cfg.num_ppo_epochs} epochs each. Mean rollout reward per batch: "
                    + ", ".join(f"{x:.2f}" for x in scores) + ".")
    sec.check("PPO: mean rollout reward (first vs last batch)", scores[0], scores[-1], "up")
    return policy


def run(ctx: Context) -> Section:
    sec = Section("alignment", "Alignment: SFT, reward model, DPO, PPO")
    (base,) = ctx.need("decoder")
    sft_model = train_sft(ctx, sec, base)
    ctx.models["sft"] = sft_model
    stages = {"pretrained": base, "SFT": sft_model}
    reward_model = train_reward(ctx, sec, sft_model)
    ctx.models["reward"] = reward_model
    stages["DPO"] = ctx.models["dpo"] = train_dpo(ctx, sec, sft_model)
    stages["PPO"] = ctx.models["ppo"] = train_ppo(ctx, sec, sft_model, reward_model)

    seen = ctx.world.qa["seen"][: ctx.sizes.n_eval]
    prompts = [qa_prompt(q.question) for q in seen]
    results = {}
    for name, model in stages.items():
        results[name] = probes(ctx, model)
        answers = generate_text(model, ctx.tok, prompts)
        results[name]["mean reward (seen test, greedy)"] = rewards(ctx, reward_model, prompts, answers).mean().item()
    first = next(iter(results.values()))
    sec.tables.append(Table("Answer accuracy (greedy, exact) and mean reward after each stage", ["stage", *first],
                            [[k, *v.values()] for k, v in results.items()]))
    sec.check("SFT: seen questions answered (closed book)", results["pretrained"]["seen, closed book"],
              results["SFT"]["seen, closed book"], "up")
    for stage in ("DPO", "PPO"):
        before, after = results["SFT"]["seen, closed book"], results[stage]["seen, closed book"]
        sec.claim(f"{stage} keeps the SFT accuracy (seen, closed book)", before, after, ">=", passed=after >= before)
    sec.check("SFT: unseen questions answered from the passage", results["pretrained"]["unseen, passage in the prompt"],
              results["SFT"]["unseen, passage in the prompt"], "up")
    sec.claim("PPO: mean reward vs SFT (greedy, seen test)", results["SFT"]["mean reward (seen test, greedy)"],
              results["PPO"]["mean reward (seen test, greedy)"], "up")

    probes_ = [k for k in first if not k.startswith("mean reward")]

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / len(probes_)
        for i, probe in enumerate(probes_):
            ax.bar([j + width * i for j in range(len(results))], [v[probe] for v in results.values()], width=width, label=probe)
        ax.set_xticks([j + width * (len(probes_) - 1) / 2 for j in range(len(results))], list(results))
        ax.set_ylabel("answer accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Accuracy through the alignment stages")

    sec.plots.append(plot(ctx.path("alignment.png"), draw))
    return sec
