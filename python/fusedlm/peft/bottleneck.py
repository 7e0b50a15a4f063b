"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), as in the ``adapters`` library.

    peft.apply_adapters(model, kind="pfeiffer")          # one adapter after each block's FFN
    peft.apply_adapters(model, kind="houlsby")           # after self-attention and after the FFN

An adapter maps a sublayer's output h (B, N, d) to ``h + up(act(down(h)))`` with down d -> d/16
(reduction factor 16), before the block's residual add. Init as the ``adapters`` library's
"mam_adapter" scheme: down kaiming-uniform (torch's Linear default), biases and the up-projection
zero, so the adapted model starts exactly equal to the base. Activation: ReLU for Pfeiffer, swish
(SiLU) for Houlsby, the library's defaults. The adapter is a child ``adapter`` of the sublayer
(``blocks.i.mlp.adapter``, ``blocks.i.attn.adapter``), run by a forward hook, so the model files
and the module names other methods target do not change.
"""
from __future__ import annotations

import torch
from torch import nn

from .lora import freeze_base, positive_int

KINDS = {"pfeiffer": (("mlp",), "relu"), "houlsby": (("attn", "mlp"), "swish")}
_ACTS = {"relu": nn.ReLU, "swish": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))``: h (..., d) -> (..., d), with a bottleneck of d // reduction."""

    def __init__(self, d: int, reduction: int = 16, activation: str = "relu"):
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {sorted(_ACTS)}, got {activation!r}")
        width = max(1, d // reduction)
        self.down = nn.Linear(d, width)
        self.act = _ACTS[activation]()
        self.up = nn.Linear(width, d)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.peft_disabled = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.peft_disabled else h + self.up(self.act(self.down(h)))


def _run_adapter(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


def apply_adapters(model: nn.Module, *, kind: str = "pfeiffer", reduction: int = 16, activation: str | None = None) -> nn.Module:
    """Adds bottleneck adapters to every block of `model` (in place; base frozen) and returns it.

    kind: "pfeiffer" (after the FFN) or "houlsby" (after self-attention and after the FFN)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    reduction = positive_int("reduction", reduction)
    sublayers, default_act = KINDS[kind]
    blocks = [m for path, m in model.named_modules() if path.rsplit(".", 2)[-2:-1] == ["blocks"]]
    if not blocks:
        raise ValueError(f"this {type(model).__name__} has no transformer blocks (…blocks.<i>)")
    freeze_base(model)
    d = model.config.d_model
    like = model.tok_embed.weight
    for block in blocks:
        for name in sublayers:
            sub = getattr(block, name)
            if hasattr(sub, "adapter"):
                raise ValueError(f"{type(model).__name__} already carries bottleneck adapters")
            sub.adapter = BottleneckAdapter(d, reduction, activation or default_act).to(device=like.device, dtype=like.dtype)
            sub.register_forward_hook(_run_adapter)
    return model
