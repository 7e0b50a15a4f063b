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
from ..train import fit, mean_loss, sequence_logprob
from ..world import fabricate, fresh_people


def prompts_for(ctx: Context, qas, with_passage: bool = False) -> list[str]:
    """The questions closed book, or with the person's passage (and k_passages - 1 distractors, the
    gold passage first or last in turn)."""
    if not with_passage:
        return [qa_prompt(q.question) for q in qas]
    passages = {p.name: p.passage() for p in ctx.world.people}
    names = list(passages)
    out = []
    for i, q in enumerate(qas):
        at = names.index(q.person)
        distractors = [passages[names[(at + 1 + i + j) % len(names)]] for j in range(ctx.sizes.k_passages - 1)]
        out.append(qa_prompt(q.question, ([passages[q.person]] + distractors)[:: 1 if i % 2 else -1]))
    return out


PROBES = {"seen, closed book": ("seen", False), "unseen, closed book": ("unseen", False),
          "unseen, passage in the prompt": ("unseen", True)}


def probes(ctx: Context, model) -> dict[str, float]:
    """Greedy answer accuracy (exact) on each probe set."""
    out = {}
    for name, (split, with_passage) in PROBES.items():
        qas = ctx.world.qa[split][: ctx.sizes.n_eval]
        out[name] = accuracy(generate_text(model, ctx.tok, prompts_for(ctx, qas, with_passage)), [q.answer for q in qas])
    return out


def answer_logprob(ctx: Context, model, split: str, with_passage: bool) -> float:
    """Mean log p(true answer + EOS | prompt) over a probe set: moves before accuracy does."""
    tok, qas = ctx.tok, ctx.world.qa[split][: ctx.sizes.n_eval]
    prompts = [tok.encode(p) for p in prompts_for(ctx, qas, with_passage)]
    answers = [tok.encode(q.answer) + [tok.eos_id] for q in qas]
    return sequence_logprob(model, prompts, answers, tok.pad_id).mean().item()


