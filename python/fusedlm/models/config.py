"""ModelConfig: one dataclass describing every architecture the model layer builds, and presets.

    from fusedlm.models import ModelConfig, get_config
    cfg = get_config("llama-7b")                  # a preset (a fresh copy)
    cfg = get_config("gpt2-tiny", n_layers=4)     # a preset with fields overridden

The presets and the Hugging Face mapping of each family live in its record (``models.families``);
``family`` names it. Fields only one architecture reads are rejected on the others (see
ARCH_FIELDS): a config says nothing that the model it builds ignores.
"""
from __future__ import annotations

import dataclasses

from .. import _validate as check
from .families import FAMILIES

ARCHS = ("decoder", "encoder", "encoder-decoder")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "relu", "swiglu")
POSITIONS = ("learned", "sinusoidal", "rope", "t5", "none")
ATTN_MODES = ("causal", "prefix")
HEADS = ("lm", "classifier", "none")
# Fields that only some architectures read, and those architectures; elsewhere they must stay unset
# (None, or False for a flag).
ARCH_FIELDS = {
    "attn_mode": ("decoder",),
    "head": ("encoder",), "pooler": ("encoder",), "n_labels": ("encoder",),
    "n_decoder_layers": ("encoder-decoder",), "decoder_start_token_id": ("encoder-decoder",),
    "final_logits_bias": ("encoder-decoder",), "rescale_tied_head": ("encoder-decoder",),
}


@dataclasses.dataclass
class ModelConfig:
    arch: str = "decoder"  # decoder | encoder | encoder-decoder
    family: str | None = None  # the record in models.families this config follows (presets, HF files); None: none
    # sizes
    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32  # the encoder's layers for encoder-decoder models
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads (MHA); fewer: GQA; 1: MQA
    head_dim: int | None = None  # None: d_model // n_heads (T5 sets it apart)
    d_ff: int = 11008
    max_seq_len: int = 2048
    n_decoder_layers: int | None = None  # encoder-decoder only; None: n_layers
    # norms
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-6
    pre_norm: bool = True  # False: post-norm (BERT, BART)
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    final_norm: bool = True  # a norm after the last block (GPT-2, LLaMA, T5)
    # blocks
    mlp: str = "swiglu"  # gelu (exact) | gelu_tanh (GPT-2's gelu_new) | relu | swiglu
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    attn_mode: str | None = None  # decoder only: causal | prefix (prefix_len then required); None: causal
    # dropout (training only: model.train())
    dropout: float = 0.0  # embeddings and each sublayer's output before the residual add
    attn_dropout: float = 0.0  # attention probabilities (ops.attention dropout_p)
    mlp_dropout: float = 0.0  # after the MLP activation (BART activation_dropout, T5 dropout_rate)
    # positions
    positions: str = "rope"  # learned | sinusoidal | rope | t5 (relative bias) | none
    rope_base: float = 10000.0
    position_offset: int = 0  # learned tables start at this row (RoBERTa, BART: 2)
    pad_aware_positions: bool = False  # positions count real tokens only (left padding; RoBERTa)
    rel_buckets: int = 32  # T5 relative position buckets
    rel_max_distance: int = 128
    type_vocab_size: int = 0  # BERT token types (segment embeddings)
    # embeddings and heads
    tie_embeddings: bool = False  # the output head shares the token embedding matrix
    rescale_tied_head: bool = False  # encoder-decoder (T5): hidden * d_model**-0.5 before the tied head
    embed_scale: float = 1.0  # token embeddings multiplied by this (BART scale_embedding: sqrt(d))
    head: str | None = None  # encoder only: lm (MLM) | classifier | none; None: lm
    n_labels: int | None = None  # encoder classifier only: its outputs; None: 2
    pooler: bool | None = None  # encoder only: dense + tanh on the first token (BERT pooler, classifiers); None: False
    final_logits_bias: bool = False  # encoder-decoder (BART): a (buffer) bias added to the logits
    # special tokens
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None  # encoder-decoder only

    def __post_init__(self):
        self._check_arch_fields()
        if self.family is not None and (self.family not in FAMILIES or FAMILIES[self.family].arch != self.arch):
            known = [name for name, f in FAMILIES.items() if f.arch == self.arch]
            raise ValueError(f"ModelConfig.family must be None or a family of arch={self.arch!r} ({', '.join(known)}), "
                             f"got {self.family!r}")
        if self.arch == "decoder" and self.attn_mode is None:
            self.attn_mode = "causal"
        if self.arch == "encoder":
            self.head = "lm" if self.head is None else self.head
            self.pooler = False if self.pooler is None else self.pooler
            if self.head == "classifier" and self.n_labels is None:
                self.n_labels = 2
        if self.arch == "encoder-decoder" and self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS), ("attn_mode", ATTN_MODES), ("head", HEADS)):
            if getattr(self, name) is not None:
                check.choice(f"ModelConfig.{name}", getattr(self, name), allowed)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}) unless head_dim is set")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("dropout", "attn_dropout", "mlp_dropout"):
            check.probability(f"ModelConfig.{name}", getattr(self, name), high_open=True)
        if self.head == "classifier" and not self.pooler:
            raise ValueError("head='classifier' needs pooler=True (the head reads the pooled first token)")
        if self.n_labels is not None and self.head != "classifier":
            raise ValueError(f"ModelConfig.n_labels is the classifier head's: set head='classifier' or leave n_labels unset, "
                             f"got n_labels={self.n_labels} with head={self.head!r}")

    def _check_arch_fields(self) -> None:
        check.choice("ModelConfig.arch", self.arch, ARCHS)
        for name, archs in ARCH_FIELDS.items():
            value = getattr(self, name)
            if self.arch not in archs and value is not None and value is not False:
                raise ValueError(f"ModelConfig.{name} is read by {' / '.join(archs)} models only; this config has "
                                 f"arch={self.arch!r}: leave {name} unset, got {name}={value!r}")


PRESETS: dict[str, dict] = {name: dict(fields, family=family.name)
                            for family in FAMILIES.values() for name, fields in family.presets.items()}


def get_config(name: str, **overrides) -> ModelConfig:
    """A fresh ModelConfig for the preset `name`, with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
