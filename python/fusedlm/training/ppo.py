"""PPO for RLHF, as trl 1.12's PPOTrainer did it: a policy and a value model trained together,
rollouts sampled with ``fusedlm.generation.generate``, a per-token reward −kl_coef·KL(π ‖ π_ref)
(k1 or k3) plus the reward model's score after the last response token, GAE (γ = 1, λ = 0.95),
whitened advantages, the clipped policy loss (0.2) + vf_coef (0.1) × the clipped value loss, and
several PPO epochs over each batch of rollouts.

    model = PolicyAndValue(policy, RewardModel(value_backbone))     # trained together
    cfg = PPOConfig(rollout_batch_size=16, mini_batch_size=8, stop_token_id=eos, pad_token_id=pad)
    rollouts = PPORollouts(model, reward_model, prompts, ref_policy=frozen_policy, config=cfg)
    Trainer(model, PPOLoss(cfg), rollouts, max_steps=..., lr=3e-6, max_grad_norm=None).fit()

The Trainer steps once per mini-batch (trl: gradient_accumulation_steps=1), so its LR schedule
advances per optimizer step, where trl's advances once per batch of rollouts.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .. import _validate as check
from ..models.logprobs import token_logprobs
from . import distributed, losses
from .reward import RewardModel


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


# ---------------------------------------------------------------------------------------------
# The models PPO trains
# ---------------------------------------------------------------------------------------------
class PolicyAndValue(nn.Module):
    """The policy (a DecoderLM) and the value model (a RewardModel: backbone + scalar head, trl
    initialises it from the reward model) trained together by one optimizer, as trl's
    PolicyAndValueWrapper. One forward gives both on the response positions."""

    def __init__(self, policy: nn.Module, value_model: RewardModel):
        super().__init__()
        if getattr(policy, "config", None) is None or policy.config.arch != "decoder":
            raise ValueError(f"the PPO policy must be a DecoderLM, got {type(policy).__name__}")
        if not isinstance(value_model, RewardModel):
            raise TypeError(f"value_model must be a RewardModel (a backbone + scalar head), got {type(value_model).__name__}")
        self.policy, self.value_model = policy, value_model
        self.config = policy.config

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor, response_start: int,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, C + T) queries then responses; the policy's logits / (temperature + 1e-7)
        and the values, at the positions that predict the T response tokens: (B, T, V), (B, T)."""
        h = self.policy(input_ids, attention_mask=attention_mask, return_logits=False).last_hidden_state
        logits = self.policy.head(h[:, response_start - 1 : -1]).float() / (temperature + 1e-7)
        values = self.value_model.values(input_ids, attention_mask=attention_mask)[:, response_start - 1 : -1]
        return logits, values


def _response_mask(responses: torch.Tensor, stop_token_id: int | None) -> torch.Tensor:
    """(B, T) True up to and including the first stop token (everything when there is none)."""
    if stop_token_id is None:
        return torch.ones_like(responses, dtype=torch.bool)
    stops = (responses == stop_token_id).long()
    return (stops.cumsum(1) - stops) == 0


