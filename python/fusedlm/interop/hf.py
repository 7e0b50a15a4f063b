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
import json
import os
import re

import torch

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
def read_json(path: str, note: str = "") -> dict:
    """The JSON file at `path` (FileNotFoundError naming it when it is missing; `note` says what it should be)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist{note}")
    with open(path) as f:
        return json.load(f)


def read_tensors(path: str, safetensors_name: str = "model.safetensors", bin_name: str = "pytorch_model.bin",
                 note: str = " (sharded checkpoints are not supported)") -> dict[str, torch.Tensor]:
    """The tensors of directory `path`: its safetensors file, else its torch.save'd one (weights only)."""
    st, bin_ = os.path.join(path, safetensors_name), os.path.join(path, bin_name)
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    if os.path.exists(bin_):
        return torch.load(bin_, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} holds neither {safetensors_name} nor {bin_name}{note}")


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


def from_pretrained(path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Loads a local Hugging Face checkpoint directory into the matching fusedlm model
    (DecoderLM, EncoderLM or Seq2SeqLM), in eval mode."""
    config_path = os.path.join(path, "config.json")
    cfg = config_from_hf(read_json(config_path))
    family = FAMILIES[cfg.family]
    tensors = read_tensors(path)
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
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    leftover = set(ours) - set(state)
    if leftover:  # buffers without a checkpoint tensor (e.g. sinusoidal tables) are rebuilt
        raise ValueError(f"no checkpoint tensor for fusedlm's {', '.join(sorted(leftover))}")
    return model.to(dtype).eval()


def save_pretrained(model, path: str, *, model_type: str | None = None) -> None:
    """Writes config.json and model.safetensors that transformers' from_pretrained loads: of
    model.config.family (or `model_type`). Raises ValueError naming what a config.json of that
    type cannot hold."""
    cfg = model.config
    family = family_of(cfg) if model_type is None else _family(model_type)
    config = config_to_hf(cfg, family.name)
    ours = model.state_dict()
    pieces: dict[str, list] = {}  # Hugging Face name -> [(part index, tensor)], transposed back at the end
    hows = {}
    for name, theirs, how, part in family.table(cfg):
        value = ours[name].detach().cpu()
        pieces.setdefault(theirs, []).append((0 if part is None else part[0], value.reshape(1, -1) if how == "flat" else value))
        hows[theirs] = how
    tensors = {}
    for theirs, parts in pieces.items():
        value = torch.cat([t for _, t in sorted(parts, key=lambda item: item[0])], dim=0)
        tensors[theirs] = value.t() if hows[theirs] == "T" else value
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


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
