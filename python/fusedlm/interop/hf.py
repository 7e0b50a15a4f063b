"""Hugging Face checkpoints in and out.

    from fusedlm.interop import hf
    model = hf.from_pretrained("path/to/checkpoint")   # config.json + model.safetensors | pytorch_model.bin
    hf.save_pretrained(model, "out/")                    # transformers' from_pretrained loads it back

Supported model types: gpt2, llama, qwen2, bert, roberta, t5, bart. Nothing is downloaded: the path
is a local directory. What each model type's config.json and checkpoint names mean lives in its
family record (``fusedlm.models.families``): this module reads and writes the files. fusedlm's
projections are separate (q_proj, k_proj, v_proj, o_proj; gate_proj, up_proj, down_proj), so
loading is a copy, except GPT-2, whose c_attn stacks q, k and v (split at load, stacked again at
save) and whose Conv1D weights are stored transposed.
"""
from __future__ import annotations

import dataclasses
import os
import re

import torch

from .. import _io
from ..models import ModelConfig, build
from ..models.families import FAMILIES, Family

SUPPORTED = tuple(name for name, family in FAMILIES.items() if family.from_hf is not None)

# Checkpoint tensors that are not parameters or that duplicate a tied one: ignored when loading.
_IGNORED = re.compile(r"(position_ids|attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq|embed_tokens\.weight|"
                      r"lm_head\.weight|cls\.predictions\.decoder\.(weight|bias)|lm_head\.decoder\.(weight|bias))$")


def _family(model_type: str | None) -> Family:
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
    return FAMILIES[model_type]


def family_of(cfg: ModelConfig) -> Family:
    """The family record of a config that has a Hugging Face counterpart (ValueError otherwise)."""
    if cfg.family not in SUPPORTED:
        raise ValueError(f"config.family={cfg.family!r} has no counterpart among the supported Hugging Face model types "
                         f"({', '.join(SUPPORTED)}): build the config from one of their presets or checkpoints")
    return FAMILIES[cfg.family]


def config_from_hf(c: dict) -> ModelConfig:
    """A ModelConfig from the dict of a Hugging Face config.json."""
    return ModelConfig(**_family(c.get("model_type")).config_from_hf(c))


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
    """The config.json dict of the Hugging Face model matching cfg (of cfg.family, or `model_type`).
    Raises ValueError naming the fields that config.json cannot hold (that would come back
    different from it)."""
    family = family_of(cfg) if model_type is None else _family(model_type)
    out = family.config_to_hf(cfg)
    back = dataclasses.replace(config_from_hf(out), family=cfg.family)
    lost = [f"{f.name}={getattr(cfg, f.name)!r} (read back as {getattr(back, f.name)!r})"
            for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(back, f.name)]
    if lost:
        raise ValueError(f"{', '.join(lost)}: no counterpart in a Hugging Face {family.name} config.json")
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
CONFIG_NAME, WEIGHTS_NAME, BIN_NAME = "config.json", "model.safetensors", "pytorch_model.bin"


