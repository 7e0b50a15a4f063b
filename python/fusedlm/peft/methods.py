"""Which PEFT methods a model carries, and which of them change what it computes right now.

    peft.methods(model)          # ["lora", "prefix_tuning"]: everything applied
    peft.active_methods(model)   # what a plain forward runs besides the base weights

Writers need both: a peft adapter folder holds one method (``interop.peft.save_adapter`` refuses
to drop the others), and a Hugging Face checkpoint holds the base weights only
(``interop.hf.save_pretrained`` refuses a model whose output depends on an adapter it would not
write). A method is inactive when ``peft.disable`` is on for it, or (LoRA) when the active
adapter is merged into the base weights or no adapter is active.
"""
from __future__ import annotations

from torch import nn

from .adaptplora import AdaPtLoRAModel, GatedLoraLinear
from .bottleneck import BottleneckAdapter
from .lora import lora_layers, lora_state
from .prompts import PromptModel


def _carried(model: nn.Module) -> list[tuple[str, bool]]:
    """(method, active) for every method on `model`, outermost first."""
    out = []
    if isinstance(model, AdaPtLoRAModel):
        gated = [m for m in model.modules() if isinstance(m, GatedLoraLinear)]
        out.append(("adaptplora", not model.peft_disabled and any(not m.peft_disabled for m in gated)))
    elif isinstance(model, PromptModel):
        out.append((model.method, not model.peft_disabled))
    elif any(isinstance(m, GatedLoraLinear) for m in model.modules()):
        gated = [m for m in model.modules() if isinstance(m, GatedLoraLinear)]
        out.append(("adaptplora", any(not m.peft_disabled for m in gated)))
    state = lora_state(model)
    if state is not None:
        name = state.active
        runs = (name is not None and not state.peft_disabled
                and any(name in layer.lora_A and name not in layer.merged for _, layer in lora_layers(model)))
        out.append(("lora", runs))
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    if adapters:
        out.append(("bottleneck", any(not m.peft_disabled for m in adapters)))
    return out


def methods(model: nn.Module) -> list[str]:
    """Every PEFT method applied to `model`: "lora", "prompt_tuning", "p_tuning", "prefix_tuning",
    "adaptplora", "bottleneck" (outermost first)."""
    return [name for name, _ in _carried(model)]


def active_methods(model: nn.Module) -> list[str]:
    """The methods of :func:`methods` that change the output of a plain forward now (not disabled;
    LoRA: an active adapter that is not merged)."""
    return [name for name, active in _carried(model) if active]
