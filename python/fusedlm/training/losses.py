"""The losses of the training stages, as small pure functions of tensors.

Formulas are trl's: ``dpo_loss`` and ``reward_loss`` those of trl 1.16's DPOTrainer / RewardTrainer,
the PPO pieces (``masked_whiten``, ``kl_penalty``, ``gae``, ``ppo_policy_loss``,
``ppo_value_loss``) those of trl 1.12's PPOTrainer (the last trl with PPO). Shapes: B sequences
(or preference pairs), T completion tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate as check

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _check_tensor(name: str, t, dims: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {list(t.shape)}")


def _check_same_shape(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    for name, t in zip(names, tensors):
        _check_tensor(name, t)
    shape = tensors[0].shape
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != shape:
            raise ValueError(f"{name} must have the shape of {names[0]} {list(shape)}, got {list(t.shape)}")


# ---------------------------------------------------------------------------------------------
# Preference losses (trl 1.16)
# ---------------------------------------------------------------------------------------------
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean DPO loss over B preference pairs.

    Arguments are sequence log-probs (B,): log-probs summed over each completion's tokens, of the
    policy and of the reference model. With Δ = (π_c − ref_c) − (π_r − ref_r):

    - ``sigmoid`` (DPO): −log σ(βΔ)
    - ``hinge`` (SLiC): relu(1 − βΔ)
    - ``ipo``: (Δ' − 1/(2β))², Δ' the length-normalised Δ (each log-ratio divided by its
      completion's token count, ``chosen_len`` / ``rejected_len`` (B,), clamped to >= 1)
    - ``robust`` (rDPO): (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε), ε = label_smoothing in [0, 0.5)
    """
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    tensors = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    for name, t in zip(names, tensors):
        _check_tensor(name, t, dims=1)
    _check_same_shape(names, tensors)
    if policy_chosen.shape[0] == 0:
        raise ValueError("dpo_loss needs at least one preference pair, got an empty batch")
    check_dpo_hparams(beta, loss_type, label_smoothing)
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "ipo":
        for name, n in (("chosen_len", chosen_len), ("rejected_len", rejected_len)):
            if n is None:
                raise ValueError(f"loss_type='ipo' normalises by completion length: pass {name} (B,)")
            if not isinstance(n, torch.Tensor) or tuple(n.shape) != tuple(policy_chosen.shape):
                got = list(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__
                raise ValueError(f"{name} must be a tensor of shape {list(policy_chosen.shape)}, got {got}")
        delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        return ((delta - 1 / (2 * beta)) ** 2).mean()
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    else:  # robust
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses.mean()


def check_dpo_hparams(beta, loss_type, label_smoothing) -> None:
    """beta > 0, loss_type one of DPO_LOSS_TYPES, label_smoothing in [0, 0.5)."""
    check.number("beta", beta, low=0, low_open=True)
    check.choice("loss_type", loss_type, DPO_LOSS_TYPES)
    check.number("label_smoothing", label_smoothing, low=0, high=0.5, high_open=True)


def dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float = 0.1) -> dict[str, float]:
    """What trl logs for DPO: rewards/chosen, rewards/rejected (β · log-ratio), rewards/margins, rewards/accuracies."""
    with torch.no_grad():
        chosen = beta * (policy_chosen - ref_chosen)
        rejected = beta * (policy_rejected - ref_rejected)
        return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                "rewards/margins": (chosen - rejected).mean().item(),
                "rewards/accuracies": (chosen > rejected).float().mean().item()}


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, *, margin: torch.Tensor | float | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Bradley-Terry loss of a reward model on B pairs: mean −log σ(r_c − r_r − margin), plus
    ``center_rewards_coefficient · mean((r_c + r_r)²)`` when given (keeps rewards centred on 0).
    r_chosen, r_rejected: (B,) scalar rewards; margin: (B,) or a float."""
    _check_same_shape(("r_chosen", "r_rejected"), (r_chosen, r_rejected))
    if r_chosen.dim() != 1 or r_chosen.shape[0] == 0:
        raise ValueError(f"r_chosen must have shape [B] with B >= 1, got {list(r_chosen.shape)}")
    diff = r_chosen - r_rejected
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.shape not in (torch.Size([]), r_chosen.shape):
            raise ValueError(f"margin must be a float or a tensor of shape {list(r_chosen.shape)}, got {list(margin.shape)}")
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


# ---------------------------------------------------------------------------------------------
# PPO pieces (trl 1.12)
# ---------------------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values where mask is True (over `dim`, or over everything); masked-out values never
    enter (not even an inf or a NaN)."""
    mask = mask.bool()
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if dim is None:
        return kept.sum() / mask.sum()
    return kept.sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of values where mask is True; unbiased: Bessel's correction n/(n−1) (needs n >= 2)."""
    centered = values - masked_mean(values, mask)
    var = masked_mean(centered**2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"the unbiased variance needs at least 2 unmasked values, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values − mean) / sqrt(var + 1e-8) over the unmasked values; shift_mean=False adds the mean back."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate from the sampled tokens' log-probs (B, T), as in
    http://joschu.net/blog/kl-approx.html: k1 = −log r, k3 = (r − 1) − log r, r = π_ref / π."""
    _check_same_shape(("logprobs", "ref_logprobs"), (logprobs, ref_logprobs))
    log_ratio = ref_logprobs - logprobs
    check.choice("estimator", estimator, ("k1", "k3"))
    return -log_ratio if estimator == "k1" else log_ratio.exp() - 1 - log_ratio


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over T steps: rewards, values (B, T), mask (B, T) bool
    (True = a real step; values past a sequence's end are taken as 0, as trl zeroes them).

    δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1} (A_T = V_T = 0); returns = A + V.
    Returns (advantages, returns), both (B, T), 0 where mask is False."""
    _check_same_shape(("rewards", "values"), (rewards, values))
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, T], got {list(rewards.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != rewards.shape:
        raise ValueError(f"mask must be a tensor of shape {list(rewards.shape)}, got "
                         f"{list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = mask.bool()
    rewards, values = rewards.masked_fill(~mask, 0), values.masked_fill(~mask, 0)
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t < steps - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    returns = advantages + values
    return advantages.masked_fill(~mask, 0), returns.masked_fill(~mask, 0)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    *, cliprange: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate: mean over mask of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(logp − old_logp).
    All (B, T). Returns (loss, clip fraction)."""
    _check_same_shape(("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages))
    ratio = torch.exp(logprobs - old_logprobs)
    losses = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses, clipped), mask)
    return loss, masked_mean((clipped > losses).float(), mask).detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   *, cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 · mean over mask of max((V − R)², (clip(V, V_old ± ε) − R)²).
    All (B, T). Returns (loss, clip fraction)."""
    _check_same_shape(("values", "old_values", "returns"), (values, old_values, returns))
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    losses, losses_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    return loss, masked_mean((losses_clipped > losses).float(), mask).detach()