def read_json(path: str, note: str = "") -> dict:
    """The JSON object at `path`; FileNotFoundError naming it when it is missing (`note` says what it
    should be), ValueError naming it when it is empty, truncated or not a JSON object."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist{note}")
    value = _io.read_json(path, "JSON file")
    if not isinstance(value, dict):
        raise ValueError(f"JSON file {path} holds a {type(value).__name__}, not an object{note}")
    return value


def read_tensors(path: str, safetensors_name: str = WEIGHTS_NAME, bin_name: str = BIN_NAME,
                 note: str = " (sharded checkpoints are not supported)") -> dict[str, torch.Tensor]:
    """The tensors of directory `path`: its safetensors file, else its torch.save'd one (weights
    only). Every error names the file and what is wrong with it (empty, truncated, bad header, not
    a tensor file, a tensor holding NaN or inf)."""
    st, bin_ = os.path.join(path, safetensors_name), os.path.join(path, bin_name)
    if os.path.exists(st):
        tensors = _io.read_safetensors(st, "weights file")
        file = st
    elif os.path.exists(bin_):
        tensors = _io.read_torch(bin_, "weights file")
        file = bin_
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise ValueError(f"weights file {bin_} does not hold a state dict (names -> tensors), got {type(tensors).__name__}")
    else:
        raise FileNotFoundError(f"{path} holds neither {safetensors_name} nor {bin_name}{note}")
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"weights file {file}: tensor {key} holds NaN or inf values (a corrupted or diverged checkpoint)")
    return tensors


def lookup(tensors: dict, name: str, family: Family) -> str | None:
    """The key of checkpoint tensor `name` in `tensors`, also found without the family's base-model
    prefix (BertModel files have no "bert." prefix, LlamaModel files no "model."); None if absent."""
    if name in tensors:
        return name
    prefix = family.base_prefix
    if prefix and name.startswith(prefix) and name[len(prefix):] in tensors:
        return name[len(prefix):]
    return None


def _as_ours(value: torch.Tensor, how: str, part: tuple[int, int] | None) -> torch.Tensor:
    """A checkpoint tensor as fusedlm's: transposed back ("T"), its part of a stacked matrix, flattened ("flat")."""
    value = value.t() if how == "T" else value
    if part is not None:
        value = value.chunk(part[1], dim=0)[part[0]]
    return value.reshape(-1) if how == "flat" else value


def _dtype(dtype) -> torch.dtype:
    """A floating torch.dtype, or its name ("float16", "torch.bfloat16")."""
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"dtype must be a torch floating dtype or its name (e.g. 'float16'), got {dtype!r}")
        dtype = named
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise (ValueError if isinstance(dtype, torch.dtype) else TypeError)(
            f"dtype must be a torch floating dtype (torch.float32, torch.bfloat16, ...) or its name, got {dtype!r}")
    return dtype


def _device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device or its name ('cpu', 'cuda:0'), got {device!r} ({e})") from None


