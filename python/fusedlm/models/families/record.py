"""The record every model family fills in, and what the records share: the tiny sizes, the
special-token and dropout keys of a Hugging Face config.json, and the helpers of the checkpoint
name tables.

A table row is (fusedlm name, Hugging Face name, how, part): how is "" (a copy), "T" (a Conv1D
weight stored transposed) or "flat" (reshaped); part is None or (i, n), the i-th of n equal row
blocks of the Hugging Face tensor (GPT-2's c_attn stacks q, k and v).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

# The preset sizes of every "<family>-tiny" model.
TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=128, max_seq_len=64)
DROPOUT_FIELDS = ("dropout", "attn_dropout", "mlp_dropout")


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family (its name is its Hugging Face ``model_type`` and ``ModelConfig.family``).

    presets: preset name -> ModelConfig fields. from_hf: a config.json dict -> the ModelConfig
    fields it describes (besides the special tokens and dropouts, which the record adds);
    to_hf: a ModelConfig -> its config.json dict (likewise); table: a ModelConfig -> its
    checkpoint name table. dropout_keys: the config.json key (and transformers' default) of
    dropout, attn_dropout and mlp_dropout, None where the family has none. base_prefix: what
    the base model (BertModel, LlamaModel, ...) leaves out of its checkpoint names. A family
    without from_hf (a fusedlm-only architecture) has presets only.
    """

    name: str
    arch: str
    presets: dict[str, dict]
    from_hf: Callable[[dict], dict] | None = None
    to_hf: Callable[[object], dict] | None = None
    table: Callable[[object], list[tuple]] | None = None
    dropout_keys: tuple = (None, None, None)
    base_prefix: str = ""

    def config_from_hf(self, c: dict) -> dict:
        """The ModelConfig fields of a config.json dict of this family."""
        dropouts = {field: float(c.get(*key)) for field, key in zip(DROPOUT_FIELDS, self.dropout_keys) if key}
        return dict(self.from_hf(c), family=self.name, pad_token_id=c.get("pad_token_id"),
                    bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"), **dropouts)

    def config_to_hf(self, cfg) -> dict:
        """The config.json dict of a ModelConfig of this family."""
        dropouts = {key[0]: getattr(cfg, field) for field, key in zip(DROPOUT_FIELDS, self.dropout_keys) if key}
        return dict(model_type=self.name, **self.to_hf(cfg), pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
                    eos_token_id=cfg.eos_token_id, tie_word_embeddings=cfg.tie_embeddings, **dropouts)


def wb(ours: str, theirs: str, how: str = "", bias: bool = True, part: tuple[int, int] | None = None) -> list[tuple]:
    """The weight (and bias) rows of one linear layer or norm."""
    rows = [(f"{ours}.weight", f"{theirs}.weight", how, part)]
    if bias:
        rows.append((f"{ours}.bias", f"{theirs}.bias", "", part))
    return rows


def attn(ours: str, q: str, k: str, v: str, o: str, bias: bool = True, out_bias: bool | None = None) -> list[tuple]:
    """The rows of the four projections of one attention block."""
    out_bias = bias if out_bias is None else out_bias
    return (wb(f"{ours}.q_proj", q, bias=bias) + wb(f"{ours}.k_proj", k, bias=bias) + wb(f"{ours}.v_proj", v, bias=bias)
            + wb(f"{ours}.o_proj", o, bias=out_bias))


def one(ours: str, theirs: str, how: str = "") -> list[tuple]:
    """The row of one tensor (an embedding, a bias buffer)."""
    return [(ours, theirs, how, None)]


def untied_head(cfg) -> list[tuple]:
    """The LM head's row when it is not the token embedding."""
    return [] if cfg.tie_embeddings else one("lm_head.weight", "lm_head.weight")


def check(ok: bool, message: str) -> None:
    """Raises ValueError(message) unless ok (what a config.json of the family may not hold)."""
    if not ok:
        raise ValueError(message)
