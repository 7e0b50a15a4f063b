"""PPO for RLHF, as trl 1.12's PPOTrainer did it: a policy and a value model trained together,
rollouts sampled with ``fusedlm.generation.generate``, a per-token reward −kl_coef·KL(π ‖ π_ref)
(k1 or k3) plus the reward model's score after the last response token, GAE (γ = 1, λ = 0.95),
whitened advantages, the clipped policy loss (0.2) + vf_coef (0.1) × the clipped value loss, and
several PPO epochs over each batch of rollouts.
"""
from __future__ import annotations

import torch

from . import losses


def rollout_advantages(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                       response_mask: torch.Tensor, *, kl_coef: float = 0.05, kl_estimator: str = "k1",
                       gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False) -> dict[str, torch.Tensor]:
    """Rewards, advantages and returns of a batch of rollouts, trl 1.12's steps 3-6.

    logprobs / ref_logprobs (B, T): the sampled response tokens' log-probs under the policy and
    the reference; values (B, T): the value model before each response token; scores (B,): the
    reward model's score of each response; response_mask (B, T) bool: the real response tokens (a
    prefix of each row: through the stop token, padding after).

    As trl: the KL penalty sits on every real token, the score is added one step after the last
    real token (the value of that step is learned too: ``value_mask`` is the response mask widened
    by one), GAE runs over value_mask, and advantages are whitened over the real tokens.
    Returns kl, rewards, advantages, returns (B, T) and value_mask (B, T)."""
    b, t = logprobs.shape
    if response_mask.shape != (b, t) or values.shape != (b, t) or scores.shape != (b,):
        raise ValueError(f"values and response_mask must be (B, T) = {(b, t)} and scores (B,), got "
                         f"{tuple(values.shape)}, {tuple(response_mask.shape)}, {tuple(scores.shape)}")
    response_mask = response_mask.bool()
    last = response_mask.long().sum(1) - 1  # (B,) index of the last real token (-1: empty response)
    steps = torch.arange(t, device=logprobs.device)[None, :]
    value_mask = steps <= (last + 1)[:, None]
    kl = losses.kl_penalty(logprobs, ref_logprobs, kl_estimator).masked_fill(~response_mask, 0)
    rewards = -kl_coef * kl
    score_at = torch.where(last + 1 < t, last + 1, last)
    rewards[torch.arange(b, device=rewards.device), score_at] += scores
    if whiten_rewards:
        rewards = losses.masked_whiten(rewards, value_mask, shift_mean=False).masked_fill(~value_mask, 0)
    advantages, returns = losses.gae(rewards, values, value_mask, gamma=gamma, lam=lam)
    advantages = losses.masked_whiten(advantages, response_mask).masked_fill(~response_mask, 0)
    return {"kl": kl, "rewards": rewards, "advantages": advantages, "returns": returns, "value_mask": value_mask}