@dataclasses.dataclass
class PPOConfig:
    """trl 1.12's PPOConfig defaults where they apply."""
    rollout_batch_size: int = 16  # prompts per batch of rollouts
    mini_batch_size: int = 8  # rollouts per optimizer step
    num_ppo_epochs: int = 4
    response_length: int = 16
    temperature: float = 0.7
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    cliprange: float = 0.2
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    stop_token_id: int | None = None  # trl's stop_token_id (stop_token="eos": the eos id)
    pad_token_id: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("rollout_batch_size", "mini_batch_size", "response_length", "num_ppo_epochs"):
            check.integer(f"PPOConfig.{name}", getattr(self, name), low=1)
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(f"PPOConfig.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                             f"mini_batch_size ({self.mini_batch_size})")
        check.choice("PPOConfig.kl_estimator", self.kl_estimator, ("k1", "k3"))
        check.number("PPOConfig.temperature", self.temperature, low=0, low_open=True)
        for name in ("kl_coef", "vf_coef", "cliprange", "cliprange_value"):
            check.number(f"PPOConfig.{name}", getattr(self, name), low=0)
        check.probability("PPOConfig.gamma", self.gamma)
        check.probability("PPOConfig.lam", self.lam)
        if self.missing_eos_penalty is not None:
            check.number("PPOConfig.missing_eos_penalty", self.missing_eos_penalty)
        if self.stop_token_id is not None:
            check.token_id("PPOConfig.stop_token_id", self.stop_token_id)
        check.token_id("PPOConfig.pad_token_id", self.pad_token_id)
        check.integer("PPOConfig.seed", self.seed, low=0)


class PPORollouts:
    """The Trainer's data for PPO: it samples a batch of rollouts from the current policy
    (``fusedlm.generation.generate``), scores them (reward_model(ids, attention_mask=...) -> (B,)),
    computes rewards and advantages (:func:`rollout_advantages`), then yields
    num_ppo_epochs x (rollout_batch_size / mini_batch_size) shuffled mini-batches of them before
    sampling again. prompts: token-id lists (left-padded into each batch); ref_policy: the frozen
    reference policy, or None for the policy with its PEFT adapters disabled. Per rank: each rank
    samples from its own shard of the prompts."""

    def __init__(self, model: PolicyAndValue, reward_model: Callable, prompts: Sequence[Sequence[int]], *,
                 ref_policy: nn.Module | None = None, config: PPOConfig | None = None, generate: Callable | None = None):
        self.model, self.reward_model, self.ref_policy = model, reward_model, ref_policy
        self.config = cfg = config or PPOConfig()
        rank, world = distributed.rank_and_world()
        self.prompts = [list(p) for i, p in enumerate(prompts) if i % world == rank]
        if len(self.prompts) < cfg.rollout_batch_size:
            raise ValueError(f"{len(self.prompts)} prompts on this rank, fewer than one rollout batch ({cfg.rollout_batch_size})")
        if generate is None:
            from ..generation import generate
        self.generate = generate
        self.generator = torch.Generator().manual_seed(cfg.seed + rank)
        self.updates, self._queue = 0, []
        self.stats: dict[str, float] = {}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            self._queue = self._minibatches(self.rollout())
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        """The sampler's state and the mini-batches not yet trained on: a run resumed mid-batch of
        rollouts continues with the same mini-batches (an exact resume)."""
        return {"updates": self.updates, "generator": self.generator.get_state(), "queue": list(self._queue),
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self._queue, self.stats = state["updates"], list(state["queue"]), dict(state["stats"])
        self.generator.set_state(state["generator"])

    def _queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        order = torch.randperm(len(self.prompts), generator=self.generator)[: cfg.rollout_batch_size].tolist()
        rows = [self.prompts[i] for i in order]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):  # left padding, as trl's PPO datasets
            ids[i, n - len(r) :], mask[i, n - len(r) :] = torch.tensor(r), True
        return ids, mask

    @torch.no_grad()
    def rollout(self) -> dict[str, torch.Tensor]:
        """One batch of rollouts with everything the PPO losses need (trl 1.12's steps 1-6)."""
        cfg = self.config
        inner = distributed.unwrap(self.model)
        policy = inner.policy
        queries, query_mask = self._queries()
        was_training = inner.training
        inner.eval()
        seqs = self.generate(policy, queries, attention_mask=query_mask, max_new_tokens=cfg.response_length, do_sample=True,
                             temperature=cfg.temperature + 1e-7, top_k=0, top_p=1.0, pad_token_id=cfg.pad_token_id,
                             eos_token_id=[] if cfg.stop_token_id is None else cfg.stop_token_id, generator=self.generator)
        c = queries.shape[1]
        responses = torch.full((queries.shape[0], cfg.response_length), cfg.pad_token_id, dtype=torch.long)
        responses[:, : seqs.shape[1] - c] = seqs[:, c:]
        response_mask = _response_mask(responses, cfg.stop_token_id)
        responses = responses.masked_fill(~response_mask, cfg.pad_token_id)  # trl's truncate_response
        ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        logits, values = inner(ids, attention_mask=mask, response_start=c, temperature=cfg.temperature)
        logprobs = token_logprobs(logits, responses)
        if self.ref_policy is not None:
            ref_logits = self.ref_policy(ids, attention_mask=mask).logits[:, c - 1 : -1].float()
        else:
            from .. import peft

            with peft.disable(policy):
                ref_logits = policy(ids, attention_mask=mask).logits[:, c - 1 : -1].float()
        ref_logprobs = token_logprobs(ref_logits / (cfg.temperature + 1e-7), responses)
        scores = self.reward_model(ids, attention_mask=mask).float()
        if cfg.missing_eos_penalty is not None and cfg.stop_token_id is not None:
            scores = scores - cfg.missing_eos_penalty * (~(responses == cfg.stop_token_id).any(1)).float()
        out = rollout_advantages(logprobs, ref_logprobs, values, scores, response_mask, kl_coef=cfg.kl_coef,
                                 kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=cfg.whiten_rewards)
        inner.train(was_training)
        self.updates += 1
        non_score = (-cfg.kl_coef * out["kl"]).sum(1).mean().item()
        self.stats = {"objective/scores": scores.mean().item(), "objective/kl": out["kl"].sum(1).mean().item(),
                      "objective/non_score_reward": non_score, "objective/rlhf_reward": non_score + scores.mean().item(),
                      "objective/entropy": (-logprobs * response_mask).sum(1).mean().item(),
                      "val/num_eos_tokens": 0 if cfg.stop_token_id is None else int((responses == cfg.stop_token_id).sum())}
        return {"input_ids": ids, "attention_mask": mask, "responses": responses, "logprobs": logprobs,
                "values": values.masked_fill(~out["value_mask"], 0), "advantages": out["advantages"],
                "returns": out["returns"], "response_mask": response_mask, "value_mask": out["value_mask"],
                "response_start": c}

    def _minibatches(self, rollouts: dict) -> list[dict]:
        cfg = self.config
        b = rollouts["input_ids"].shape[0]
        batches = []
        for _ in range(cfg.num_ppo_epochs):
            order = torch.randperm(b, generator=self.generator)
            for start in range(0, b, cfg.mini_batch_size):
                idx = order[start : start + cfg.mini_batch_size]
                mb = {k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in rollouts.items()}
                mb["stats"] = dict(self.stats)
                batches.append(mb)
        return batches


class PPOLoss:
    """The PPO stage's loss on a mini-batch of rollouts: clipped policy loss + vf_coef x the
    clipped value loss; metrics as trl logs them (policy/approxkl, policy/clipfrac, loss/policy,
    loss/value, val/clipfrac, val/ratio, policy/entropy (over the real response tokens; trl averages
    padding in too), and the rollouts' objective/scores, objective/kl, objective/rlhf_reward, ...)."""

    def __init__(self, config: PPOConfig | None = None):
        self.config = config or PPOConfig()

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        logits, vpred = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                              response_start=batch["response_start"], temperature=cfg.temperature)
        new_logprobs = token_logprobs(logits, batch["responses"])
        value_mask, response_mask = batch["value_mask"], batch["response_mask"]
        vpred = vpred.masked_fill(~value_mask, 0)
        vf_loss, vf_clipfrac = losses.ppo_value_loss(vpred, batch["values"], batch["returns"], value_mask,
                                                     cliprange_value=cfg.cliprange_value)
        pg_loss, pg_clipfrac = losses.ppo_policy_loss(new_logprobs, batch["logprobs"], batch["advantages"], response_mask,
                                                      cliprange=cfg.cliprange)
        loss = pg_loss + cfg.vf_coef * vf_loss
        with torch.no_grad():
            diff = (new_logprobs - batch["logprobs"])[response_mask]
            entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)  # (B, T)
            metrics = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "policy/clipfrac": pg_clipfrac.item(),
                       "val/clipfrac": vf_clipfrac.item(), "policy/approxkl": 0.5 * (diff**2).mean().item(),
                       "policy/entropy": entropy[response_mask].mean().item(), "val/ratio": diff.exp().mean().item(),
                       **batch.get("stats", {})}
        return loss, metrics
