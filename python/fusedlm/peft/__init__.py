"""Parameter-efficient fine-tuning on fusedlm models, file-compatible with peft.

    from fusedlm import peft
    peft.apply_lora(model, r=8, alpha=16, targets=("q", "v"))      # in place; see peft.lora
    peft.apply_qlora(model, r=16, targets="all")                     # 4-bit base; see peft.qlora
    pm = peft.apply_prompt_tuning(model, n_virtual_tokens=20)        # a wrapper; see peft.prompts
    mt = peft.apply_adaptplora(model, n_tasks=4, n_prompt_tokens=8)  # multi-task; see peft.adaptplora
    peft.apply_adapters(model, kind="houlsby")                       # bottleneck adapters; see peft.bottleneck
    print(peft.report(model))                                        # peft's trainable-parameter line
    peft.methods(model); peft.active_methods(model)                  # what is applied / what runs now

Full fine-tuning needs nothing: a model with no method applied trains all its parameters. Every
method freezes the base and leaves only its own parameters trainable. Adapter files:
``fusedlm.interop.peft.load_adapter`` / ``save_adapter``.
"""
from .adaptplora import AdaPtLoRAModel, GatedLoraLinear, apply_adaptplora, freeze_gate
from .bottleneck import BottleneckAdapter, apply_adapters
from .lora import LoraLinear, adapter_names, apply_lora, disable, merge, set_adapter, unmerge
from .methods import active_methods, methods
from .params import count_lora_parameters, report, trainable_parameters
from .prompts import PromptModel, apply_p_tuning, apply_prefix_tuning, apply_prompt_tuning
from .qlora import apply_qlora, quantize

__all__ = ["apply_lora", "apply_qlora", "apply_prompt_tuning", "apply_p_tuning", "apply_prefix_tuning", "apply_adaptplora",
           "apply_adapters", "set_adapter", "adapter_names", "disable", "merge", "unmerge", "freeze_gate", "quantize",
           "methods", "active_methods",
           "trainable_parameters", "report", "count_lora_parameters", "LoraLinear", "GatedLoraLinear",
           "PromptModel", "AdaPtLoRAModel", "BottleneckAdapter"]
