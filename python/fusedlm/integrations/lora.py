"""peft LoRA ``Linear`` layers (QLoRA's ``Linear4bit`` too) computed by :func:`fusedlm.ops.lora_linear`.

The patched layer stays peft's module (adapters, ``set_adapter``, merging, saving all work as
before); only its forward changes. One active adapter: ``x Wᵀ + b + s (dropout(x) Aᵀ) Bᵀ`` in one
op. peft's mixed batch (``adapter_names=[...]``, one name per sample, "__base__" for none): the
used adapters are stacked (ranks zero-padded to the largest, which changes nothing), each row of
x gets its adapter's index and each adapter its scaling as a gate. A QLoRA layer passes the base
layer's NF4 bytes as the weight (see :mod:`.nf4`).

A call the op cannot take runs peft's own forward, with a one-time warning naming why: several
adapters active at once, LoRA variants (DoRA, ...), ``lora_bias``, dtypes that differ between x,
the adapters and the base layer, different dropout rates in one mixed batch while training. A
merged or disabled layer runs peft's forward silently (that is the base layer alone).
"""
from __future__ import annotations

import types

import torch
from peft.tuners.lora import layer as lora_layer

from .. import ops
from .._warn import warn_once

try:
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except ImportError:  # peft without bitsandbytes
    LoraLinear4bit = None

LAYER_TYPES = tuple(t for t in (lora_layer.Linear, LoraLinear4bit) if t is not None)


def _base_weight(layer, x: torch.Tensor):
    """(weight, bias) of the base layer for ops.lora_linear, or a reason it cannot take them."""
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Linear) and not hasattr(base.weight, "quant_state"):
        weight = base.weight
        if weight.dtype != x.dtype:
            return f"the base weight is {weight.dtype} and x is {x.dtype}"
    else:
        from . import nf4

        weight = nf4.qweight(base)
        if base.compute_dtype not in (None, x.dtype):
            return f"the base layer computes in {base.compute_dtype} and x is {x.dtype}"
    if base.bias is not None and base.bias.dtype != x.dtype:
        return f"the base bias is {base.bias.dtype} and x is {x.dtype}"
    return weight, base.bias


def _adapter_reason(layer, name: str, x: torch.Tensor) -> str | None:
    if name in layer.lora_variant:
        return f"a LoRA variant ({type(layer.lora_variant[name]).__name__})"
    if layer.lora_bias[name]:
        return "lora_bias=True"
    if layer.lora_A[name].weight.dtype != x.dtype:
        return f"the adapter is {layer.lora_A[name].weight.dtype} and x is {x.dtype}"
    return None


def _dropout_p(layer, name: str) -> float:
    drop = layer.lora_dropout[name]
    return drop.p if isinstance(drop, torch.nn.Dropout) and layer.training else 0.0


def _single(layer, x: torch.Tensor):
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters" if active else None
    name = active[0]
    reason = _adapter_reason(layer, name, x)
    if reason:
        return reason
    return dict(lora_a=layer.lora_A[name].weight, lora_b=layer.lora_B[name].weight, scaling=layer.scaling[name],
                dropout_p=_dropout_p(layer, name))


def _mixed(layer, x: torch.Tensor, adapter_names: list[str]):
    used = [n for n in dict.fromkeys(adapter_names) if n in layer.lora_A]
    if not used:
        return None
    for name in used:
        reason = _adapter_reason(layer, name, x)
        if reason:
            return reason
    rates = {_dropout_p(layer, n) for n in used}
    if len(rates) > 1:
        return f"adapters with different dropout rates ({sorted(rates)}) in one mixed batch"
    r = max(layer.r[n] for n in used)
    # zero-padding every adapter to rank r leaves (x Aᵀ) Bᵀ unchanged
    lora_a = torch.stack([torch.nn.functional.pad(layer.lora_A[n].weight, (0, 0, 0, r - layer.r[n])) for n in used])
    lora_b = torch.stack([torch.nn.functional.pad(layer.lora_B[n].weight, (0, r - layer.r[n])) for n in used])
    index = {n: i for i, n in enumerate(used)}
    per_sample = torch.tensor([index.get(n, -1) for n in adapter_names], device=x.device)
    rows_per_sample = x[0].numel() // x.shape[-1]
    gates = torch.tensor([layer.scaling[n] for n in used], dtype=torch.float32, device=x.device)
    return dict(lora_a=lora_a, lora_b=lora_b, scaling=1.0, gates=gates, dropout_p=rates.pop(),
                adapter_ids=per_sample.repeat_interleave(rows_per_sample))  # [A, r, K], [A, N, r], ids over rows


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter_names = kwargs.get("adapter_names")
    if self.disable_adapters or self.merged or args or set(kwargs) - {"adapter_names"}:
        return type(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)
    fused = _single(self, x) if adapter_names is None else _mixed(self, x, adapter_names)
    if isinstance(fused, dict):
        base = _base_weight(self, x)
        fused = base if isinstance(base, str) else dict(fused, weight=base[0], bias=base[1])
    if not isinstance(fused, dict):
        if fused is not None:
            warn_once(f"peft: {fused}", f"fusedlm LoRA: {fused} is not supported by ops.lora_linear; such calls "
                      "run peft's forward instead (shown once)")
        return type(self).forward(self, x, *args, **kwargs)
    weight, lora_a, lora_b, scaling = fused.pop("weight"), fused.pop("lora_a"), fused.pop("lora_b"), fused.pop("scaling")
    return ops.lora_linear(x, weight, lora_a, lora_b, scaling, **fused)


def why_not(layer: torch.nn.Module) -> str | None:
    """Why `layer` cannot be patched, or None."""
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out (a Conv1D base layer, GPT-2 style): ops.lora_linear takes weight [N, K]"
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Linear) and not hasattr(base.weight, "quant_state"):
        return None
    if LoraLinear4bit is not None and isinstance(layer, LoraLinear4bit):
        from . import nf4

        return nf4.why_not(base)
    return f"a {type(base).__name__} base layer"


def patch(layer) -> None:
    layer.forward = types.MethodType(_forward, layer)


def unpatch(layer) -> None:
    del layer.forward
