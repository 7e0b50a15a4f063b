"""peft adapter directories in and out: LoRA, prompt tuning, prefix tuning, P-tuning.

    from fusedlm.interop import peft as peft_files
    model = hf.from_pretrained("llama-dir")
    model = peft_files.load_adapter(model, "adapter-dir")         # LoRA: in place; prompt methods: a PromptModel
    peft_files.save_adapter(model, "out-dir")                     # peft.PeftModel.from_pretrained(hf_model, "out-dir")

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``). LoRA keys name the Hugging Face module, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (A ``[r, K]``) and ``...lora_B.weight``
(B ``[N, r]``); the module names come from ``fusedlm.interop.hf``'s parameter table, so every model
type hf supports is covered. Which layers carry the adapter is read from the keys (target_modules,
layers_to_transform and exclude_modules only decided which keys peft wrote); the scale is
lora_alpha (or its alpha_pattern entry) over r (or sqrt(r) with use_rslora), r read from the shapes.

Stacked checkpoint matrices (GPT-2's c_attn = [q; k; v]): a LoRA on the stacked matrix is a LoRA on
each slice with A shared and B cut into the slices' rows; LoRAs on slices are one LoRA on the
stacked matrix with the A's stacked along the rank and each B placed in its rows (zeros elsewhere),
so loading and saving are both exact. On loading, a slice whose rows of B are all zero gets no
adapter and zero columns of B are dropped with their rows of A (when some other slice is nonzero):
a file written from LoRAs on q and v comes back as LoRAs on q and v of the original ranks.

Prompt methods hold one tensor, ``prompt_embeddings``: the virtual token embeddings (T, d) for prompt
tuning and P-tuning (P-tuning's encoder output: peft saves the encoded tokens, not the encoder), the
(P, L·2·Hkv·D) key/value table for prefix tuning (after the projection MLP, if any). They load as
fixed tables (trainable, no encoder), the way ``PeftModel.from_pretrained`` loads them.

LoraConfig fields that change the forward (use_dora, lora_bias, bias != "none", modules_to_save, ...)
are errors naming the field; unknown fields are errors when set.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from .. import _io
from .. import _validate as check
from ..models import DecoderLM, EncoderLM, Seq2SeqLM
from ..nn import NF4Linear
from ..peft import lora as lora_mod
from ..peft import routing
from ..peft.methods import methods as peft_methods
from ..peft.prompts import METHODS as _PROMPT_METHODS, PrefixEncoder, PromptEmbedding, PromptEncoder, PromptModel, bind, wrap
from ..peft.targets import set_module, target_of
from . import hf

CONFIG_NAME, WEIGHTS_NAME, BIN_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_PREFIX = "base_model.model."

# LoraConfig fields fusedlm reads or that do not change the adapted forward.
_LORA_FIELDS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
                "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
                "runtime_config", "ensure_weight_tying", "bias"}
_PROMPT_FIELDS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                  "inference_mode", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                  "num_layers", "modules_to_save", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                  "tokenizer_kwargs", "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
                  "encoder_dropout", "init_weights", "prefix_projection"}
_PEFT_TYPES = {"LORA": "lora", "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, PromptModel) else model


def _task_type(model: nn.Module) -> str | None:
    arch = _inner(model).config.arch
    return {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}.get(arch)


def module_map(model: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
    """Hugging Face module name -> [(fusedlm module path, slice index, number of slices)] for every
    block linear of `model` (one entry, or n for a stacked checkpoint matrix such as GPT-2's c_attn)."""
    inner = _inner(model)
    cfg = inner.config
    family = hf.family_of(cfg)
    strip = family.base_prefix if cfg.arch == "encoder" and cfg.head == "none" else ""  # BertModel has no "bert." prefix
    out: dict[str, list[tuple[str, int, int]]] = {}
    for ours, theirs, _, part in family.table(cfg):
        path = ours.removesuffix(".weight")
        if not ours.endswith(".weight") or target_of(path) is None:
            continue
        theirs = theirs.removesuffix(".weight").removeprefix(strip)
        out.setdefault(theirs, []).append((path, *(part or (0, 1))))
    return out


def _read_dir(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    path = _io.resolve(path)
    config = hf.read_json(os.path.join(path, CONFIG_NAME), note=" (not a peft adapter directory)")
    tensors = hf.read_tensors(path, WEIGHTS_NAME, BIN_NAME, note="")
    return config, tensors


# init_lora_weights values whose adapter runs on the base weights as they are; the others (pissa,
# olora, corda, loftq, lora_ga, astra, ...) change the base weights when the adapter is created, so
# their files are only right on the modified base peft saved with them (unless converted with
# peft's path_initial_model_for_weight_conversion, which writes init_lora_weights=True).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "nora")


def _check_fields(config: dict, known: set[str], path: str) -> None:
    """Errors naming the fields fusedlm cannot honour (and the file)."""
    bad = []
    if config.get("use_dora"):
        bad.append("use_dora=True (DoRA: a magnitude vector changes the forward)")
    if config.get("bias", "none") != "none":
        bad.append(f"bias={config['bias']!r} (only 'none')")
    init = config.get("init_lora_weights", True)
    if config.get("peft_type") == "LORA" and init not in _PLAIN_INITS:
        bad.append(f"init_lora_weights={init!r} (this initialisation changes the base weights: the adapter only fits the "
                   "modified base peft saved with it; convert it with peft's path_initial_model_for_weight_conversion)")
    if config.get("modules_to_save"):
        bad.append(f"modules_to_save={config['modules_to_save']} (full copies of base modules)")
    for key, value in config.items():
        if key not in known and key not in ("use_dora", "modules_to_save") and value not in (None, False, {}, [], "", 0):
            bad.append(f"{key}={value!r} (a field fusedlm does not know)")
    if bad:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: unsupported peft config field(s): {'; '.join(bad)}")


def _int_field(config: dict, key: str, path: str, default=None, low: int = 1) -> int:
    value = config.get(key, default)
    if value is None:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)} lacks the field {key!r}")
    try:
        return check.integer(key, value, low=low)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from None


