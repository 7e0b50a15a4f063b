"""DPO: the policy learns from preference pairs against a fixed reference (trl 1.16's DPOTrainer,
loss types sigmoid / ipo / hinge / robust, see losses.dpo_loss).

    stage = DPO(frozen_copy(model), beta=0.1)                  # a frozen copy of the start
    stage = DPO(precomputed(), beta=0.1)                       # reference log-probs computed once:
    data = precompute_reference(model, data)                   #   data gains ref_*_logps
    stage = DPO(adapters_disabled(), beta=0.1)                 # PEFT: the policy without its adapters
    Trainer(model, stage, data, ...).fit()

A reference is a function (policy, ids, mask, labels, batch) -> (ref_chosen, ref_rejected)
sequence log-probs, (B,) each; the three above are the ones trl offers.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn

from . import distributed, losses
from .data import pad_collate
from .lm import sequence_logprobs
from .preference import stack_pairs

Reference = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def frozen_copy(model: nn.Module) -> Reference:
    """The reference is a frozen copy of `model` as it is now (call before training starts)."""
    ref = copy.deepcopy(distributed.unwrap(model)).eval().requires_grad_(False)

    def reference(policy, ids, mask, labels, batch):
        with torch.no_grad():
            return sequence_logprobs(ref, ids, mask, labels)[0].chunk(2)

    reference.model = ref
    return reference


def adapters_disabled() -> Reference:
    """The reference is the policy itself with its PEFT adapters disabled (no second copy)."""
    from .. import peft

    def reference(policy, ids, mask, labels, batch):
        with torch.no_grad(), peft.disable(distributed.unwrap(policy)):
            return sequence_logprobs(policy, ids, mask, labels)[0].chunk(2)

    return reference


def precomputed() -> Reference:
    """The reference log-probs come with the batch ("ref_chosen_logps", "ref_rejected_logps",
    (B,)), as :func:`precompute_reference` adds them to the examples."""

    def reference(policy, ids, mask, labels, batch):
        if "ref_chosen_logps" not in batch or "ref_rejected_logps" not in batch:
            raise ValueError("precomputed(): the batch has no ref_chosen_logps / ref_rejected_logps; "
                             "run the examples through precompute_reference(model, examples) first")
        return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()

    return reference


@torch.no_grad()
def precompute_reference(model: nn.Module, examples: Sequence[dict], *, batch_size: int = 8,
                         collate: Callable = pad_collate) -> list[dict]:
    """The examples with "ref_chosen_logps" / "ref_rejected_logps" added: `model`'s sequence
    log-probs (in eval mode), computed once before training (trl's precompute_ref_log_probs)."""
    if len(examples) == 0:
        raise ValueError("precompute_reference needs at least one example")
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        ids, mask, labels = stack_pairs(collate(chunk))
        chosen, rejected = sequence_logprobs(model, ids, mask, labels)[0].chunk(2)
        out += [{**ex, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
                for ex, c, r in zip(chunk, chosen.tolist(), rejected.tolist())]
    model.train(was_training)
    return out


class DPO:
    """The DPO stage: one forward of the policy over chosen + rejected rows, the reference's
    log-probs, losses.dpo_loss; metrics as trl logs them (rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies, logps/chosen, logps/rejected)."""

    def __init__(self, reference: Reference, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        if not callable(reference):
            raise TypeError("reference must be frozen_copy(model), precomputed(), adapters_disabled() or a function "
                            f"(policy, ids, mask, labels, batch) -> (ref_chosen, ref_rejected); got {type(reference).__name__}")
        losses.check_dpo_hparams(beta, loss_type, label_smoothing)
        self.reference, self.beta, self.loss_type, self.label_smoothing = reference, beta, loss_type, label_smoothing

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        ids, mask, labels = stack_pairs(batch, pad_token_id=distributed.unwrap(model).config.pad_token_id or 0)
        if labels is None:
            raise ValueError("a DPO batch needs chosen_labels and rejected_labels (-100 on the prompt)")
        logps, counts = sequence_logprobs(model, ids, mask, labels)
        policy_chosen, policy_rejected = logps.chunk(2)
        chosen_len, rejected_len = counts.chunk(2)
        ref_chosen, ref_rejected = self.reference(model, ids, mask, labels, batch)
        loss = losses.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta,
                               loss_type=self.loss_type, chosen_len=chosen_len, rejected_len=rejected_len,
                               label_smoothing=self.label_smoothing)
        metrics = losses.dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta)
        metrics.update({"logps/chosen": policy_chosen.mean().item(), "logps/rejected": policy_rejected.mean().item()})
        return loss, metrics