def sft_data(ctx: Context) -> list[dict]:
    """One epoch of SFT examples (sft_steps x batch), half of them reading questions about fresh
    people (each seen once, so they can only be answered by reading the passages), half the
    closed-book questions about the train people and their "Tell me about X" instructions,
    repeated: prompt + response token ids."""
    w, tok, s = ctx.world, ctx.tok, ctx.sizes
    n_reading = s.sft_steps * s.batch // 2
    fresh = fresh_people(n_reading, ctx.seed + 1, exclude=w.names())
    own = [(qa_prompt(q.question), q.answer) for q in w.qa["train"]] + [(instruction_prompt(i), r) for i, r in w.instructions]
    reading = [(prompt, answer) for prompt, answer, _ in reading_examples(fresh, s.k_passages, ctx.seed)]
    pairs = reading + own * max(1, n_reading // len(own))
    random.Random(ctx.seed).shuffle(pairs)
    return [sft.sft_example(tok.encode(p), tok.encode(r), eos_token_id=tok.eos_id) for p, r in pairs]


def preference_pairs(ctx: Context) -> dict[str, list[tuple[str, str, str]]]:
    """(prompt, true answer, fabricated answer) triples. "training": the world's pairs about the
    train people (closed book) and as many reading pairs about fresh people (the passage in the
    prompt); held out: the seen test people closed book, the unseen test people with their passage."""
    w, n, rng = ctx.world, ctx.sizes.n_eval, random.Random(ctx.seed + 5)
    fresh = fresh_people(len(w.preferences), ctx.seed + 3, exclude=w.names())
    out = {"training": [(qa_prompt(q), c, r) for q, c, r in w.preferences]
           + reading_examples(fresh, ctx.sizes.k_passages, ctx.seed + 3)}
    by_name = {p.name: p for p in w.people}
    for name, (split, with_passage) in (("held-out, closed book", ("seen", False)),
                                        ("held-out, passage in the prompt", ("unseen", True))):
        qas = w.qa[split][:n]
        out[name] = [(p, q.answer, fabricate(by_name[q.person], q.attribute, rng))
                     for p, q in zip(prompts_for(ctx, qas, with_passage), qas)]
    return out


def preference_data(ctx: Context, pairs) -> list[dict]:
    tok = ctx.tok
    return [preference.preference_example(tok.encode(p), tok.encode(c), tok.encode(r), eos_token_id=tok.eos_id)
            for p, c, r in pairs]


@torch.no_grad()
def rewards(ctx: Context, reward_model, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """(B,) the reward model's score of each prompt + answer + EOS."""
    tok = ctx.tok
    rows = [sft.sft_example(tok.encode(p), tok.encode(a) or [tok.unk_id], eos_token_id=tok.eos_id)["input_ids"]
            for p, a in zip(prompts, answers)]
    ids, mask = right_pad(rows, tok.pad_id)
    return reward_model.eval()(ids, attention_mask=mask)


def pair_accuracy(ctx: Context, reward_model, pairs) -> float:
    prompts = [p for p, _, _ in pairs]
    chosen = rewards(ctx, reward_model, prompts, [c for _, c, _ in pairs])
    rejected = rewards(ctx, reward_model, prompts, [r for _, _, r in pairs])
    return (chosen > rejected).float().mean().item()


def train_sft(ctx: Context, sec: Section, base):
    model = copy.deepcopy(base)
    data = sft_data(ctx)
    before = [answer_logprob(ctx, model, split, p) for split, p in (("seen", False), ("unseen", True))]
    history = fit(ctx, model, lm_loss, data, steps=ctx.sizes.sft_steps, lr=1e-3, salt=5, collate=pad_collate).history
    after = [answer_logprob(ctx, model, split, p) for split, p in (("seen", False), ("unseen", True))]
    sec.text.append(f"**SFT** on {len(data)} prompt/response examples with the loss on the response only "
                    "(`training.sft.sft_example`, `lm_loss`): closed-book questions about the train people, reading "
                    "questions about people in no corpus (the answer is only in the passages of the prompt), and "
                    "biographies on request.")
    sec.check("SFT loss", mean_loss(history, True), mean_loss(history, False), "down")
    sec.check("SFT: log p(true answer), seen test questions, closed book", before[0], after[0], "up")
    sec.check("SFT: log p(true answer), unseen test questions, passage in the prompt", before[1], after[1], "up")
    return model


def train_reward(ctx: Context, sec: Section, sft_model, pairs):
    rm = reward.RewardModel(copy.deepcopy(sft_model))
    before = {k: pair_accuracy(ctx, rm, v) for k, v in pairs.items()}
    fit(ctx, rm, reward.reward_step, preference_data(ctx, pairs["training"]), steps=ctx.sizes.reward_steps, lr=1e-4,
        salt=7, collate=pad_collate)
    after = {k: pair_accuracy(ctx, rm, v) for k, v in pairs.items()}
    sec.text.append(f"**Reward model**: the SFT model with a scalar head read at the last real token "
                    f"(`training.reward.RewardModel`), trained with the Bradley-Terry loss on {len(pairs['training'])} "
                    "pairs, the true answer chosen and a fabricated one of the same kind rejected: half closed-book "
                    "questions about the train people, half questions about fresh people with their passage.")
    sec.tables.append(Table("Reward model: pair accuracy (r(chosen) > r(rejected))", ["pairs", "before", "after"],
                            [[k, before[k], after[k]] for k in pairs]))
    sec.check("reward model: training pair accuracy", before["training"], after["training"], "up")
    for k in list(pairs)[1:]:
        sec.claim(f"reward model: pair accuracy, {k}", before[k], after[k], "up")
    return rm.requires_grad_(False)


def train_dpo(ctx: Context, sec: Section, sft_model, pairs):
    policy = copy.deepcopy(sft_model)
    stage = dpo.DPO(dpo.frozen_copy(policy), beta=0.1)
    data = preference_data(ctx, pairs["training"])
    probe = {k: pad_collate(preference_data(ctx, v[: ctx.sizes.n_eval])) for k, v in pairs.items()}

    def margins() -> dict[str, float]:
        with torch.no_grad():
            return {k: stage(policy.eval(), b)[1]["rewards/margins"] for k, b in probe.items()}

    before = margins()
    fit(ctx, policy, stage, data, steps=ctx.sizes.dpo_steps, lr=1e-4, salt=8, collate=pad_collate)
    after = margins()
    sec.text.append("**DPO** (`training.dpo.DPO`, sigmoid loss, beta 0.1, a frozen copy of the SFT model as the "
                    "reference) on the same pairs: the implicit-reward margin beta·(log-ratio of chosen − of rejected).")
    sec.check("DPO: chosen-minus-rejected margin, training pairs", before["training"], after["training"], "up")
    for k in list(pairs)[1:]:
        sec.claim(f"DPO: chosen-minus-rejected margin, {k}", before[k], after[k], "up")
    return policy


def train_ppo(ctx: Context, sec: Section, sft_model, reward_model, pairs):
    tok, s = ctx.tok, ctx.sizes
    policy = copy.deepcopy(sft_model)
    model = ppo.PolicyAndValue(policy, copy.deepcopy(reward_model).requires_grad_(True))
    cfg = ppo.PPOConfig(rollout_batch_size=16, mini_batch_size=8, num_ppo_epochs=2, response_length=6, temperature=0.7,
                        stop_token_id=tok.eos_id, pad_token_id=tok.pad_id, seed=ctx.seed)
    prompts = [tok.encode(p) for p, _, _ in pairs["training"]]
    rollouts = ppo.PPORollouts(model, reward_model, prompts, ref_policy=copy.deepcopy(sft_model).requires_grad_(False),
                               config=cfg)
    per_batch = cfg.num_ppo_epochs * cfg.rollout_batch_size // cfg.mini_batch_size
    history = fit(ctx, model, ppo.PPOLoss(cfg), rollouts, steps=s.ppo_steps * per_batch, lr=1e-4, salt=9,
                  max_grad_norm=None).history
    scores = [r["objective/scores"] for r in history[::per_batch]]
    half = max(1, len(scores) // 2)
    sec.text.append(f"**PPO** (`training.ppo`, trl 1.12's recipe: value head from the reward model, KL penalty "
                    f"{cfg.kl_coef} against the SFT model, GAE, clipped losses): {s.ppo_steps} batches of "
                    f"{cfg.rollout_batch_size} sampled answers (T={cfg.temperature}) to the preference prompts, "
                    f"{cfg.num_ppo_epochs} epochs each. Mean rollout reward per batch: "
                    + ", ".join(f"{x:.2f}" for x in scores) + ".")
    sec.check("PPO: mean rollout reward (first vs last half of the batches)", sum(scores[:half]) / half,
              sum(scores[-half:]) / half, "up")
    return policy


def run(ctx: Context) -> Section:
    sec = Section("alignment", "Alignment: SFT, reward model, DPO, PPO")
    (base,) = ctx.need("decoder")
    sft_model = ctx.models["sft"] = train_sft(ctx, sec, base)
    pairs = preference_pairs(ctx)
    reward_model = ctx.models["reward"] = train_reward(ctx, sec, sft_model, pairs)
    stages = {"pretrained": base, "SFT": sft_model}
    stages["DPO"] = ctx.models["dpo"] = train_dpo(ctx, sec, sft_model, pairs)
    stages["PPO"] = ctx.models["ppo"] = train_ppo(ctx, sec, sft_model, reward_model, pairs)

    held_out = [p for k, v in pairs.items() if k != "training" for p, _, _ in v]
    results = {}
    for name, model in stages.items():
        results[name] = probes(ctx, model)
        answers = generate_text(model, ctx.tok, held_out)
        results[name]["mean reward (held-out prompts, greedy)"] = rewards(ctx, reward_model, held_out, answers).mean().item()
    first = next(iter(results.values()))
    sec.tables.append(Table("Answer accuracy (greedy, exact) and mean reward after each stage", ["stage", *first],
                            [[k, *v.values()] for k, v in results.items()]))
    sec.claim("SFT: seen test questions answered (closed book, accuracy)", results["pretrained"]["seen, closed book"],
              results["SFT"]["seen, closed book"], "up")
    sec.claim("SFT: unseen test questions answered from the passage (accuracy)",
              results["pretrained"]["unseen, passage in the prompt"], results["SFT"]["unseen, passage in the prompt"], "up")
    for stage in ("DPO", "PPO"):
        for probe in ("seen, closed book", "unseen, passage in the prompt"):
            before, after = results["SFT"][probe], results[stage][probe]
            sec.claim(f"{stage} keeps or improves the SFT accuracy ({probe})", before, after, ">=", passed=after >= before)
        key = "mean reward (held-out prompts, greedy)"
        sec.claim(f"{stage}: mean reward of greedy answers vs SFT (held-out prompts)", results["SFT"][key],
                  results[stage][key], "up")

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
