"""QLoRA: every block linear frozen in 4-bit NF4 (``fusedlm.nn.NF4Linear``), LoRA on top.

    peft.apply_qlora(model, r=16, alpha=32, targets="all")    # blocksize 64, double quantisation
    fusedlm.interop.hf.load_bnb_state_dict(model, hf_bnb_model.state_dict())  # the bytes of a bitsandbytes 4-bit model

The base product of each adapted layer is ``ops.nf4_matmul`` inside ``ops.lora_linear`` (its
fused GEMV / tiled kernels: the weight is never dequantised as a whole); gradients reach x through
``nf4_matmul``'s backward and the LoRA weights through ``lora_linear``'s; the 4-bit weight is a
buffer and gets none. Embeddings, norms and the LM head stay in full precision (as in
bitsandbytes' ``load_in_4bit``, which skips the LM head).
"""
from __future__ import annotations

from torch import nn

from ..nn import NF4Linear
from .lora import LoraLinear, apply_lora
from .targets import find_targets, set_module


def quantize(model: nn.Module, *, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Replaces every block linear of `model` (under LoRA wrappers too) by an NF4Linear, in place."""
    for path, module in find_targets(model, "all"):
        holder, name = (module, "base_layer") if isinstance(module, LoraLinear) else (None, None)
        linear = module.base_layer if holder is not None else module
        if isinstance(linear, NF4Linear):
            continue
        q = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
        if q.bias is not None:
            q.bias.requires_grad_(False)
        if holder is not None:
            setattr(holder, name, q)
        else:
            set_module(model, path, q)
    return model


def apply_qlora(model: nn.Module, *, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets="all",
                rslora: bool = False, name: str = "default", blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Quantises every block linear to NF4 (blocksize 64, double-quantised absmax by default), then
    adds LoRA adapter `name` on `targets` (default: all of them, as the QLoRA paper does). In place;
    the base (4-bit weights, embeddings, norms, head) is frozen. merge() raises on this model."""
    quantize(model, blocksize=blocksize, double_quant=double_quant)
    return apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora, name=name)
