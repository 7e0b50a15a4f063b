"""QLoRA: every block linear frozen in 4-bit NF4 (``fusedlm.nn.NF4Linear``), LoRA on top.

    peft.apply_qlora(model, r=16, alpha=32, targets="all")    # blocksize 64, double quantisation
    peft.load_bnb_state_dict(model, hf_bnb_model.state_dict())  # the bytes of a bitsandbytes 4-bit model

The base product of each adapted layer is ``ops.nf4_matmul`` inside ``ops.lora_linear`` (its
fused GEMV / tiled kernels: the weight is never dequantised as a whole); gradients reach x through
``nf4_matmul``'s backward and the LoRA weights through ``lora_linear``'s; the 4-bit weight is a
buffer and gets none. Embeddings, norms and the LM head stay in full precision (as in
bitsandbytes' ``load_in_4bit``, which skips the LM head).
"""
from __future__ import annotations

import torch
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


def _module_and_param(model: nn.Module, ours: str) -> tuple[nn.Module, str]:
    path, _, param = ours.rpartition(".")
    module = model.get_submodule(path)
    return (module.base_layer if isinstance(module, LoraLinear) else module), param


@torch.no_grad()
def load_bnb_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, model_type: str | None = None) -> nn.Module:
    """Loads the state dict of a transformers model quantised by bitsandbytes (``load_in_4bit``, NF4)
    into `model`, a fusedlm model of the same config whose block linears are NF4Linear (from
    :func:`apply_qlora` or :func:`quantize`): the 4-bit bytes, absmax and double-quantisation state
    are taken as they are; the other tensors are copied. Returns the model.

    Supported: checkpoints whose quantised linears map one to one onto fusedlm's (llama, qwen2, bert,
    roberta, t5, bart); GPT-2's stacked, transposed c_attn cannot be split in 4-bit (ValueError)."""
    from ..interop import hf

    cfg = model.config
    model_type = model_type or hf.guess_model_type(cfg)
    for ours, theirs, how, part in hf._table(cfg, model_type):
        module, param = _module_and_param(model, ours)
        key = hf._lookup(state_dict, theirs, model_type)
        if key is None:
            raise ValueError(f"the state dict lacks {theirs} (fusedlm's {ours})")
        if f"{key}.absmax" in state_dict:  # a 4-bit weight: its bytes and quantisation state as they are
            if part is not None or how == "T":
                raise ValueError(f"{key} is a 4-bit weight stored {'stacked' if part else 'transposed'} ({model_type}); fusedlm "
                                 "cannot split or transpose it without dequantising: load the dense checkpoint and quantise")
            if not isinstance(module, NF4Linear):
                raise ValueError(f"{key} is 4-bit but fusedlm's {ours} is a {type(module).__name__}: apply_qlora / quantize the "
                                 "model first")
            own = {"weight" + k[len(key):]: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
            missing = [k for k in module.load_state_dict(own, strict=False).missing_keys if k != "bias"]
            if missing:
                raise ValueError(f"the 4-bit weight {key} lacks {missing}")
        elif isinstance(module, NF4Linear) and param == "weight":
            raise ValueError(f"fusedlm's {ours} is 4-bit but the state dict holds {key} in full precision")
        else:
            value = state_dict[key].t() if how == "T" else state_dict[key]
            if part is not None:
                value = value.chunk(part[1], dim=0)[part[0]]
            target = getattr(module, param)
            value = value.reshape(target.shape) if how == "flat" else value
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{key} has shape {list(value.shape)} but fusedlm's {ours} is {list(target.shape)}")
            target.copy_(value)
    return model
