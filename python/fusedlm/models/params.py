"""Analytic parameter counts, from the formulas, without building (or allocating) a model.

    count_parameters(get_config("llama-7b"))["total"]   # 6_738_415_616

Per block: attention d*(H + 2*Hkv)*D + H*D*d (4*d^2 for MHA, less with GQA) plus biases; MLP
2*d*d_ff (3*d*d_ff for SwiGLU) plus biases; norms 2*d (LayerNorm) or d (RMSNorm) each.
Embeddings V*d (+ position and token-type tables, T5's relative bias); the head adds V*d only when
untied. Equal to ``sum(p.numel() for p in model.parameters())`` of the built model (tested).
"""
from __future__ import annotations

from .config import ModelConfig


def _norm(c: ModelConfig) -> int:
    return 2 * c.d_model if c.norm == "layernorm" else c.d_model


def _attention(c: ModelConfig) -> int:
    d, q_dim, kv_dim = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    proj = d * (q_dim + 2 * kv_dim) + (q_dim + 2 * kv_dim) * c.qkv_bias
    return proj + q_dim * d + d * c.out_bias


def _mlp(c: ModelConfig) -> int:
    n_in = 2 * c.d_ff if c.mlp == "swiglu" else c.d_ff
    return c.d_model * n_in + c.d_ff * c.d_model + (n_in + c.d_model) * c.mlp_bias


def _stack(c: ModelConfig, n_layers: int, cross: bool, counts: dict) -> None:
    """Adds one stack of blocks (and its position tables and norms) to `counts`."""
    d = c.d_model
    if c.positions == "learned":
        counts["embeddings"] += (c.max_seq_len + c.position_offset) * d
    elif c.positions == "t5":
        counts["embeddings"] += c.rel_buckets * c.n_heads
    counts["embeddings"] += c.type_vocab_size * d
    counts["attention"] += n_layers * _attention(c) * (2 if cross else 1)
    counts["mlp"] += n_layers * _mlp(c)
    counts["norms"] += _norm(c) * (n_layers * (3 if cross else 2) + c.embed_norm + c.final_norm)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """{"embeddings", "attention", "mlp", "norms", "head", "total"}: the parameters of the model
    `config` describes (DecoderLM, EncoderLM or Seq2SeqLM)."""
    c, d = config, config.d_model
    counts = dict(embeddings=c.vocab_size * d, attention=0, mlp=0, norms=0, head=0)
    if c.arch == "encoder-decoder":
        _stack(c, c.n_layers, cross=False, counts=counts)
        _stack(c, c.n_decoder_layers, cross=True, counts=counts)
    else:
        _stack(c, c.n_layers, cross=False, counts=counts)
    untied = 0 if c.tie_embeddings else c.vocab_size * d
    if c.arch != "encoder":
        counts["head"] += untied
    else:
        if c.head == "lm":  # BERT's MLM head: dense + LayerNorm + (tied) decoder + output bias
            counts["head"] += d * d + d + 2 * d + c.vocab_size + untied
        if c.pooler:
            counts["head"] += d * d + d
        if c.head == "classifier":
            counts["head"] += d * c.n_labels + c.n_labels
    counts["total"] = sum(counts.values())
    return counts
