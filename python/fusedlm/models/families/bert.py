"""BERT and RoBERTa: post-norm encoders with learned positions and token types, an MLM head, a
sequence classifier, or the bare model with its pooler. RoBERTa's positions start after the
padding id (position_offset) and count real tokens only."""
from __future__ import annotations

from .record import TINY, Family, attn, check, one, wb

_ARCH = dict(arch="encoder", norm="layernorm", pre_norm=False, embed_norm=True, final_norm=False, mlp="gelu", qkv_bias=True,
             out_bias=True, mlp_bias=True, positions="learned")
_BERT = dict(_ARCH, vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=512, norm_eps=1e-12,
             type_vocab_size=2, tie_embeddings=True, pad_token_id=0)
_ROBERTA = dict(_BERT, vocab_size=50265, max_seq_len=512, position_offset=2, pad_aware_positions=True, type_vocab_size=1,
                norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
_HEADS = {"lm": "ForMaskedLM", "classifier": "ForSequenceClassification", "none": "Model"}


def _head(arch: str, c: dict) -> dict:
    if arch.endswith("ForMaskedLM"):
        return dict(head="lm", pooler=False)
    if arch.endswith("ForSequenceClassification"):
        n_labels = len(c["id2label"]) if c.get("id2label") else c.get("num_labels", 2)
        return dict(head="classifier", pooler=True, n_labels=n_labels)
    if arch.endswith("Model"):
        return dict(head="none", pooler=True)
    raise ValueError(f"unsupported architecture {arch!r}; supported: *ForMaskedLM, *ForSequenceClassification, *Model")


def _from_hf(model_type: str):
    def from_hf(c: dict) -> dict:
        check(c.get("position_embedding_type", "absolute") == "absolute",
              f"{model_type} position_embedding_type {c.get('position_embedding_type')!r} is not supported")
        check(c.get("hidden_act", "gelu") == "gelu", f"{model_type} activation {c.get('hidden_act')!r} is not supported (only gelu)")
        offset = (c.get("pad_token_id", 1) + 1) if model_type == "roberta" else 0
        return dict(_ARCH, vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                    n_heads=c["num_attention_heads"], d_ff=c["intermediate_size"],
                    max_seq_len=c["max_position_embeddings"] - offset, position_offset=offset, pad_aware_positions=offset > 0,
                    type_vocab_size=c.get("type_vocab_size", 2), norm_eps=c.get("layer_norm_eps", 1e-12),
                    tie_embeddings=c.get("tie_word_embeddings", True), **_head((c.get("architectures") or [""])[0], c))
    return from_hf


def _to_hf(model_type: str):
    def to_hf(cfg) -> dict:
        out = dict(architectures=[("Bert" if model_type == "bert" else "Roberta") + _HEADS[cfg.head]], vocab_size=cfg.vocab_size,
                   hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                   intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len + cfg.position_offset,
                   type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps, hidden_act="gelu",
                   position_embedding_type="absolute")
        if cfg.head == "classifier":
            out.update(id2label={str(i): f"LABEL_{i}" for i in range(cfg.n_labels)},
                       label2id={f"LABEL_{i}": i for i in range(cfg.n_labels)})
        return out
    return to_hf


def _table(model_type: str):
    p = f"{model_type}."

    def table(cfg) -> list[tuple]:
        rows = (one("tok_embed.weight", p + "embeddings.word_embeddings.weight")
                + one("encoder.pos_embed.weight", p + "embeddings.position_embeddings.weight")
                + one("encoder.type_embed.weight", p + "embeddings.token_type_embeddings.weight")
                + wb("encoder.embed_norm", p + "embeddings.LayerNorm"))
        for i in range(cfg.n_layers):
            o, t = f"encoder.blocks.{i}", f"{p}encoder.layer.{i}"
            s = f"{t}.attention.self"
            rows += attn(f"{o}.attn", f"{s}.query", f"{s}.key", f"{s}.value", f"{t}.attention.output.dense")
            rows += wb(f"{o}.attn_norm", f"{t}.attention.output.LayerNorm")
            rows += wb(f"{o}.mlp.up_proj", f"{t}.intermediate.dense") + wb(f"{o}.mlp.down_proj", f"{t}.output.dense")
            rows += wb(f"{o}.mlp_norm", f"{t}.output.LayerNorm")
        if cfg.head == "lm":
            h = "cls.predictions." if model_type == "bert" else "lm_head."
            rows += wb("mlm_dense", h + ("transform.dense" if model_type == "bert" else "dense"))
            rows += wb("mlm_norm", h + ("transform.LayerNorm" if model_type == "bert" else "layer_norm"))
            rows += one("mlm_bias", h + "bias")
            if not cfg.tie_embeddings:
                rows += one("mlm_decoder.weight", h + "decoder.weight")
        if model_type == "bert" or cfg.head == "none":
            rows += wb("pooler", p + "pooler.dense") if cfg.pooler else []
            rows += wb("classifier", "classifier") if cfg.head == "classifier" else []
        elif cfg.head == "classifier":  # RobertaClassificationHead: dense + tanh on <s>, then out_proj
            rows += wb("pooler", "classifier.dense") + wb("classifier", "classifier.out_proj")
        return rows
    return table


BERT, ROBERTA = (
    Family(name=name, arch="encoder", presets=presets, from_hf=_from_hf(name), to_hf=_to_hf(name), table=_table(name),
           dropout_keys=(("hidden_dropout_prob", 0.1), ("attention_probs_dropout_prob", 0.1), None), base_prefix=f"{name}.")
    for name, presets in (("bert", {"bert-base": _BERT, "bert-tiny": dict(_BERT, **TINY)}),
                          ("roberta", {"roberta-base": _ROBERTA, "roberta-tiny": dict(_ROBERTA, **TINY)}))
)
