"""Parameter-efficient fine-tuning on fusedlm models, file-compatible with peft.

    from fusedlm import peft
    peft.apply_lora(model, r=8, alpha=16, targets=("q", "v"))      # in place; see peft.lora
    peft.apply_qlora(model, r=16, targets="all")                     # 4-bit base; see peft.qlora
    pm = peft.apply_prompt_tuning(model, n_virtual_tokens=20)        # a wrapper; see peft.prompts
    print(peft.report(model))                                        # peft's trainable-parameter line

Full fine-tuning needs nothing: a model with no method applied trains all its parameters. Every
method freezes the base and leaves only its own parameters trainable.
"""
from .lora import LoraLinear, adapter_names, apply_lora, disable, merge, set_adapter, unmerge
from .params import count_lora_parameters, report, trainable_parameters
from .prompts import PromptModel, apply_p_tuning, apply_prefix_tuning, apply_prompt_tuning
from .qlora import apply_qlora, load_bnb_state_dict, quantize

__all__ = ["apply_lora", "apply_qlora", "apply_prompt_tuning", "apply_p_tuning", "apply_prefix_tuning", "set_adapter",
           "adapter_names", "disable", "merge", "unmerge", "quantize", "load_bnb_state_dict", "trainable_parameters", "report",
           "count_lora_parameters", "LoraLinear", "PromptModel"]
