"""trl's numbers for the training losses, computed by trl's own code where it runs on tensors.

- DPO and the reward model: trl 1.16's ``DPOTrainer._compute_loss`` and
  ``RewardTrainer.compute_loss``, called on stand-ins for the trainer and the model that hold only
  what those methods read (the per-token log-probs / the rewards), so trl's loss code itself runs.
- PPO: trl 1.12 (the last trl with PPO): ``masked_whiten`` / ``masked_mean`` from its module, and
  the reward shaping, GAE loop and clipped losses of ``PPOTrainer.train`` transcribed line for
  line (trl keeps them inline in that 300-line method; trl/experimental/ppo/ppo_trainer.py lines
  817-903 of 1.12.0).

The tests call these live when the right trl is importable and otherwise compare with the fixture
``data/trl_reference.json`` that this script writes:

    python tests/training/_trl_reference.py dpo                          # trl 1.16 installed
    pip install --no-deps --target /tmp/trl112 trl==1.12.0
    PYTHONPATH=/tmp/trl112 python tests/training/_trl_reference.py ppo   # trl 1.12 on the path
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import types
from collections import defaultdict

import torch

FIXTURE = pathlib.Path(__file__).parent / "data" / "trl_reference.json"
DPO_CASES = [  # (loss_type, beta, label_smoothing)
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0),
    ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0), ("robust", 0.1, 0.2), ("robust", 0.3, 0.0),
]


def trl_version() -> str | None:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return None


def dpo_inputs(seed: int = 0, pairs: int = 6, tokens: int = 9):
    """Per-token log-probs of chosen and rejected completions (policy and reference) and their masks."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * pairs, tokens)
    lengths = torch.randint(1, tokens, (2 * pairs,), generator=g)
    starts = torch.randint(0, 3, (2 * pairs,), generator=g)
    for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        mask[i, s : min(s + n, tokens)] = 1
    policy = -torch.rand(2 * pairs, tokens, generator=g) * 3 * mask
    ref = -torch.rand(2 * pairs, tokens, generator=g) * 3 * mask
    return policy, ref, mask


