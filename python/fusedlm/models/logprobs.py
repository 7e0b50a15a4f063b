"""Labels and log-probabilities: the model's loss over labelled tokens and per-token log-probs."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, shift: bool) -> torch.Tensor | None:
    """Cross-entropy of logits (B, N, V) against labels (B, N), -100 ignored; `shift`: position i
    predicts label i + 1 (causal LMs)."""
    if labels is None:
        return None
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must have shape {list(logits.shape[:2])}, got {list(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, i]) under logits[b, i] (B, N, V), float32 (B, N); 0 where the label is -100.

    No shift: for a causal LM pass ``logits[:, :-1]`` and ``labels[:, 1:]``. Sequence log-probs
    (DPO, PPO) are sums of this over the completion tokens."""
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must have shape {list(logits.shape[:2])}, got {list(labels.shape)}")
    keep = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, N, V)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, N)
    return picked * keep
