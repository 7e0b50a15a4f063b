"""The tour's three model configs, sized by the mode and matched to the world's tokenizer: a
LLaMA-style decoder (RMSNorm, SwiGLU, RoPE, GQA), a BERT-style encoder with an MLM head, and a
T5-style encoder-decoder (relative position bias)."""
from __future__ import annotations

import torch
from torch import nn

from ..models import ModelConfig, build, get_config
from .context import Context


def _shared(ctx: Context) -> dict:
    s, tok = ctx.sizes, ctx.tok
    return dict(vocab_size=tok.vocab_size, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                max_seq_len=4 * s.seq_len, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)


def decoder_config(ctx: Context, **overrides) -> ModelConfig:
    """SwiGLU's d_ff = 8d/3, rounded up to a multiple of 32 (the NF4 cpu kernel's K granularity,
    for the inference section's 4-bit model)."""
    d = ctx.sizes.d_model
    return get_config("llama-tiny", **{**_shared(ctx), "n_kv_heads": max(1, ctx.sizes.n_heads // 2),
                                       "d_ff": (8 * d // 3 + 31) // 32 * 32, "bos_token_id": ctx.tok.bos_id, **overrides})


def encoder_config(ctx: Context, **overrides) -> ModelConfig:
    """Half the decoder's layers: the encoder only shows that MLM trains."""
    return get_config("bert-tiny", **{**_shared(ctx), "n_layers": max(2, ctx.sizes.n_layers // 2),
                                      "d_ff": 4 * ctx.sizes.d_model, "type_vocab_size": 0, **overrides})


def seq2seq_config(ctx: Context, **overrides) -> ModelConfig:
    """Half the decoder's layers in each stack."""
    s = ctx.sizes
    return get_config("t5-tiny", **{**_shared(ctx), "n_layers": max(2, s.n_layers // 2), "head_dim": s.d_model // s.n_heads,
                                    "d_ff": 4 * s.d_model, "decoder_start_token_id": ctx.tok.pad_id, **overrides})


def init_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    """GPT-2 / BERT / LLaMA's initialisation (transformers' _init_weights): every linear and
    embedding N(0, std), biases 0 (torch's defaults make a tied head's logits far too large).
    Norm weights stay at 1, T5's relative bias at 0."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def new_model(config: ModelConfig, seed: int) -> nn.Module:
    """The model `config` describes, initialised from `seed`."""
    torch.manual_seed(seed)
    return init_weights(build(config))