def trl_dpo(policy_tokens, ref_tokens, completion_mask, *, loss_type, beta, label_smoothing):
    """trl 1.16 DPOTrainer._compute_loss on per-token log-probs (2B, T) ([chosen; rejected]); the
    completion mask (2B, T) marks completion tokens of the shifted sequence. Returns the loss."""
    from trl import DPOTrainer

    two_b, t = policy_tokens.shape
    # the trainer's completion_mask is over input_ids (T + 1 tokens); trl shifts it by one
    full_mask = torch.cat([torch.zeros(two_b, 1), completion_mask], dim=1).long()
    outputs = types.SimpleNamespace(log_probs=policy_tokens, entropy=torch.zeros(two_b, t),
                                    mean_logits=torch.zeros(two_b, t), is_top1=torch.zeros(two_b, t, dtype=torch.bool))
    model = types.SimpleNamespace(training=True)

    def call(**kwargs):
        return outputs

    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        autocast=contextlib.nullcontext)
    trainer = types.SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    ref_logps = ref_tokens.sum(1)
    inputs = {"input_ids": torch.zeros(two_b, t + 1, dtype=torch.long), "attention_mask": torch.ones(two_b, t + 1),
              "completion_mask": full_mask, "ref_chosen_logps": ref_logps[: two_b // 2],
              "ref_rejected_logps": ref_logps[two_b // 2 :]}
    loss = DPOTrainer._compute_loss(trainer, call, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return float(loss), metrics


def reward_inputs(seed: int = 0, pairs: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(pairs, generator=g) * 2, torch.randn(pairs, generator=g) * 2, torch.rand(pairs, generator=g)


def trl_reward(r_chosen, r_rejected, *, margin=None, center=None):
    """trl 1.16 RewardTrainer.compute_loss on given rewards (the model returns them as logits)."""
    from trl import RewardTrainer

    logits = torch.cat([r_chosen, r_rejected])[:, None]  # (2B, 1): the batch is [chosen; rejected]
    model = lambda **kwargs: types.SimpleNamespace(logits=logits)  # noqa: E731
    accelerator = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=accelerator,
                                    args=types.SimpleNamespace(center_rewards_coefficient=center),
                                    _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * len(r_chosen), 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * len(r_chosen), 3)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(trainer, model, inputs)
    return float(loss), trainer._metrics["train"]["accuracy"][-1]


# ---------------------------------------------------------------------------------------------
# PPO (trl 1.12)
# ---------------------------------------------------------------------------------------------
def ppo_inputs(seed: int = 0, batch: int = 5, steps: int = 7):
    """A fixed rollout: sampled tokens' log-probs under the policy and the reference, values,
    scores, each response's last real index (sequence_lengths), and a second forward's outputs."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor([6, 2, 0, 4, 6])[:batch]  # index of the last real token; 6 = no padding
    return dict(logprobs=-torch.rand(batch, steps, generator=g) * 2, ref_logprobs=-torch.rand(batch, steps, generator=g) * 2,
                values=torch.randn(batch, steps, generator=g), scores=torch.randn(batch, generator=g),
                sequence_lengths=seq_lens, new_logprobs=-torch.rand(batch, steps, generator=g) * 2,
                vpred=torch.randn(batch, steps, generator=g))


def trl_ppo(inp: dict, *, kl_estimator: str, kl_coef=0.05, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2):
    """trl 1.12 PPOTrainer.train from "be very careful with padding_mask_p1" to the PPO losses,
    with masked_whiten / masked_mean imported from trl 1.12 itself."""
    from trl.experimental.ppo.ppo_trainer import INVALID_LOGPROB, masked_mean, masked_whiten

    logprobs, ref_logprobs, values = inp["logprobs"].clone(), inp["ref_logprobs"].clone(), inp["values"].clone()
    scores, sequence_lengths = inp["scores"], inp["sequence_lengths"]
    responses = torch.zeros_like(logprobs, dtype=torch.long)
    # --- trl 1.12 ppo_trainer.py, transcribed ---
    response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    raw_advantages = advantages
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    # one micro batch = the whole batch
    new_logprobs = torch.masked_fill(inp["new_logprobs"], padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(inp["vpred"], padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    # --- end of transcription ---
    return dict(kl=kl, rewards=rewards, raw_advantages=raw_advantages, returns=returns, advantages=advantages,
                pg_loss=pg_loss, vf_loss=vf_loss, whiten_rewards=masked_whiten(rewards, ~padding_mask_p1, shift_mean=False))


def _tolist(x):
    return x.tolist() if isinstance(x, torch.Tensor) else x


def main(part: str) -> None:
    data = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    if part == "dpo":
        policy, ref, mask = dpo_inputs()
        data["dpo"] = {"trl": trl_version(), "policy": policy.tolist(), "ref": ref.tolist(), "mask": mask.tolist(), "cases": [
            dict(loss_type=lt, beta=b, label_smoothing=ls, **dict(zip(("loss", "metrics"), trl_dpo(
                policy, ref, mask, loss_type=lt, beta=b, label_smoothing=ls)))) for lt, b, ls in DPO_CASES]}
        rc, rr, margin = reward_inputs()
        data["reward"] = {"trl": trl_version(), "r_chosen": rc.tolist(), "r_rejected": rr.tolist(), "margin": margin.tolist(),
                          "cases": [dict(margin=m, center=c, loss=trl_reward(rc, rr, margin=margin if m else None, center=c)[0])
                                    for m in (False, True) for c in (None, 0.01)]}
    elif part == "ppo":
        inp = ppo_inputs()
        data["ppo"] = {"trl": trl_version(), "inputs": {k: v.tolist() for k, v in inp.items()},
                       "k1": {k: _tolist(v) for k, v in trl_ppo(inp, kl_estimator="k1").items()},
                       "k3": {k: _tolist(v) for k, v in trl_ppo(inp, kl_estimator="k3").items()}}
    else:
        raise SystemExit(f"usage: {sys.argv[0]} dpo|ppo")
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(data, indent=1))
    print(f"wrote {part} to {FIXTURE} (trl {trl_version()})")


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    main(sys.argv[1] if len(sys.argv) > 1 else "")
