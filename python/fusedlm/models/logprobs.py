"""Labels and log-probabilities, in one place: what a label of IGNORE_INDEX means, the mean loss a
model's forward returns for its labels, and per-token log-probs (what sequence log-probs sum in
DPO, PPO and the confidence of an answer). Labels line up with the logits' positions; a causal LM
shifts them (position i predicts label i + 1).

Shapes: B rows, N positions, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # transformers' value: no loss and no log-prob at this position


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must have shape {list(logits.shape[:2])}, got {list(labels.shape)}")


def mean_token_loss(logits: torch.Tensor, labels: torch.Tensor | None, *, shift: bool) -> torch.Tensor | None:
    """Mean cross-entropy of logits (B, N, V) against labels (B, N) over the labels that are not
    IGNORE_INDEX, in float32; None without labels. `shift`: position i predicts label i + 1."""
    if labels is None:
        return None
    _check(logits, labels)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def fused_token_loss(head, h: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """:func:`mean_token_loss` of ``head`` applied to hidden states h (B, N, d), without the logits:
    ``head(x) = (input, weight, bias)`` of the vocabulary projection (a model's ``vocab_head``), the
    loss by ``ops.linear_cross_entropy`` in chunks of rows (peak memory: one chunk of logits).
    A batch with no label to learn gives 0 (``mean_token_loss`` gives NaN there)."""
    from .. import ops  # models run on ops; imported here so that this module stays importable alone

    _check(h, labels)
    if shift:
        h, labels = h[:, :-1], labels[:, 1:]
    x, weight, bias = head(h)
    return ops.linear_cross_entropy(x, weight, labels, bias=bias, ignore_index=IGNORE_INDEX)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, i]) under logits[b, i] (B, N, V), float32 (B, N); 0 where the label is IGNORE_INDEX.

    No shift: for a causal LM pass ``logits[:, :-1]`` and ``labels[:, 1:]``. Sequence log-probs
    (DPO, PPO) are sums of this over the completion tokens."""
    _check(logits, labels)
    keep = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, N, V)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, N)
    return picked * keep