def _pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first pattern key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def load_adapter(model: nn.Module, path: str, name: str = "default") -> nn.Module:
    """Reads the peft adapter directory `path` onto `model` (a fusedlm model loaded from the same
    Hugging Face checkpoint) and returns the model to use.

    One contract for every method: **use the model this returns**, and `model` itself never stays a
    plain base model that silently ignores the adapter. LoRA adds adapter `name` to `model` in place
    (as ``peft.apply_lora``) and returns `model`; prompt tuning, P-tuning and prefix tuning return a
    ``PromptModel`` around `model`, and `model` run on its own then raises (ValueError) instead of
    dropping the virtual tokens (``with fusedlm.peft.disable(prompt_model):`` runs the base).

    The whole folder is read and checked before `model` changes (nothing is half-applied). Errors
    name the file: a missing, empty, truncated or corrupted config or weights file, a tensor holding
    NaN / inf, a key of another architecture or shape, a config field fusedlm cannot honour
    (DoRA, an initialisation that changes the base weights such as PiSSA / OLoRA / LoftQ, a
    rank_pattern the shapes contradict, an unknown field that is set)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"name must be a non-empty string without dots, got {name!r}")
    config, tensors = _read_dir(path)
    peft_type = config.get("peft_type")
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: peft_type {peft_type!r} is not supported; supported: "
                         f"{', '.join(_PEFT_TYPES)}")
    try:
        if _PEFT_TYPES[peft_type] == "lora":
            _check_fields(config, _LORA_FIELDS, path)
            return _load_lora(model, config, tensors, name, path)
        _check_fields(config, _PROMPT_FIELDS, path)
        if isinstance(model, PromptModel):
            raise ValueError("this model already carries virtual tokens (a PromptModel): load prompt-learning files onto the base model")
        return bind(_load_prompt(model, config, tensors, _PEFT_TYPES[peft_type], path))
    except ValueError as e:
        raise ValueError(e.args[0] if path in str(e) else f"adapter {path}: {e}") from None


def _group_lora(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{Hugging Face module: {"A": lora_A, "B": lora_B}} from the file's keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise ValueError(f"adapter key {key!r} is not a LoRA weight (…<module>.lora_A.weight / lora_B.weight)")
        groups.setdefault(match.group(1), {})[match.group(2)] = value
    for module, pair in groups.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter module {module!r} has lora_{''.join(pair)} but not both lora_A and lora_B")
    return groups


def _layer(model: nn.Module, path: str, state) -> lora_mod.LoraLinear:
    module = model.get_submodule(path)
    if not isinstance(module, lora_mod.LoraLinear):
        module = lora_mod.LoraLinear(module, state)
        set_module(model, path, module)
    return module


def _load_lora(model: nn.Module, config: dict, tensors: dict, name: str, path: str) -> nn.Module:
    try:  # under the config's own names
        check.positive_int("r", config.get("r", 8))
        check.number("lora_alpha", config.get("lora_alpha", 8), low=0, low_open=True)
        check.probability("lora_dropout", config.get("lora_dropout", 0.0), high_open=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from None
    inner = _inner(model)
    mapping = module_map(inner)
    groups = _group_lora(tensors)
    rslora = bool(config.get("use_rslora", False))
    alpha0 = float(config.get("lora_alpha", 8))
    plan = []  # (fusedlm path, A, B, scaling)
    for module, pair in groups.items():
        key = f"{_PREFIX}{module}.lora_A.weight"
        if module not in mapping:
            raise ValueError(f"adapter key {key!r}: {module!r} is not a block linear of this fusedlm "
                             f"{inner.config.family} model (its modules look like {next(iter(mapping))!r})")
        a, b = pair["A"].float(), pair["B"].float()
        slices = sorted(mapping[module], key=lambda s: s[1])
        layers = [inner.get_submodule(p) for p, _, _ in slices]
        for (p, _, _), layer in zip(slices, layers):
            if not isinstance(layer, (lora_mod.LoraLinear, nn.Linear, NF4Linear)):
                raise ValueError(f"fusedlm's {p} is a {type(layer).__name__}: a LoRA adapter goes on a linear layer "
                                 "(load it onto the model before other PEFT methods)")
        k = layers[0].in_features
        outs = [m.out_features for m in layers]
        r = a.shape[0]
        if a.dim() != 2 or r == 0 or tuple(a.shape) != (r, k):
            raise ValueError(f"adapter key {key!r} has shape {list(a.shape)} but fusedlm's {slices[0][0]} takes K={k} inputs "
                             f"(expected [r, {k}])")
        if b.dim() != 2 or tuple(b.shape) != (sum(outs), r):
            raise ValueError(f"adapter key {key.replace('lora_A', 'lora_B')!r} has shape {list(b.shape)}, expected "
                             f"[{sum(outs)}, {r}] for fusedlm's {', '.join(p for p, _, _ in slices)}")
        want_r = _pattern_value(config.get("rank_pattern") or {}, module, r)
        if want_r != r:
            raise ValueError(f"adapter key {key!r} has rank {r} but the config's rank_pattern gives {want_r}")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha0))
        s_file = lora_mod.scaling_of(r, alpha, rslora)
        pieces = list(zip(slices, b.split(outs, dim=0)))
        live = [(s, bj) for s, bj in pieces if bool((bj != 0).any())]
        if len(slices) > 1 and live:  # drop zero slices and zero columns: exactly the same product
            for (path, _, _), bj in live:
                cols = (bj != 0).any(0)
                rj = int(cols.sum())
                sj = lora_mod.scaling_of(rj, alpha, rslora)
                plan.append((path, a[cols], bj[:, cols] * (s_file / sj), sj))
        else:
            plan += [(path, a, bj, s_file) for (path, _, _), bj in pieces]
    if not plan:
        raise ValueError("the adapter file holds no LoRA weights")
    state = lora_mod.lora_state(model) or lora_mod.LoraState()
    if name in state.adapters:
        raise ValueError(f"an adapter named {name!r} already exists on this model (adapters: {list(state.adapters)})")
    if not lora_mod.lora_layers(model):
        lora_mod.freeze_base(model)
    targets = tuple(sorted({target_of(p) for p, _, _, _ in plan}))
    state.adapters[name] = lora_mod.LoraConfig(name, int(config.get("r", 8)), alpha0, float(config.get("lora_dropout", 0.0)),
                                               rslora, targets)
    for path, a, b, s in plan:
        _layer(inner, path, state).set_weights(name, a, b, s, float(config.get("lora_dropout", 0.0)))
    if state.active is None:
        state.active = name
    routing.install(inner)  # adapter_ids of a mixed batch
    return model


def _load_prompt(model: nn.Module, config: dict, tensors: dict, method: str, path: str) -> PromptModel:
    if not isinstance(model, (DecoderLM, EncoderLM, Seq2SeqLM)):
        raise TypeError(f"model must be a fusedlm DecoderLM or Seq2SeqLM, got {type(model).__name__}")
    cfg = model.config
    if cfg.arch == "encoder":
        raise ValueError("peft prompt-learning files are read for decoder and encoder-decoder models only")
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"a {config['peft_type']} file holds one tensor 'prompt_embeddings', got keys {sorted(tensors)[:5]}")
    table = tensors["prompt_embeddings"].float()
    n = _int_field(config, "num_virtual_tokens", path)
    n_sub = 2 if isinstance(model, Seq2SeqLM) else 1
    if config.get("num_transformer_submodules", n_sub) != n_sub:
        raise ValueError(f"num_transformer_submodules={config['num_transformer_submodules']} does not fit this {type(model).__name__} "
                         f"(expected {n_sub})")
    if method == "prefix_tuning":
        token_dim = cfg.n_kv_heads * cfg.head_dim
        if config.get("num_layers", cfg.n_layers) != cfg.n_layers or config.get("token_dim", token_dim) != token_dim:
            raise ValueError(f"prefix file for num_layers={config.get('num_layers')}, token_dim={config.get('token_dim')}; this "
                             f"model has n_layers={cfg.n_layers}, n_kv_heads·head_dim={token_dim}")
        want = (n, cfg.n_layers * 2 * token_dim)
        encoder = PrefixEncoder(n, cfg.n_layers, token_dim)
    else:
        want = (n * n_sub, cfg.d_model)
        encoder = PromptEmbedding(*want)
    if tuple(table.shape) != want:
        raise ValueError(f"adapter key 'prompt_embeddings' has shape {list(table.shape)}, expected {list(want)} for this model")
    with torch.no_grad():
        encoder.embedding.weight.copy_(table)
    wrapped = wrap(model, encoder, method, n)
    wrapped.peft_fields = {k: config[k] for k in ("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
                                                  "encoder_dropout", "prefix_projection") if k in config}
    return wrapped


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str, name: str = "default", *, method: str | None = None) -> None:
    """Writes one adapter of `model` as a peft adapter directory that
    ``peft.PeftModel.from_pretrained(transformers_model, path)`` loads onto the transformers model of
    the same checkpoint: LoRA adapter `name`, or the virtual tokens of a PromptModel.

    A peft folder holds one method. A model that carries several (virtual tokens and LoRA, or a
    method peft files cannot hold: AdaPtLoRA, bottleneck adapters) is refused unless `method`
    ("lora", or the PromptModel's "prompt_tuning" / "p_tuning" / "prefix_tuning") says which one to
    write, so nothing is dropped without a word. The folder's files are replaced together (a crash
    mid-save leaves the previous adapter whole); weights holding NaN / inf are refused."""
    carried = peft_methods(model)
    writable = [m for m in carried if m == "lora" or m in _PEFT_TYPES.values()]
    if method is None:
        if len(carried) != 1 or not writable:
            raise ValueError(f"this model carries PEFT method(s) {carried}; a peft adapter folder holds one method of "
                             f"{['lora', *_PROMPT_METHODS]}: pass method= to write one of {writable or 'them'} "
                             "(the others need their own files)" if carried else
                             "this model carries no PEFT method (nothing to save): apply or load an adapter first")
        method = writable[0]
    elif method not in writable:
        raise ValueError(f"method must be one of the methods of this model a peft folder can hold, {writable}, got {method!r}")
    if method == "lora":
        config, tensors = _lora_files(model, name)
    else:
        config, tensors = _prompt_files(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"adapter tensor {key} holds NaN or inf values: not writing it to {path}")
    from safetensors.torch import save_file

    with _io.atomic_folder(path) as tmp:
        _io.write_json(os.path.join(tmp, CONFIG_NAME), config)
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})


def _lora_files(model: nn.Module, name: str) -> tuple[dict, dict]:
    state = lora_mod.lora_state(model)
    if state is None or name not in state.adapters:
        raise ValueError(f"no LoRA adapter named {name!r} on this model (adapters: {[] if state is None else list(state.adapters)})")
    adapter = state.adapters[name]
    inner = _inner(model)
    model_type = inner.config.family
    mapping = module_map(inner)
    tensors, ranks = {}, {}
    for module, slices in mapping.items():
        layers = [inner.get_submodule(p) for p, _, _ in sorted(slices, key=lambda s: s[1])]
        carrying = [m for m in layers if isinstance(m, lora_mod.LoraLinear) and name in m.lora_A]
        if not carrying:
            continue
        r = sum(m.r[name] for m in carrying)
        s_file = lora_mod.scaling_of(r, adapter.alpha, adapter.rslora)
        a = torch.cat([m.lora_A[name].weight.float() for m in carrying])  # [Σ r, K]
        b = torch.zeros(sum(m.out_features for m in layers), r)
        row = col = 0
        for m in layers:  # each B in its rows (and its columns of the stacked rank), scaled to s_file
            if m in carrying:
                b[row:row + m.out_features, col:col + m.r[name]] = m.lora_B[name].weight.float() * (m.scaling[name] / s_file)
                col += m.r[name]
            row += m.out_features
        dtype = carrying[0].lora_A[name].weight.dtype
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.to(dtype)
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.to(dtype)
        ranks[module] = r
    if not tensors:
        raise ValueError(f"adapter {name!r} is on no block linear of this model")
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    leaves = {m.rsplit(".", 1)[1] for m in ranks}
    by_leaf = {m for m in mapping if m.rsplit(".", 1)[1] in leaves}
    # peft selects target_modules by module-name suffix over the whole model: leaf names are exact
    # when they pick exactly these modules among the block linears and no other module shares them
    # (BERT's "dense" is also the pooler's), else the full names.
    exact_leaves = by_leaf == set(ranks) and model_type not in ("bert", "roberta")
    config = {
        "peft_type": "LORA", "task_type": _task_type(model), "base_model_name_or_path": None, "inference_mode": True,
        "r": r0, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout, "use_rslora": adapter.rslora,
        "target_modules": sorted(leaves) if exact_leaves else sorted(ranks), "fan_in_fan_out": model_type == "gpt2",
        "bias": "none", "init_lora_weights": True, "rank_pattern": {m: r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }
    return config, tensors


def _prompt_files(model: PromptModel) -> tuple[dict, dict]:
    cfg = model.config
    if cfg.arch == "encoder":
        raise ValueError("peft prompt-learning files are written for decoder and encoder-decoder models only")
    method = model.method
    prefix = method == "prefix_tuning"
    heads, token_dim = (cfg.n_kv_heads, cfg.n_kv_heads * cfg.head_dim) if prefix else (cfg.n_heads, cfg.d_model)
    config = {
        "peft_type": {v: k for k, v in _PEFT_TYPES.items()}[method], "task_type": _task_type(model),
        "base_model_name_or_path": None, "inference_mode": True, "num_virtual_tokens": model.n_virtual_tokens,
        "token_dim": token_dim, "num_transformer_submodules": model.n_submodules, "num_attention_heads": heads,
        "num_layers": cfg.n_layers,
    }
    enc = model.prompt_encoder
    fields = dict(getattr(model, "peft_fields", {}))
    if isinstance(enc, PromptEncoder):
        hidden = enc.mlp_head[0].out_features if enc.kind == "MLP" else enc.lstm_head.hidden_size
        fields.update(encoder_reparameterization_type=enc.kind, encoder_hidden_size=hidden,
                      encoder_num_layers=enc.lstm_head.num_layers if enc.kind == "LSTM" else 2,
                      encoder_dropout=enc.lstm_head.dropout if enc.kind == "LSTM" else 0.0)
    elif isinstance(enc, PrefixEncoder):
        fields.update(prefix_projection=enc.projection,
                      encoder_hidden_size=enc.transform[0].out_features if enc.projection else token_dim)
    elif method == "prompt_tuning":
        fields.update(prompt_tuning_init="RANDOM")
    if method == "p_tuning":
        fields.setdefault("encoder_reparameterization_type", "MLP")
        fields.setdefault("encoder_hidden_size", cfg.d_model)
    config.update(fields)
    with torch.no_grad():
        table = enc().float()
    return config, {"prompt_embeddings": table}
