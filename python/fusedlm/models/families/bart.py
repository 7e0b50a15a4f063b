"""BART: a post-norm encoder-decoder with learned positions from row 2, a norm after the
embeddings, GELU (or ReLU) MLPs with biases, a tied head plus a final logits bias."""
from __future__ import annotations

import math

from .record import TINY, Family, attn, check, one, untied_head, wb

_ARCH = dict(arch="encoder-decoder", norm="layernorm", norm_eps=1e-5, pre_norm=False, embed_norm=True, final_norm=False,
             qkv_bias=True, out_bias=True, mlp_bias=True, positions="learned", position_offset=2, final_logits_bias=True)
_BART = dict(_ARCH, vocab_size=50265, d_model=768, n_layers=6, n_heads=12, d_ff=3072, max_seq_len=1024, mlp="gelu",
             tie_embeddings=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def _from_hf(c: dict) -> dict:
    act = c.get("activation_function", "gelu")
    check(act in ("gelu", "relu"), f"bart activation {act!r} is not supported")
    check(not (c.get("normalize_before") or c.get("add_final_layer_norm")),
          "bart with normalize_before / add_final_layer_norm (mBART style) is not supported")
    check(c.get("encoder_attention_heads") == c.get("decoder_attention_heads") and c.get("encoder_ffn_dim") == c.get("decoder_ffn_dim"),
          "bart with different encoder and decoder widths is not supported")
    return dict(_ARCH, vocab_size=c["vocab_size"], d_model=c["d_model"], n_layers=c["encoder_layers"],
                n_decoder_layers=c["decoder_layers"], n_heads=c["encoder_attention_heads"], d_ff=c["encoder_ffn_dim"],
                max_seq_len=c["max_position_embeddings"], mlp=act, tie_embeddings=c.get("tie_word_embeddings", True),
                embed_scale=math.sqrt(c["d_model"]) if c.get("scale_embedding") else 1.0,
                decoder_start_token_id=c.get("decoder_start_token_id", 2))


def _to_hf(cfg) -> dict:
    return dict(architectures=["BartForConditionalGeneration"], vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                encoder_layers=cfg.n_layers, decoder_layers=cfg.n_decoder_layers, encoder_attention_heads=cfg.n_heads,
                decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
                max_position_embeddings=cfg.max_seq_len, activation_function=cfg.mlp, scale_embedding=cfg.embed_scale != 1.0,
                is_encoder_decoder=True, decoder_start_token_id=cfg.decoder_start_token_id, forced_eos_token_id=None)


def _table(cfg) -> list[tuple]:
    rows = one("tok_embed.weight", "model.shared.weight") + one("final_logits_bias", "final_logits_bias", "flat")
    for side, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        m = f"model.{side}"
        rows += one(f"{side}.pos_embed.weight", f"{m}.embed_positions.weight") + wb(f"{side}.embed_norm", f"{m}.layernorm_embedding")
        for i in range(n_layers):
            o, t = f"{side}.blocks.{i}", f"{m}.layers.{i}"
            a = f"{t}.self_attn"
            rows += attn(f"{o}.attn", f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.out_proj")
            rows += wb(f"{o}.attn_norm", f"{t}.self_attn_layer_norm")
            if side == "decoder":
                c = f"{t}.encoder_attn"
                rows += attn(f"{o}.cross_attn", f"{c}.q_proj", f"{c}.k_proj", f"{c}.v_proj", f"{c}.out_proj")
                rows += wb(f"{o}.cross_norm", f"{t}.encoder_attn_layer_norm")
            rows += wb(f"{o}.mlp.up_proj", f"{t}.fc1") + wb(f"{o}.mlp.down_proj", f"{t}.fc2") + wb(f"{o}.mlp_norm", f"{t}.final_layer_norm")
    return rows + untied_head(cfg)


BART = Family(name="bart", arch="encoder-decoder", presets={"bart-base": _BART, "bart-tiny": dict(_BART, **TINY)},
              from_hf=_from_hf, to_hf=_to_hf, table=_table,
              dropout_keys=(("dropout", 0.1), ("attention_dropout", 0.0), ("activation_dropout", 0.0)), base_prefix="model.")
