"""The transformer block and its parts: norms, the MLP, attention (self and cross, on
``fusedlm.ops.attention``) and the block that puts them together with residuals.

Shapes: B batch, N tokens, d model width, H query heads, Hkv key/value heads, D head dim.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops import _gemv
from .cache import KVCache
from .config import ModelConfig
from .positions import apply_rope


class Linear(nn.Linear):
    """``nn.Linear`` whose decode products (a few rows, no autograd) run fusedlm's dense GEMV
    (``ops._gemv.linear``: float32 / bf16 weights at the read bandwidth); everything else, training
    included, is ``F.linear``. Same parameters, state dict and repr as ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gemv.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (LLaMA, Qwen2; T5's "LayerNorm" is the same)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return RMSNorm(config.d_model, config.norm_eps)


_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "swiglu": F.silu}


class MLP(nn.Module):
    """down_proj(act(up_proj x)), or SwiGLU's down_proj(silu(gate_proj x) * up_proj x); dropout
    (config.mlp_dropout: BART's activation_dropout, T5's dropout_rate) after the activation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, d_ff, bias = config.d_model, config.d_ff, config.mlp_bias
        self.gated = config.mlp == "swiglu"
        self.act = _ACTIVATIONS[config.mlp]
        if self.gated:
            self.gate_proj = Linear(d, d_ff, bias=bias)
        self.up_proj = Linear(d, d_ff, bias=bias)
        self.down_proj = Linear(d_ff, d, bias=bias)
        self.dropout = nn.Dropout(config.mlp_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))  # (B, N, d_ff)
        return self.down_proj(self.dropout(h))


class Attention(nn.Module):
    """Multi-head attention with GQA over ``ops.attention``: q_proj, k_proj, v_proj, o_proj.

    Self-attention projects x; cross-attention (``cross=True``) projects the queries from x and the
    keys/values from the encoder output ``memory``, once per generation (kept in the cache). With
    a cache, the keys/values it holds (earlier tokens, a prefix) come before the new ones.
    """

    def __init__(self, config: ModelConfig, index: int, cross: bool = False):
        super().__init__()
        self.index, self.cross = index, cross
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.scale = config.attn_scale
        self.dropout_p = config.attn_dropout
        d, q_dim, kv_dim = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = Linear(d, q_dim, bias=config.qkv_bias)
        self.k_proj = Linear(d, kv_dim, bias=config.qkv_bias)
        self.v_proj = Linear(d, kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(q_dim, d, bias=config.out_bias)

    def _heads(self, t: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, n_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, D)

    def forward(self, x: torch.Tensor, *, attn_mode: str = "causal", prefix_len=None,
                key_padding_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None, rope=None,
                cache: KVCache | None = None, memory: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, d) -> (B, N, d). attn_mode, prefix_len, key_padding_mask (over every key the
        layer sees), bias: as ``ops.attention`` takes them; rope: (cos, sin) of the new tokens."""
        b, n, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)  # (B, H, N, D)
        if not self.cross:
            k, v = self._heads(self.k_proj(x), self.n_kv_heads), self._heads(self.v_proj(x), self.n_kv_heads)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.append(self.index, k, v)  # (B, Hkv, past + N, D)
        elif cache is not None and cache.cross[self.index] is not None:
            k, v = cache.cross[self.index]  # the encoder's keys/values, projected at the first step
        else:
            k, v = self._heads(self.k_proj(memory), self.n_kv_heads), self._heads(self.v_proj(memory), self.n_kv_heads)
            if cache is not None:
                k, v = cache.set_cross(self.index, k, v)  # (B, Hkv, [P +] M, D)
        dropout_p = self.dropout_p if self.training else 0.0
        extra = {"dropout_p": dropout_p} if dropout_p > 0 else {}
        y = ops.attention(q, k, v, mask=attn_mode, prefix_len=prefix_len, key_padding_mask=key_padding_mask, bias=bias,
                          scale=self.scale, **extra)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))  # (B, N, d)


class Block(nn.Module):
    """Attention (+ cross-attention) + MLP, each with a residual; pre-norm (GPT-2, LLaMA, T5) or
    post-norm (BERT, BART). config.dropout applies to each sublayer's output before the residual add."""

    def __init__(self, config: ModelConfig, index: int, cross: bool):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attn_norm, self.attn = make_norm(config), Attention(config, index)
        if cross:
            self.cross_norm, self.cross_attn = make_norm(config), Attention(config, index, cross=True)
        self.mlp_norm, self.mlp = make_norm(config), MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, *, attn_mode: str, prefix_len=None, key_padding_mask: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, rope=None, cache: KVCache | None = None,
                memory: torch.Tensor | None = None, memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, d) -> (B, N, d). Self-attention takes attn_mode, prefix_len, key_padding_mask,
        bias, rope and the cache; cross-attention (a decoder with memory) reads memory (B, M, d)
        with memory_padding_mask, bidirectionally."""
        sublayers = [(self.attn_norm, lambda y: self.attn(y, attn_mode=attn_mode, prefix_len=prefix_len,
                                                          key_padding_mask=key_padding_mask, bias=bias, rope=rope,
                                                          cache=cache))]
        if memory is not None:
            sublayers.append((self.cross_norm, lambda y: self.cross_attn(y, attn_mode="bidirectional",
                                                                         key_padding_mask=memory_padding_mask,
                                                                         cache=cache, memory=memory)))
        sublayers.append((self.mlp_norm, self.mlp))
        for norm, f in sublayers:
            x = x + self.dropout(f(norm(x))) if self.pre_norm else norm(x + self.dropout(f(x)))
        return x
