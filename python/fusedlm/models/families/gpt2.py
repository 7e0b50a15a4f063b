"""GPT-2 (and GPT-3's shape): LayerNorm, tanh-GELU MLP, learned positions, biases everywhere, a
tied head. Its checkpoints stack q, k, v in one Conv1D ``c_attn`` and store Conv1D weights
transposed: the table splits and transposes them."""
from __future__ import annotations

from .record import TINY, Family, check, one, wb

_ARCH = dict(arch="decoder", norm="layernorm", qkv_bias=True, out_bias=True, mlp_bias=True, positions="learned",
             pad_aware_positions=True)
_BASE = dict(_ARCH, vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024, norm_eps=1e-5,
             mlp="gelu_tanh", tie_embeddings=True, pad_token_id=None, bos_token_id=50256, eos_token_id=50256)


def _from_hf(c: dict) -> dict:
    act = c.get("activation_function", "gelu_new")
    check(act in ("gelu_new", "gelu_pytorch_tanh", "gelu"), f"gpt2 activation {act!r} is not supported")
    return dict(_ARCH, vocab_size=c["vocab_size"], d_model=c["n_embd"], n_layers=c["n_layer"], n_heads=c["n_head"],
                d_ff=c.get("n_inner") or 4 * c["n_embd"], max_seq_len=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                mlp="gelu" if act == "gelu" else "gelu_tanh", tie_embeddings=c.get("tie_word_embeddings", True))


def _to_hf(cfg) -> dict:
    return dict(architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu")


def _table(cfg) -> list[tuple]:
    rows = one("tok_embed.weight", "transformer.wte.weight") + one("decoder.pos_embed.weight", "transformer.wpe.weight")
    for i in range(cfg.n_layers):
        o, t = f"decoder.blocks.{i}", f"transformer.h.{i}"
        rows += wb(f"{o}.attn_norm", f"{t}.ln_1")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows += wb(f"{o}.attn.{name}", f"{t}.attn.c_attn", "T", part=(j, 3))
        rows += wb(f"{o}.attn.o_proj", f"{t}.attn.c_proj", "T") + wb(f"{o}.mlp_norm", f"{t}.ln_2")
        rows += wb(f"{o}.mlp.up_proj", f"{t}.mlp.c_fc", "T") + wb(f"{o}.mlp.down_proj", f"{t}.mlp.c_proj", "T")
    return rows + wb("decoder.final_norm", "transformer.ln_f")


GPT2 = Family(
    name="gpt2", arch="decoder",
    presets={"gpt2": _BASE,
             "gpt2-tiny": dict(_BASE, **TINY, bos_token_id=127, eos_token_id=127),
             "gpt3-175b": dict(_BASE, d_model=12288, n_layers=96, n_heads=96, d_ff=4 * 12288, max_seq_len=2048)},
    from_hf=_from_hf, to_hf=_to_hf, table=_table,
    dropout_keys=(("resid_pdrop", 0.1), ("attn_pdrop", 0.1), None), base_prefix="transformer.")
