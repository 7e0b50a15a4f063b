"""fusedlm's kernels inside Hugging Face transformers, peft and bitsandbytes models.

    from fusedlm import integrations
    report = integrations.apply(model)   # a transformers model, a peft model, bnb 4-bit or not
    print(report)                        # what now runs on fusedlm, what was left alone and why
    integrations.undo(model)             # or report.undo(): the original modules and settings

:func:`apply` patches in place, one module per fused op it puts in: transformers' attention
(``attn_implementation="fusedlm"``, :mod:`.transformers`), peft LoRA ``Linear`` layers
(:mod:`.lora`), bitsandbytes NF4 ``Linear4bit`` layers (:mod:`.nf4`) and sampling in
``generate`` (:mod:`.sampling`). Modules keep their classes, parameters and state dicts; only
forwards (and the attention setting) change. (``fusedlm.interop``, beside it, reads and writes
those libraries' files.)
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys

import torch

__all__ = ["apply", "undo", "Report"]


def __getattr__(name: str):  # fusedlm.integrations.transformers etc. without importing every peer up front
    if name in ("transformers", "lora", "nf4", "sampling"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class Report:
    """What :func:`apply` did: ``patched`` and ``left_alone`` hold (module name, what / why) pairs.

    The steps that undo the patches are kept as data, (function, the objects it restores), not as
    closures: ``copy.deepcopy`` of a patched model copies its report with them, pointing at the
    copy's modules, so undoing the copy restores the copy and leaves the original patched (trl
    deep-copies a model for its reference model)."""

    patched: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    left_alone: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    _undo: list[tuple] = dataclasses.field(default_factory=list, repr=False)

    def undo(self) -> None:
        """Restores every patched module and setting (most recent first); a second call does nothing."""
        while self._undo:
            step, *objects = self._undo.pop()
            step(*objects)

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for _, what in self.patched:
            counts[what] = counts.get(what, 0) + 1
        lines = ["fusedlm.integrations.apply: " + (", ".join(f"{n} x {w}" for w, n in counts.items()) or "nothing patched")]
        lines += [f"  left alone: {name}: {why}" for name, why in self.left_alone]
        return "\n".join(lines)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _hf_model(model: torch.nn.Module):
    """The transformers PreTrainedModel inside `model` (itself, or a peft model's base), or None."""
    if not _installed("transformers"):
        return None
    from transformers import PreTrainedModel

    if _installed("peft"):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model = model.get_base_model()
    return model if isinstance(model, PreTrainedModel) else None


def _uses_attention_interface(hf) -> bool:
    """True when some module of `hf` is defined in a transformers modeling file that dispatches
    through the attention interface (ALL_ATTENTION_FUNCTIONS); models written before it (XLNet,
    BLOOM, ...) compute attention their own way, whatever attn_implementation says."""
    return any(hasattr(sys.modules.get(type(m).__module__), "ALL_ATTENTION_FUNCTIONS") for m in hf.modules())


def _set_attention(hf, name: str) -> None:
    hf.set_attn_implementation(name)


def _patch_attention(hf, report: Report) -> None:
    from . import transformers as attention

    if not _uses_attention_interface(hf):
        report.left_alone.append(("attention", f"{type(hf).__name__} does not compute attention through transformers' "
                                               "attention interface: attn_implementation cannot switch it to ops.attention"))
        return
    attention.register()
    previous = hf.config._attn_implementation
    try:
        hf.set_attn_implementation(attention.NAME)
    except (ValueError, KeyError, NotImplementedError) as e:
        report.left_alone.append(("attention", f"set_attn_implementation('fusedlm') failed: {e}"))
        return
    report.patched.append(("attention", f"attn_implementation 'fusedlm' (was {previous!r})"))
    report._undo.append((_set_attention, hf, previous))


def _patch_modules(model: torch.nn.Module, report: Report, *, with_lora: bool, with_nf4: bool) -> None:
    kinds = []  # (layer types, what the patch does, the module that patches them)
    lora_layer = None
    if with_lora and _installed("peft"):
        from peft.tuners.lora import LoraLayer

        from . import lora

        kinds.append((lora.LAYER_TYPES, "peft LoRA -> ops.lora_linear", lora))
        lora_layer = LoraLayer
    if with_nf4 and _installed("bitsandbytes"):
        import bitsandbytes

        from . import nf4

        kinds.append(((bitsandbytes.nn.Linear4bit,), "bnb Linear4bit -> ops.nf4_matmul", nf4))
    for name, module in model.named_modules():
        kind = next(((what, patcher) for types, what, patcher in kinds if isinstance(module, types)), None)
        if kind is None:
            if lora_layer is not None and isinstance(module, lora_layer):
                report.left_alone.append((name, f"peft {type(module).__name__} (fusedlm fuses LoRA Linear layers)"))
            continue
        what, patcher = kind
        why = patcher.why_not(module)
        if why:
            report.left_alone.append((name, why))
            continue
        patcher.patch(module)
        report.patched.append((name, what))
        report._undo.append((patcher.unpatch, module))


def apply(model: torch.nn.Module, *, attention: bool = True, lora: bool = True, nf4: bool = True,
          sampling: bool = True) -> Report:
    """Patches `model` in place to run on fusedlm's kernels; returns the :class:`Report` (also kept on
    the model for :func:`undo`). The flags turn off one kind of patch each. Raises ValueError on a
    model that is already patched. A model whose attention does not go through transformers'
    attention interface is reported as left alone, not as patched. A deep copy of a patched model
    is patched the same way, and :func:`undo` acts on the model it is given (original or copy)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_fusedlm_report", None) is not None:
        raise ValueError("model is already patched by fusedlm.integrations.apply; undo(model) first")
    report = Report()
    hf = _hf_model(model)
    if hf is None and (attention or sampling):
        report.left_alone.append(("attention, sampling", f"{type(model).__name__} is not a transformers model"))
    if hf is not None and attention:
        _patch_attention(hf, report)
    _patch_modules(model, report, with_lora=lora, with_nf4=nf4)
    if hf is not None and sampling and hasattr(hf, "_get_logits_processor"):
        from . import sampling

        sampling.patch(hf)
        report.patched.append(("generate", "sampling -> ops.sample"))
        report._undo.append((sampling.unpatch, hf))
    model._fusedlm_report = report
    report._undo.insert(0, (delattr, model, "_fusedlm_report"))
    return report


def undo(model: torch.nn.Module) -> None:
    """Restores a model patched by :func:`apply`. Raises ValueError if it is not patched."""
    report = getattr(model, "_fusedlm_report", None)
    if report is None:
        raise ValueError("model is not patched by fusedlm.integrations.apply")
    report.undo()
