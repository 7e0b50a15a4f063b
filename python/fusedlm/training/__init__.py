"""fusedlm.training: the training stages (objectives, SFT, reward model, DPO, PPO), one Trainer,
and torch.distributed scale-out."""
from . import checkpoint, data, distributed, dpo, losses, objectives, ppo, preference, reward, sft
from .data import Loader, pad_collate
from .lm import lm_loss
from .trainer import TrainConfig, Trainer, lr_factor

__all__ = ["losses", "objectives", "sft", "preference", "reward", "dpo", "ppo", "data", "checkpoint", "distributed",
           "Trainer", "TrainConfig", "lr_factor", "lm_loss", "Loader", "pad_collate"]
