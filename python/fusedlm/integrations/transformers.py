"""``attn_implementation="fusedlm"``: transformers models attend through :func:`fusedlm.ops.attention`.

    from fusedlm.integrations import transformers
    transformers.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fusedlm")
    # or, on a loaded model: model.set_attn_implementation("fusedlm")

:func:`register` adds "fusedlm" to transformers' ``AttentionInterface`` (the attention function)
and ``AttentionMaskInterface`` (the mask function; without it a custom name receives
``attention_mask=None`` and padding is lost). The mask function returns, once per forward, a
:class:`FusedMask`: the 2-D padding mask carrying a :class:`~._masks.MaskPlan`, the mask kind and
the ``[B, Nk]`` key padding read from what transformers passes (its mask function, offsets and
2-D padding), never a dense bias and, for causal and bidirectional masks, no ``Nq x Nk`` mask at
all (a sliding window or a composed pattern is read off transformers' own dense mask). Each
attention layer then runs ``ops.attention`` with that plan: causal or bidirectional, padding, GQA
on the key/value heads as they are (no ``repeat_kv``), the KV cache, T5-style ``position_bias`` as
``bias``.

What ``ops.attention`` cannot express falls back, with a one-time warning naming the feature, to
transformers' own sdpa (or, for features sdpa lacks, the model's eager) attention on the same
mask: a sliding window that hides keys from a block of several queries (a window is expressed when
it hides nothing, and for one query at a time, i.e. decoding), custom mask patterns (packed
sequences, mask overlays, per-head masks, bias-like float masks), logit softcapping and attention
sinks (eager), value head dims unlike the query's or above 256. Attention dropout runs on
``ops.attention``'s ``dropout_p``.
"""
from __future__ import annotations

import collections
import sys
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from .. import ops
from . import _masks
from .._warn import warn_once

NAME = "fusedlm"
_MAX_HEAD_DIM = 256


def register() -> None:
    """Registers "fusedlm" with transformers' attention and attention-mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, fusedlm_mask)


class FusedMask(torch.Tensor):
    """What the "fusedlm" mask function hands the layers: transformers' 2-D padding mask
    ``[B, kv_offset + kv_length]`` (True = real token; all True without padding), as bool, carrying
    ``plan`` (the :class:`~._masks.MaskPlan` the layers run) and what :meth:`dense` needs.

    Like flash-attention's mask in transformers it stays 2-D: no ``Nq x Nk`` mask is built for a
    causal or bidirectional pattern. ``.to()``, ``.contiguous()`` and ``.clone()`` keep the plan
    (moved along); any other op returns a plain tensor. Handed back to transformers (a static
    cache's masks are made once per step and passed in again) it reads as the padding mask it is.
    """

    plan: _masks.MaskPlan
    _mask_kwargs: dict
    _dense: torch.Tensor | None = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if (func in _KEEPS_PLAN and isinstance(source, FusedMask) and isinstance(out, torch.Tensor)
                and out.dtype == torch.bool and out.shape == source.shape and out is not source):
            out = out.as_subclass(cls)
            out.plan, out._mask_kwargs = source.plan.to(out.device), source._mask_kwargs
        return out

    def dense(self) -> torch.Tensor:
        """transformers' own sdpa mask for the same call, bool ``[B, 1, Nq, Nk]`` (for fallbacks; built once)."""
        if self._dense is None:
            kw = self._mask_kwargs
            dense = sdpa_mask(**kw, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
            self._dense = dense.expand(kw["batch_size"], 1, kw["q_length"], kw["kv_length"])
        return self._dense


_KEEPS_PLAN = {torch.Tensor.to, torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.cpu, torch.Tensor.cuda}


def _padding(attention_mask: torch.Tensor | None, kv_length: int, kv_offset: int) -> torch.Tensor | None:
    """The 2-D padding mask over the key columns ``[kv_offset, kv_offset + kv_length)``; missing columns are padding."""
    if attention_mask is None:
        return None
    padding = attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    if padding.shape[1] < kv_length:
        padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[1]))
    return padding


def fusedlm_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                 mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                 local_size: int | None = None, use_vmap: bool = False, device="cpu", **kwargs) -> FusedMask:
    """transformers' mask-interface function for "fusedlm" (arguments as ``masking_utils.sdpa_mask``)."""
    mask_kwargs = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                       kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                       local_size=local_size, use_vmap=use_vmap, device=device)
    if attention_mask is None:
        carrier = torch.ones(batch_size, kv_offset + kv_length, dtype=torch.bool, device=device).as_subclass(FusedMask)
    else:
        carrier = attention_mask.to(torch.bool).as_subclass(FusedMask)  # a new object, sharing the storage
    carrier._mask_kwargs = mask_kwargs
    diag = int(q_offset) - int(kv_offset)  # a static cache passes q_offset as a tensor
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        kind = "causal" if mask_function is causal_mask_function else "bidirectional"
        carrier.plan = _masks.lower(kind, q_length, kv_length, _padding(attention_mask, kv_length, kv_offset),
                                    batch_size=batch_size, diag=diag)
    else:  # a sliding window, or a pattern transformers composed: read it off transformers' own mask
        carrier.plan = _masks.recover(carrier.dense(), diag=diag, window=local_size)
    return carrier