def _config(path: str) -> tuple[str, dict, ModelConfig]:
    config_path = os.path.join(_io.resolve(path), CONFIG_NAME)
    path = os.path.dirname(config_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a checkpoint folder (it {'is a file' if os.path.exists(path) else 'does not exist'})")
    c = read_json(config_path, note=" (a Hugging Face checkpoint folder holds config.json)")
    try:
        return config_path, c, config_from_hf(c)
    except KeyError as e:
        raise ValueError(f"{config_path} lacks the field {e.args[0]!r} its model_type {c.get('model_type')!r} needs") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from None


def from_pretrained(path: str, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """Loads a local Hugging Face checkpoint directory into the matching fusedlm model
    (DecoderLM, EncoderLM or Seq2SeqLM), in eval mode. A checkpoint of a model quantised to NF4 by
    bitsandbytes (config.json's ``quantization_config``; what :func:`save_pretrained` writes for a
    QLoRA model) loads with its block linears as ``fusedlm.nn.NF4Linear`` on the same bytes.

    Every problem is an error naming the file: a missing or unreadable config.json or weights file
    (empty, truncated, bad header), a field the model type needs, a tensor of the wrong shape or
    holding NaN / inf, tensors the config needs and the file lacks, tensors it does not explain.
    dtype: a floating torch dtype or its name."""
    dtype, device = _dtype(dtype), _device(device)
    config_path, c, cfg = _config(path)
    path = os.path.dirname(config_path)  # the previous version, if a save was killed mid-swap
    family = FAMILIES[cfg.family]
    tensors = read_tensors(path)
    quant = c.get("quantization_config")
    if quant is not None:
        return _from_pretrained_nf4(path, cfg, quant, tensors, dtype, device)
    with torch.device("meta"):
        model = build(cfg)
    ours = dict(model.state_dict())
    state, used, missing = {}, set(), []
    for name, theirs, how, part in family.table(cfg):
        key = lookup(tensors, theirs, family)
        if key is None:
            missing.append(theirs)
            continue
        used.add(key)
        value = _as_ours(tensors[key], how, part)
        want = tuple(ours[name].shape)
        if tuple(value.shape) != want:
            raise ValueError(f"checkpoint tensor {key}{'' if part is None else f' (part {part[0] + 1} of {part[1]})'} has shape "
                             f"{list(value.shape)} but the config ({config_path}) makes fusedlm's {name} {list(want)}")
        state[name] = value.contiguous()
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors the config needs: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    unexpected = sorted(k for k in tensors if k not in used and not _IGNORED.search(k))
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors the config does not explain: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    leftover = set(ours) - set(state)
    if leftover:  # buffers without a checkpoint tensor (e.g. sinusoidal tables) are rebuilt
        raise ValueError(f"no checkpoint tensor for fusedlm's {', '.join(sorted(leftover))}")
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    return model.to(dtype).eval()


def _from_pretrained_nf4(path: str, cfg: ModelConfig, quant: dict, tensors: dict, dtype: torch.dtype, device: torch.device):
    """A checkpoint whose block linears bitsandbytes quantised to NF4 (load_in_4bit)."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not isinstance(quant, dict) or quant.get("quant_method") != "bitsandbytes" or not quant.get("load_in_4bit") \
            or quant.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{config_path}: quantization_config {quant!r} is not supported (only bitsandbytes load_in_4bit "
                         "with bnb_4bit_quant_type='nf4')")
    from ..peft.qlora import quantize

    # the checkpoint's compute dtype, as bitsandbytes reads it: bf16 operands only where it says so
    compute = torch.bfloat16 if quant.get("bnb_4bit_compute_dtype") == "bfloat16" else None
    model = quantize(build(cfg), double_quant=bool(quant.get("bnb_4bit_use_double_quant", False)), compute_dtype=compute)
    try:
        load_bnb_state_dict(model, tensors)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path}: {e}") from None
    for module in model.modules():  # full-precision parameters in `dtype`; the 4-bit bytes as they are
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(dtype)
    return model.to(device).eval()


def _linear_at(model, name: str):
    """(module, parameter name) of checkpoint row `name`, looking through PEFT wrappers to their base layer."""
    path, _, param = name.rpartition(".")
    module = model.get_submodule(path)
    return getattr(module, "base_layer", module), param


def save_pretrained(model, path: str, *, model_type: str | None = None, dequantize: bool = False) -> None:
    """Writes config.json and model.safetensors that transformers' from_pretrained loads: of
    model.config.family (or `model_type`). The folder's files are replaced together (DESIGN.md
    rule 8: a crash mid-save leaves the previous checkpoint whole); other files in it are kept.

    What is written is what the model computes now: the base weights, with merged LoRA adapters in
    them. A model whose output depends on something a checkpoint cannot hold (an active LoRA
    adapter that is not merged, virtual tokens, bottleneck adapters) is refused, naming it:
    merge it (``peft.merge``), save it with ``interop.peft.save_adapter``, or save the base under
    ``with peft.disable(model):``. A 4-bit (NF4, QLoRA) model is written in bitsandbytes' layout
    (``weight`` bytes + ``weight.absmax`` / ``quant_map`` / ``quant_state.bitsandbytes__nf4`` ...,
    and a ``quantization_config`` in config.json) that transformers (with bitsandbytes) and
    :func:`from_pretrained` load; ``dequantize=True`` writes dense weights instead. Raises
    ValueError naming what a config.json of that type cannot hold, and for non-finite weights."""
    from ..nn import NF4Linear
    from ..peft.methods import active_methods
    from ..peft.prompts import PromptModel

    active = active_methods(model)
    if active:
        raise ValueError(f"the model's output depends on PEFT method(s) {active} that a Hugging Face checkpoint does not hold: "
                         "merge LoRA adapters first (fusedlm.peft.merge), save adapters with fusedlm.interop.peft.save_adapter, "
                         "or save the base model inside `with fusedlm.peft.disable(model):`")
    inner = model.model if isinstance(model, PromptModel) else model
    cfg = inner.config
    family = family_of(cfg) if model_type is None else _family(model_type)
    config = config_to_hf(cfg, family.name)
    pieces: dict[str, list] = {}  # Hugging Face name -> [(part index, tensor)], transposed back at the end
    hows, quantized = {}, {}
    for name, theirs, how, part in family.table(cfg):
        module, param = _linear_at(inner, name)
        if isinstance(module, NF4Linear) and param == "weight":
            if dequantize:
                value = module.dequantized_weight().detach().cpu()
            elif part is not None or how == "T":
                raise ValueError(f"fusedlm's {name} is 4-bit and {family.name} stores {theirs} "
                                 f"{'stacked' if part else 'transposed'}: a 4-bit checkpoint cannot hold it; pass dequantize=True")
            else:
                quantized[theirs] = module
                continue
        else:
            value = getattr(module, param).detach().cpu()
        pieces.setdefault(theirs, []).append((0 if part is None else part[0], value.reshape(1, -1) if how == "flat" else value))
        hows[theirs] = how
    tensors = {}
    for theirs, parts in pieces.items():
        value = torch.cat([t for _, t in sorted(parts, key=lambda item: item[0])], dim=0)
        tensors[theirs] = value.t() if hows[theirs] == "T" else value
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key} holds NaN or inf values: not writing it to {path}")
    if quantized:
        first = next(iter(quantized.values()))
        config["quantization_config"] = _bnb_config(first, tensors, quantized)
        for theirs, module in quantized.items():
            for k, v in module.state_dict().items():
                if k.startswith("weight"):
                    tensors[theirs + k[len("weight"):]] = v.detach().cpu()
    from safetensors.torch import save_file

    with _io.atomic_folder(path) as tmp:
        _io.write_json(os.path.join(tmp, CONFIG_NAME), config)
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS_NAME),
                  metadata={"format": "pt"})


def _bnb_config(first, tensors: dict, quantized: dict) -> dict:
    """config.json's quantization_config of a checkpoint whose `quantized` linears are NF4 (bitsandbytes' fields)."""
    dense = sorted({k.removesuffix(".weight") for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2})
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
            "_load_in_8bit": False, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": bool(first.double_quant),
            "bnb_4bit_compute_dtype": str(first.compute_dtype or first.weight_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": dense or None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


@torch.no_grad()
def load_bnb_state_dict(model, state_dict: dict[str, torch.Tensor], *, model_type: str | None = None):
    """Loads the state dict of a transformers model quantised by bitsandbytes (``load_in_4bit``, NF4)
    into `model`, a fusedlm model of the same config whose block linears are NF4Linear (from
    ``fusedlm.peft.apply_qlora`` or ``quantize``): the 4-bit bytes, absmax and double-quantisation
    state are taken as they are; the other tensors are copied. Returns the model.

    Supported: checkpoints whose quantised linears map one to one onto fusedlm's (llama, qwen2, bert,
    roberta, t5, bart); GPT-2's stacked, transposed c_attn cannot be split in 4-bit (ValueError)."""
    from ..nn import NF4Linear
    from ..peft.lora import LoraLinear

    cfg = model.config
    family = family_of(cfg) if model_type is None else _family(model_type)
    for ours, theirs, how, part in family.table(cfg):
        path, _, param = ours.rpartition(".")
        module = model.get_submodule(path)
        module = module.base_layer if isinstance(module, LoraLinear) else module
        key = lookup(state_dict, theirs, family)
        if key is None:
            raise ValueError(f"the state dict lacks {theirs} (fusedlm's {ours})")
        if f"{key}.absmax" in state_dict:  # a 4-bit weight: its bytes and quantisation state as they are
            if part is not None or how == "T":
                raise ValueError(f"{key} is a 4-bit weight stored {'stacked' if part else 'transposed'} ({family.name}); fusedlm "
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
            target = getattr(module, param)
            value = _as_ours(state_dict[key], how, part)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{key} has shape {list(value.shape)} but fusedlm's {ours} is {list(target.shape)}")
            target.copy_(value)
    return model
