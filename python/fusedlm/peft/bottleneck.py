"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), placed as the ``adapters`` library does.

    peft.apply_adapters(model, kind="pfeiffer")          # one adapter after each block's FFN
    peft.apply_adapters(model, kind="houlsby")           # after self-attention and after the FFN

An adapter is A(u) = up(act(down(u))) with down d -> d // 16 (reduction factor 16), plus a residual.
Init as the library's "mam_adapter" scheme: down kaiming-uniform (torch's Linear default), biases and
the up-projection zero, so the adapted model starts exactly equal to the base. Activation: ReLU for
Pfeiffer, swish (SiLU) for Houlsby, the library's defaults. Where it sits, for a sublayer output h
(attention or FFN) and the block's residual stream x (the library's ``DoubleSeqBnConfig`` /
``SeqBnConfig`` flags; LN = the block's norm of that sublayer, post-norm models only):

    Houlsby  (original_ln_before=False): pre-norm  x + h + A(h)           post-norm LN(x + h + A(h))
    Pfeiffer (original_ln_before=True):  pre-norm  z + A(z), z = x + h    post-norm LN(z + A(LN(z)))

The adapter is a child ``adapter`` of the sublayer (``blocks.i.mlp.adapter``, ``blocks.i.attn.adapter``)
run by forward hooks (on the sublayer; a pre-norm Pfeiffer adapter on the block, whose output is z),
so the model files and the module names other methods target do not change. With dropout in
training, the library adapts the dropped-out h; here Houlsby and post-norm Pfeiffer adapters see h
before the block's dropout (which then drops h + A(h)); eval outputs are the same.
A Seq2SeqLM's cross-attention gets no adapter (the library's ``cross_adapter=False`` default).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .. import _validate as check
from .lora import freeze_base

KINDS = {"pfeiffer": (("mlp",), "relu"), "houlsby": (("attn", "mlp"), "swish")}
_ACTS = {"relu": nn.ReLU, "swish": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """``residual + up(act(down(u)))``: u (..., d) -> (..., d), a bottleneck of d // reduction;
    residual defaults to u."""

    def __init__(self, d: int, reduction: int = 16, activation: str = "relu"):
        super().__init__()
        check.choice("activation", activation, sorted(_ACTS))
        width = max(1, d // reduction)
        self.down = nn.Linear(d, width)
        self.act = _ACTS[activation]()
        self.up = nn.Linear(width, d)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.peft_disabled = False

    def forward(self, u: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        residual = u if residual is None else residual
        return residual if self.peft_disabled else residual + self.up(self.act(self.down(u)))


def _on_sublayer(sublayer: nn.Module, args, h: torch.Tensor) -> torch.Tensor:
    """Houlsby: h + A(h); the block adds the residual (and norms, post-norm)."""
    return sublayer.adapter(h)


def _on_block(block: nn.Module, args, z: torch.Tensor) -> torch.Tensor:
    """Pfeiffer, pre-norm block: its output z = x + h becomes z + A(z)."""
    return block.mlp.adapter(z)


def _on_post_norm_mlp(mlp: nn.Module, args, h: torch.Tensor, *, norm: nn.Module) -> torch.Tensor:
    """Pfeiffer, post-norm block: the MLP's input is x, the block then computes LN(x + h'); with
    h' = h + A(LN(x + h)) that is LN(z + A(LN(z)))."""
    return mlp.adapter(norm(args[0] + h), residual=h)


def apply_adapters(model: nn.Module, *, kind: str = "pfeiffer", reduction: int = 16, activation: str | None = None) -> nn.Module:
    """Adds bottleneck adapters to every block of `model` (in place; base frozen) and returns it.

    kind: "pfeiffer" (after the FFN) or "houlsby" (after self-attention and after the FFN);
    reduction: d_model // bottleneck width; activation: "relu", "swish", "gelu" or "tanh"
    (default: the kind's). Raises ValueError for an unknown kind, reduction <= 0, a model without
    blocks, or one that already carries adapters."""
    check.choice("kind", kind, sorted(KINDS))
    reduction = check.positive_int("reduction", reduction)
    sublayers, default_act = KINDS[kind]
    activation = default_act if activation is None else activation
    check.choice("activation", activation, sorted(_ACTS))
    blocks = [m for path, m in model.named_modules() if path.rsplit(".", 2)[-2:-1] == ["blocks"]]
    if not blocks:
        raise ValueError(f"this {type(model).__name__} has no transformer blocks (…blocks.<i>)")
    if any(hasattr(getattr(block, name), "adapter") for block in blocks for name in ("attn", "mlp")):
        raise ValueError(f"{type(model).__name__} already carries bottleneck adapters")
    freeze_base(model)
    d = model.config.d_model
    like = model.tok_embed.weight
    for block in blocks:
        for name in sublayers:
            sub = getattr(block, name)
            sub.adapter = BottleneckAdapter(d, reduction, activation).to(device=like.device, dtype=like.dtype)
            if kind == "houlsby":
                sub.register_forward_hook(_on_sublayer)
            elif block.pre_norm:
                block.register_forward_hook(_on_block)
            else:
                sub.register_forward_hook(functools.partial(_on_post_norm_mlp, norm=block.mlp_norm))
    return model
