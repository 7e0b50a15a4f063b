"""PPO: rollouts through fusedlm.generation, the first mini-batch is on-policy, the mean reward
rises, the PEFT reference, and bad input. (The loss pieces against trl 1.12: test_losses.py.)"""
import copy

import pytest
import torch

import _tiny
from fusedlm import peft
from fusedlm.training import Trainer, ppo, reward

TARGET, T, EOS = 7, 8, 2


def score(ids, attention_mask):
    """The reward: the fraction of the response's real tokens that are TARGET."""
    resp, real = ids[:, -T:], attention_mask[:, -T:].bool()
    return ((resp == TARGET) & real).float().sum(1) / T


def _setup(lora=False, stop=EOS, **cfg):
    policy = _tiny.model()
    ref = None
    if lora:
        peft.apply_lora(policy, r=8, alpha=16, targets="all")
    else:
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
    model = ppo.PolicyAndValue(policy, reward.RewardModel(_tiny.model(seed=1)))
    prompts = torch.randint(4, _tiny.V, (128, 4), generator=torch.Generator().manual_seed(0)).tolist()
    config = ppo.PPOConfig(**{"rollout_batch_size": 32, "mini_batch_size": 16, "response_length": T, "temperature": 1.0,
                              "stop_token_id": stop, "pad_token_id": 0, **cfg})
    return model, ppo.PPORollouts(model, score, prompts, ref_policy=ref, config=config), config


def test_rollouts_are_on_policy_and_truncated_at_the_stop_token():
    model, rollouts, cfg = _setup()
    batch = rollouts.rollout()
    r, m = batch["responses"], batch["response_mask"]
    assert r.shape == (32, T) and batch["input_ids"].shape == (32, 4 + T)
    for row, mask in zip(r.tolist(), m.tolist()):
        n = sum(mask)
        assert mask == [True] * n + [False] * (T - n)  # a prefix
        assert EOS not in row[: n - 1] and (n == T or row[n - 1] == EOS)  # through the first stop token
        assert row[n:] == [0] * (T - n)  # padding after it
    # policy == reference: no KL, the rewards are the scores alone (one step after the last token)
    assert rollouts.stats["objective/kl"] == 0.0
    loss, metrics = ppo.PPOLoss(cfg)(model, {**{k: v[:16] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}})
    assert metrics["policy/approxkl"] < 1e-10 and metrics["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["policy/clipfrac"] == 0.0 and torch.isfinite(loss)


def test_ppo_raises_the_mean_reward():
    model, rollouts, cfg = _setup()
    hist = Trainer(model, ppo.PPOLoss(cfg), rollouts, max_steps=160, lr=3e-3, schedule="constant", max_grad_norm=None,
                   progress=False).fit()
    per_update = [r["objective/scores"] for r in hist[::8]]  # 8 optimizer steps per batch of rollouts
    assert len(per_update) == 20 and rollouts.updates == 20
    first, last = sum(per_update[:3]) / 3, sum(per_update[-5:]) / 5
    assert last > 3 * first and last > 0.07  # chance: 1/64 per token


@pytest.mark.slow
def test_ppo_with_lora_and_the_adapters_disabled_reference():
    model, rollouts, cfg = _setup(lora=True)
    frozen = {n: p.detach().clone() for n, p in model.policy.named_parameters() if not p.requires_grad}
    hist = Trainer(model, ppo.PPOLoss(cfg), rollouts, max_steps=160, lr=1e-2, schedule="constant", max_grad_norm=None,
                   progress=False).fit()
    per_update = [r["objective/scores"] for r in hist[::8]]
    assert sum(per_update[-5:]) / 5 > 2 * sum(per_update[:3]) / 3
    assert hist[-1]["objective/kl"] != 0.0  # the adapters moved away from the base
    for n, p in model.policy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


def test_bad_ppo_configuration():
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        ppo.PPOConfig(rollout_batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo.PPOConfig(kl_estimator="k2")
    with pytest.raises(TypeError, match="value_model must be a RewardModel"):
        ppo.PolicyAndValue(_tiny.model(), _tiny.model())
    model, _, cfg = _setup()
    with pytest.raises(ValueError, match="fewer than one rollout batch"):
        ppo.PPORollouts(model, score, [[5, 6]] * 3, config=cfg)
