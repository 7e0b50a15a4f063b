"""LLaMA and Qwen2: RMSNorm, SwiGLU, RoPE, GQA. Qwen2 adds biases to q, k and v (and none
elsewhere), which is all that tells their checkpoints apart."""
from __future__ import annotations

from .record import TINY, Family, attn, check, one, untied_head, wb

_ARCH = dict(arch="decoder", norm="rmsnorm", mlp="swiglu", positions="rope", pad_aware_positions=True)
_LLAMA = dict(_ARCH, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=2048, norm_eps=1e-6,
              rope_base=10000.0, pad_token_id=None, bos_token_id=1, eos_token_id=2)
_QWEN2 = dict(_ARCH, vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864, max_seq_len=32768,
              norm_eps=1e-6, qkv_bias=True, rope_base=1e6, tie_embeddings=True, pad_token_id=None, bos_token_id=151643,
              eos_token_id=151643)


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    check(params.get("rope_type", "default") == "default",
          f"rope scaling {params.get('rope_type')!r} is not supported (only the default RoPE)")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def _from_hf(model_type: str):
    qwen = model_type == "qwen2"

    def from_hf(c: dict) -> dict:
        check(c.get("hidden_act", "silu") == "silu", f"{model_type} activation {c.get('hidden_act')!r} is not supported (only silu)")
        check(not (qwen and c.get("use_sliding_window")), "qwen2 with use_sliding_window=True is not supported")
        return dict(_ARCH, vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                    n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                    head_dim=c.get("head_dim"), d_ff=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
                    norm_eps=c.get("rms_norm_eps", 1e-6), rope_base=_rope_theta(c), qkv_bias=qwen or c.get("attention_bias", False),
                    out_bias=(not qwen) and c.get("attention_bias", False), mlp_bias=c.get("mlp_bias", False),
                    tie_embeddings=c.get("tie_word_embeddings", qwen))
    return from_hf


def _to_hf(model_type: str):
    def to_hf(cfg) -> dict:
        out = dict(architectures=["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"], vocab_size=cfg.vocab_size,
                   hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                   num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
                   max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
                   rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_base), hidden_act="silu")
        if model_type == "llama":
            out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        return out
    return to_hf


def _table(cfg) -> list[tuple]:
    rows = one("tok_embed.weight", "model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        o, t = f"decoder.blocks.{i}", f"model.layers.{i}"
        a = f"{t}.self_attn"
        rows += wb(f"{o}.attn_norm", f"{t}.input_layernorm", bias=False)
        rows += attn(f"{o}.attn", f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.o_proj", cfg.qkv_bias, cfg.out_bias)
        rows += wb(f"{o}.mlp_norm", f"{t}.post_attention_layernorm", bias=False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            rows += wb(f"{o}.mlp.{name}", f"{t}.mlp.{name}", bias=cfg.mlp_bias)
    return rows + wb("decoder.final_norm", "model.norm", bias=False) + untied_head(cfg)


LLAMA, QWEN2 = (
    Family(name=name, arch="decoder", presets=presets, from_hf=_from_hf(name), to_hf=_to_hf(name), table=_table,
           dropout_keys=(None, ("attention_dropout", 0.0), None), base_prefix="model.")
    for name, presets in (
        ("llama", {"llama-7b": _LLAMA, "llama-tiny": dict(_LLAMA, **TINY, n_kv_heads=2)}),
        ("qwen2", {"qwen2-0.5b": _QWEN2,
                   "qwen2-tiny": dict(_QWEN2, **{**TINY, "n_heads": 4}, n_kv_heads=1, bos_token_id=127, eos_token_id=127)}),
    )
)
