"""ModelConfig: one dataclass describing every architecture the model layer builds, and presets.

    from fusedlm.models import ModelConfig, get_config
    cfg = get_config("llama-7b")                  # a preset (a fresh copy)
    cfg = get_config("gpt2-tiny", n_layers=4)     # a preset with fields overridden
"""
from __future__ import annotations

import dataclasses

ARCHS = ("decoder", "encoder", "encoder-decoder")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "relu", "swiglu")
POSITIONS = ("learned", "sinusoidal", "rope", "t5", "none")
MASKS = ("causal", "prefix", "bidirectional")
HEADS = ("lm", "classifier", "none")


@dataclasses.dataclass
class ModelConfig:
    arch: str = "decoder"  # decoder | encoder | encoder-decoder
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
    rescale_tied_head: bool = False  # T5: hidden * d_model**-0.5 before the tied head
    embed_scale: float = 1.0  # token embeddings multiplied by this (BART scale_embedding: sqrt(d))
    head: str = "lm"  # lm (causal or MLM) | classifier | none
    n_labels: int = 2  # classifier head outputs
    pooler: bool = False  # dense + tanh on the first token (BERT pooler, classification heads)
    final_logits_bias: bool = False  # BART: a (buffer) bias added to the logits
    mask: str = "causal"  # default self-attention mask of a DecoderLM: causal | prefix
    # special tokens
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None

    def __post_init__(self):
        for name, allowed in (("arch", ARCHS), ("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS), ("mask", MASKS), ("head", HEADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}) unless head_dim is set")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("dropout", "attn_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.head == "classifier" and not self.pooler:
            raise ValueError("head='classifier' needs pooler=True (the head reads the pooled first token)")


_GPT2 = dict(arch="decoder", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024,
             norm="layernorm", norm_eps=1e-5, mlp="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True,
             positions="learned", pad_aware_positions=True, tie_embeddings=True, pad_token_id=None, bos_token_id=50256, eos_token_id=50256)
_LLAMA = dict(arch="decoder", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=2048,
              norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", positions="rope", rope_base=10000.0, pad_aware_positions=True, pad_token_id=None,
              bos_token_id=1, eos_token_id=2)
_QWEN2 = dict(arch="decoder", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864,
              max_seq_len=32768, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", qkv_bias=True, positions="rope",
              rope_base=1e6, pad_aware_positions=True, tie_embeddings=True, pad_token_id=None, bos_token_id=151643, eos_token_id=151643)
_BERT = dict(arch="encoder", vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=512,
             norm="layernorm", norm_eps=1e-12, pre_norm=False, embed_norm=True, final_norm=False, mlp="gelu",
             qkv_bias=True, out_bias=True, mlp_bias=True, positions="learned", type_vocab_size=2,
             tie_embeddings=True, mask="bidirectional", pad_token_id=0)
_ROBERTA = dict(_BERT, vocab_size=50265, max_seq_len=512, position_offset=2, pad_aware_positions=True, type_vocab_size=1, norm_eps=1e-5,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)
_T5 = dict(arch="encoder-decoder", vocab_size=32128, d_model=512, n_layers=6, n_heads=8, head_dim=64, d_ff=2048,
           max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, mlp="relu", attn_scale=1.0, positions="t5",
           tie_embeddings=True, rescale_tied_head=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_BART = dict(arch="encoder-decoder", vocab_size=50265, d_model=768, n_layers=6, n_heads=12, d_ff=3072,
             max_seq_len=1024, norm="layernorm", norm_eps=1e-5, pre_norm=False, embed_norm=True, final_norm=False,
             mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, positions="learned", position_offset=2,
             tie_embeddings=True, final_logits_bias=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
             decoder_start_token_id=2)
_TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=128, max_seq_len=64)

PRESETS: dict[str, dict] = {
    "gpt2": _GPT2,
    "gpt2-tiny": dict(_GPT2, **_TINY, bos_token_id=127, eos_token_id=127),
    "gpt3-175b": dict(_GPT2, d_model=12288, n_layers=96, n_heads=96, d_ff=4 * 12288, max_seq_len=2048),
    "llama-7b": _LLAMA,
    "llama-tiny": dict(_LLAMA, **_TINY, n_kv_heads=2),
    "qwen2-0.5b": _QWEN2,
    "qwen2-tiny": dict(_QWEN2, **{**_TINY, "n_heads": 4}, n_kv_heads=1, bos_token_id=127, eos_token_id=127),
    "bert-base": _BERT,
    "bert-tiny": dict(_BERT, **_TINY),
    "roberta-base": _ROBERTA,
    "roberta-tiny": dict(_ROBERTA, **_TINY),
    "t5-small": _T5,
    "t5-tiny": dict(_T5, **_TINY, head_dim=16, rel_buckets=8, rel_max_distance=20),
    "bart-base": _BART,
    "bart-tiny": dict(_BART, **_TINY),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A fresh ModelConfig for the preset `name`, with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
