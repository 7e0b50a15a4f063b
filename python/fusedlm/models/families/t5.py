"""T5: a pre-norm encoder-decoder with RMSNorm, a ReLU MLP without biases, unscaled attention, a
relative position bias per stack, and a tied head read through d_model ** -0.5."""
from __future__ import annotations

from .record import TINY, Family, attn, check, one, untied_head, wb

_ARCH = dict(arch="encoder-decoder", norm="rmsnorm", mlp="relu", attn_scale=1.0, positions="t5")
_T5 = dict(_ARCH, vocab_size=32128, d_model=512, n_layers=6, n_heads=8, head_dim=64, d_ff=2048, max_seq_len=512, norm_eps=1e-6,
           tie_embeddings=True, rescale_tied_head=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _from_hf(c: dict) -> dict:
    check(c.get("feed_forward_proj", "relu") == "relu", f"t5 feed_forward_proj {c.get('feed_forward_proj')!r} is not supported (only relu)")
    tied = c.get("tie_word_embeddings", True)
    return dict(_ARCH, vocab_size=c["vocab_size"], d_model=c["d_model"], n_layers=c["num_layers"],
                n_decoder_layers=c.get("num_decoder_layers") or c["num_layers"], n_heads=c["num_heads"], head_dim=c["d_kv"],
                d_ff=c["d_ff"], max_seq_len=c.get("n_positions", 512), norm_eps=c.get("layer_norm_epsilon", 1e-6),
                rel_buckets=c.get("relative_attention_num_buckets", 32), rel_max_distance=c.get("relative_attention_max_distance", 128),
                tie_embeddings=tied, rescale_tied_head=tied, decoder_start_token_id=c.get("decoder_start_token_id", 0))


def _to_hf(cfg) -> dict:
    return dict(architectures=["T5ForConditionalGeneration"], vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim,
                d_ff=cfg.d_ff, num_layers=cfg.n_layers, num_decoder_layers=cfg.n_decoder_layers, num_heads=cfg.n_heads,
                relative_attention_num_buckets=cfg.rel_buckets, relative_attention_max_distance=cfg.rel_max_distance,
                layer_norm_epsilon=cfg.norm_eps, feed_forward_proj="relu", n_positions=cfg.max_seq_len, is_encoder_decoder=True,
                decoder_start_token_id=cfg.decoder_start_token_id)


def _table(cfg) -> list[tuple]:
    rows = one("tok_embed.weight", "shared.weight")
    for side, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        rows += one(f"{side}.rel_bias.weight", f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        for i in range(n_layers):
            o, t = f"{side}.blocks.{i}", f"{side}.block.{i}.layer"
            a = f"{t}.0.SelfAttention"
            rows += wb(f"{o}.attn_norm", f"{t}.0.layer_norm", bias=False)
            rows += attn(f"{o}.attn", f"{a}.q", f"{a}.k", f"{a}.v", f"{a}.o", bias=False)
            ff = 1
            if side == "decoder":
                c = f"{t}.1.EncDecAttention"
                rows += wb(f"{o}.cross_norm", f"{t}.1.layer_norm", bias=False)
                rows += attn(f"{o}.cross_attn", f"{c}.q", f"{c}.k", f"{c}.v", f"{c}.o", bias=False)
                ff = 2
            rows += wb(f"{o}.mlp_norm", f"{t}.{ff}.layer_norm", bias=False)
            rows += wb(f"{o}.mlp.up_proj", f"{t}.{ff}.DenseReluDense.wi", bias=False)
            rows += wb(f"{o}.mlp.down_proj", f"{t}.{ff}.DenseReluDense.wo", bias=False)
        rows += wb(f"{side}.final_norm", f"{side}.final_layer_norm", bias=False)
    return rows + untied_head(cfg)


T5 = Family(name="t5", arch="encoder-decoder",
            presets={"t5-small": _T5, "t5-tiny": dict(_T5, **TINY, head_dim=16, rel_buckets=8, rel_max_distance=20)},
            from_hf=_from_hf, to_hf=_to_hf, table=_table,
            dropout_keys=(("dropout_rate", 0.1), ("dropout_rate", 0.1), ("dropout_rate", 0.1)))
