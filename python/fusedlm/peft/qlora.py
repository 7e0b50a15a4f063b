"""QLoRA: every block linear frozen in 4-bit NF4 (``fusedlm.nn.NF4Linear``), LoRA on top.

    peft.apply_qlora(model, r=16, alpha=32, targets="all")    # blocksize 64, double quantisation
    fusedlm.interop.hf.load_bnb_state_dict(model, hf_bnb_model.state_dict())  # the bytes of a bitsandbytes 4-bit model

The base product of each adapted layer runs inside ``ops.lora_linear``: on the CPU one fused GEMM
decodes the 4-bit weight panel by panel (never the whole weight, never a copy per step) and adds
the adapter's term in the same accumulators, forward and for x's gradient (csrc/cpu/lora_gemm.cpp);
the 4-bit weight is a buffer and gets no gradient. ``compute_dtype`` is bitsandbytes'
``bnb_4bit_compute_dtype``: ``"auto"`` (the default) multiplies bf16-rounded operands with float32
sums (``vdpbf16ps``) where the CPU has bf16 dot products (avx512_bf16) and stays float32 elsewhere,
where bf16 would be emulated; activations, outputs and gradients keep their dtype. Embeddings, norms
and the LM head stay in full precision (as in bitsandbytes' ``load_in_4bit``, which skips the LM head).
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import NF4Linear
from ..ops import _gemm
from .lora import LoraLinear, apply_lora
from .targets import find_targets, set_module


def resolve_compute_dtype(compute_dtype) -> torch.dtype | None:
    """"auto" -> torch.bfloat16 where the CPU kernels run bf16 dot products natively, else None;
    None, torch.float32 (= None) or torch.bfloat16 as given."""
    if compute_dtype == "auto":
        try:
            return torch.bfloat16 if _gemm.native_bf16() else None
        except RuntimeError:  # no fusedlm._C: the reference path, float32
            return None
    if compute_dtype in (None, torch.float32):
        return None
    if compute_dtype != torch.bfloat16:
        raise ValueError(f"compute_dtype must be 'auto', None, torch.float32 or torch.bfloat16, got {compute_dtype!r}")
    return compute_dtype


def quantize(model: nn.Module, *, blocksize: int = 64, double_quant: bool = True, compute_dtype="auto") -> nn.Module:
    """Replaces every block linear of `model` (under LoRA wrappers too) by an NF4Linear, in place;
    compute_dtype as :func:`apply_qlora` takes it (set on every NF4 layer, existing ones too)."""
    compute_dtype = resolve_compute_dtype(compute_dtype)
    for path, module in find_targets(model, "all"):
        holder, name = (module, "base_layer") if isinstance(module, LoraLinear) else (None, None)
        linear = module.base_layer if holder is not None else module
        if isinstance(linear, NF4Linear):
            linear.compute_dtype = compute_dtype
            continue
        q = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
        q.compute_dtype = compute_dtype
        if q.bias is not None:
            q.bias.requires_grad_(False)
        if holder is not None:
            setattr(holder, name, q)
        else:
            set_module(model, path, q)
    return model


def apply_qlora(model: nn.Module, *, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets="all",
                rslora: bool = False, name: str = "default", blocksize: int = 64, double_quant: bool = True,
                compute_dtype="auto") -> nn.Module:
    """Quantises every block linear to NF4 (blocksize 64, double-quantised absmax by default), then
    adds LoRA adapter `name` on `targets` (default: all of them, as the QLoRA paper does). In place;
    the base (4-bit weights, embeddings, norms, head) is frozen. merge() raises on this model.
    compute_dtype: "auto" (bf16 operands where the CPU has bf16 dot products), None / torch.float32,
    or torch.bfloat16 (see the module docstring)."""
    quantize(model, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
    return apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora, name=name)
