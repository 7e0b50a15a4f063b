"""The reward model: a decoder with a scalar head read at the last real token, trained on
preference pairs with the Bradley-Terry loss (trl 1.16's RewardTrainer).

    rm = RewardModel(DecoderLM(cfg))
    Trainer(rm, reward_step, [preference_example(p, c, r), ...], ...).fit()
    rm(ids, attention_mask=mask)            # (B,) rewards
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import distributed, losses
from .preference import stack_pairs


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last True of each row of mask (B, N) (right or left padding); 0 for an empty row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, 0).max(dim=1).values


class RewardModel(nn.Module):
    """A backbone (a DecoderLM: its forward with return_logits=False gives the hidden states) and
    ``score``, a Linear(d, 1) without bias (transformers' *ForSequenceClassification head). The
    backbone's own LM head is not used (frozen when untied)."""

    def __init__(self, backbone: nn.Module, *, init_std: float = 0.02):
        super().__init__()
        if getattr(backbone, "config", None) is None or backbone.config.arch != "decoder":
            raise ValueError(f"RewardModel needs a DecoderLM backbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.config = backbone.config
        self.score = nn.Linear(backbone.config.d_model, 1, bias=False)
        nn.init.normal_(self.score.weight, std=init_std)
        if getattr(backbone, "lm_head", None) is not None:
            backbone.lm_head.requires_grad_(False)

    def values(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """(B, N) the head at every position (a value model reads them all)."""
        h = self.backbone(input_ids, attention_mask=attention_mask, return_logits=False, **kwargs).last_hidden_state
        return self.score(h).squeeze(-1).float()  # (B, N)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """(B,) the reward: the head at each row's last real token."""
        scores = self.values(input_ids, attention_mask=attention_mask, **kwargs)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return scores.gather(1, last_real_index(mask)[:, None]).squeeze(1)


def reward_step(model: nn.Module, batch: dict, *, center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict]:
    """The reward model's loss on a preference batch (one forward over chosen + rejected rows),
    optional per-pair "margin", and trl's metrics: accuracy (r_c > r_r) and the mean margin."""
    ids, mask, _ = stack_pairs(batch, pad_token_id=distributed.unwrap(model).config.pad_token_id or 0)
    rewards = model(ids, attention_mask=mask)  # (2B,)
    r_chosen, r_rejected = rewards.chunk(2)
    loss = losses.reward_loss(r_chosen, r_rejected, margin=batch.get("margin"), center_rewards_coefficient=center_rewards_coefficient)
    with torch.no_grad():
        return loss, {"accuracy": (r_chosen > r_rejected).float().mean().item(),
                      "margin": (r_chosen - r_rejected).mean().item()}
