"""Parameter counts: what a model trains (peft's report), and LoRA's count from a config alone.

    peft.trainable_parameters(model)      # (trainable, total)
    peft.report(model)                    # "trainable params: 4,194,304 || all params: ... || trainable%: 0.0622"
    peft.count_lora_parameters(get_config("llama-7b"), r=8, targets="all")   # 19_988_480
"""
from __future__ import annotations

from torch import nn

from .. import _validate as check
from ..models.config import ModelConfig
from ..nn import NF4Linear
from .targets import TARGETS, normalize_targets


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `model`, as peft's ``get_nb_trainable_parameters``.

    A 4-bit NF4Linear weight (a buffer, frozen) counts as its out x in elements, the way peft counts
    bitsandbytes' Params4bit, so a QLoRA model reports the same total as its dense original."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            total += m.in_features * m.out_features
    return trainable, total


def report(model: nn.Module) -> str:
    """peft's ``print_trainable_parameters`` line for `model`."""
    trainable, total = trainable_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def _shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target of one block."""
    d, q_dim, kv_dim = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"q": (d, q_dim), "k": (d, kv_dim), "v": (d, kv_dim), "o": (q_dim, d), "up": (d, c.d_ff), "down": (c.d_ff, d)}
    if c.mlp == "swiglu":
        shapes["gate"] = (d, c.d_ff)
    return shapes


def count_lora_parameters(config: ModelConfig, *, r: int, targets="all") -> int:
    """LoRA parameters r · (in + out) summed over the adapted linears of the model `config` describes,
    without building it. Seq2seq decoders adapt their cross-attention too (peft's target_modules
    match it by name). LLaMA-7B, r = 8, all seven targets: 19,988,480."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a fusedlm ModelConfig, got {type(config).__name__}")
    r = check.positive_int("r", r)
    names = normalize_targets(targets)
    shapes = _shapes(config)
    if not (isinstance(targets, str) and targets == "all"):
        missing = [t for t in names if t not in shapes]
        if missing:
            raise ValueError(f"target(s) {missing} match no linear layer of this config (mlp={config.mlp!r} has {sorted(shapes)})")
    per_attn = sum(r * sum(shapes[t]) for t in names if t in ("q", "k", "v", "o"))
    per_mlp = sum(r * sum(shapes[t]) for t in names if t in shapes and TARGETS[t] in ("gate_proj", "up_proj", "down_proj"))
    if config.arch == "encoder-decoder":
        return config.n_layers * (per_attn + per_mlp) + config.n_decoder_layers * (2 * per_attn + per_mlp)
    return config.n_layers * (per_attn + per_mlp)
