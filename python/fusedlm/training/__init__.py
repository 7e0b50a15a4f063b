"""fusedlm.training: the training stages (objectives, SFT, reward model, DPO, PPO), one Trainer,
and torch.distributed scale-out."""
from . import losses, objectives

__all__ = ["losses", "objectives"]
