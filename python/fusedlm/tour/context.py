"""What the tour's sections share: the run's arguments, the world, the tokenizer, and the models one
section trains and a later one uses (the pretrained decoder -> alignment -> decoding ...)."""
from __future__ import annotations

import dataclasses
import os

import torch

from .sizes import Sizes
from .tokenizer import Tokenizer
from .world import World


@dataclasses.dataclass
class Context:
    mode: str
    sizes: Sizes
    seed: int
    out_dir: str
    world: World | None = None
    tok: Tokenizer | None = None
    models: dict = dataclasses.field(default_factory=dict)  # "decoder", "sft", "dpo", ... -> nn.Module

    def path(self, name: str) -> str:
        """A file in the output folder (plots, the tokenizer)."""
        return os.path.join(self.out_dir, name)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A torch.Generator seeded from the run's seed and `salt` (one per use, so sections do not
        depend on what ran before them)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def need(self, *names: str):
        """The models named (trained by an earlier section), or KeyError naming what is missing."""
        missing = [n for n in names if n not in self.models]
        if missing:
            raise KeyError(f"needs the {', '.join(missing)} model(s) of an earlier section, which did not run")
        return [self.models[n] for n in names]