# The last few 4-D masks a user handed transformers as they are, with their plans (every layer
# of one forward receives the same tensor): (weak reference, tensor version, plan).
_user_masks: collections.deque = collections.deque(maxlen=4)


def _user_plan(mask: torch.Tensor, nq: int, nk: int) -> _masks.MaskPlan:
    for ref, version, plan in _user_masks:
        if ref() is mask and version == mask._version:
            return plan
    try:
        expanded = mask.expand(mask.shape[0], mask.shape[1], nq, nk) if mask.dim() == 4 else mask
    except RuntimeError:
        expanded = mask
    plan = _masks.recover_tensor(expanded)
    _user_masks.append((weakref.ref(mask), mask._version, plan))
    return plan


def _plan_for(attention_mask, module, query: torch.Tensor, key: torch.Tensor, is_causal) -> _masks.MaskPlan:
    b, nq, nk = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is None:  # as transformers' sdpa: causal (top-left) for several queries of a causal module
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return _masks.lower("causal" if causal and nq > 1 else "bidirectional", nq, nk, None, batch_size=b)
    if isinstance(attention_mask, FusedMask):
        plan = attention_mask.plan
    elif attention_mask.dim() == 4:
        plan = _user_plan(attention_mask, nq, nk)
    else:
        raise ValueError(f"a {attention_mask.dim()}-D attention mask reached the fusedlm attention without its plan "
                         "(was the mask function's output replaced by a copy?); masks are 4-D or fusedlm's own")
    if plan.mode is not None and (plan.q_length, plan.kv_length) != (nq, nk):
        raise ValueError(f"the attention mask was built for {plan.q_length} queries x {plan.kv_length} keys, "
                         f"but the layer has {nq} queries x {nk} keys")
    return plan


def _unsupported(query, key, value, kwargs) -> tuple[str, str] | None:
    """(feature, fallback) for what ops.attention cannot do, or None."""
    if kwargs.get("softcap") is not None:
        return "logit softcapping", "eager"
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)", "eager"

    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        return "key/value head dims unlike the query's", "sdpa"
    if d > _MAX_HEAD_DIM:
        return f"a head dim above {_MAX_HEAD_DIM}", "sdpa"
    return None


def _fallback(target: str, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    plain = attention_mask.dense() if isinstance(attention_mask, FusedMask) else attention_mask
    if target == "sdpa":
        return sdpa_attention_forward(module, query, key, value, plain, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__} needs eager attention for this call, "
                                  "but its module has no eager_attention_forward")
    nq, nk = query.shape[2], key.shape[2]
    if plain is None and nq > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        plain = torch.ones(nq, nk, dtype=torch.bool, device=query.device).tril()  # sdpa's top-left is_causal
    if plain is not None and plain.dtype == torch.bool:  # eager adds the mask to the scores
        plain = torch.where(plain, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    return eager(module, query, key, value, plain, dropout=dropout, scaling=scaling, **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface function for "fusedlm".

    query ``[B, Hq, Nq, D]``, key/value ``[B, Hkv, Nk, D]`` (``Hq % Hkv == 0``), attention_mask: a
    :class:`FusedMask` (from :func:`fusedlm_mask`), a user's 4-D mask, or None. Returns
    ``([B, Nq, Hq, D], None)`` like transformers' sdpa attention (no attention weights).
    """
    if kwargs.get("output_attentions", False):
        warn_once("output_attentions", "fusedlm attention does not return attention weights (output_attentions=True "
                  "gives None), like transformers' sdpa; use attn_implementation='eager' for them")
    unsupported = _unsupported(query, key, value, kwargs)
    plan = None if unsupported else _plan_for(attention_mask, module, query, key, is_causal)
    if plan is not None and plan.mode is None:
        unsupported = plan.reason, "sdpa"
    if unsupported:
        feature, target = unsupported
        warn_once(feature, f"fusedlm attention: {feature} is not supported by ops.attention; such calls run "
                  f"transformers' {target} attention instead (shown once; first seen on {query.shape[2]} queries "
                  f"x {key.shape[2]} keys in {type(module).__name__})")
        return _fallback(target, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    n = plan.keys  # a static cache holds keys after every query: sliced off (views)
    bias = kwargs.get("position_bias")
    if bias is not None and bias.shape[-1] != 1:
        bias = bias[..., :n]
    extra = {"dropout_p": dropout} if dropout > 0 else {}
    out = ops.attention(query, key[:, :, :n], value[:, :, :n], mask=plan.mode,
                        key_padding_mask=plan.key_padding_mask, bias=bias, scale=scaling, **extra)
    return out.transpose(1, 2).contiguous(), None  # [B, Nq, Hq, D]
