"""Reference masked scaled-dot-product attention, in plain PyTorch.

``attention(q, k, v, mask, prefix_len, key_padding_mask, bias, scale)`` with

* q ``[B, Hq, Nq, D]``, k and v ``[B, Hkv, Nk, D]``, ``Hq % Hkv == 0``: query head ``h`` reads
  key/value head ``h // (Hq // Hkv)`` (GQA; MQA when ``Hkv == 1``);
* scores ``s[b, h, i, j] = scale * <q[b, h, i], k[b, h', j]> + bias[b, h, i, j]`` (bias broadcast
  to ``[B, Hq, Nq, Nk]``), scale defaulting to ``1 / sqrt(D)``;
* the visibility rules, which live in :func:`visible` and nowhere else in Python:

  - ``causal``: query i sees key j when ``j <= i + (Nk - Nq)`` (aligned bottom-right, so one new
    query against a cache of Nk keys sees all of them, and with Nq > Nk the first Nq - Nk
    queries see nothing);
  - ``prefix``: keys ``j < prefix_len[b]`` are visible to every query, the rest causally;
  - ``bidirectional``: every key;
  - and, for all three, ``key_padding_mask[b, j]`` (True = real token) must be True.

Numerics: softmax over the visible keys in float32 (float64 for float64 inputs); hidden keys get
probability exactly 0. A query row with no visible key (or whose visible scores are all -inf)
returns zeros, its log-sum-exp is -inf, and its gradients are zero: never NaN.

The log-sum-exp ``lse[b, h, i] = log(sum_j exp(s[b, h, i, j]))`` over visible keys is what the
kernels save for the backward pass, which recomputes the probabilities as ``exp(s - lse)``
(:func:`attention_backward` writes that recomputation out).

This module imports nothing of fusedlm: it is the ground truth the kernels are tested against.
"""
from __future__ import annotations

import math

import torch

# Mask modes, as the kernels receive them (mask_mode argument of the C++ and Triton kernels).
CAUSAL, PREFIX, BIDIRECTIONAL = 0, 1, 2
MASK_MODES = {"causal": CAUSAL, "prefix": PREFIX, "bidirectional": BIDIRECTIONAL}


def visible(
    nq: int,
    nk: int,
    mask_mode: int,
    prefix_len: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean visibility ``[B or 1, 1, Nq, Nk]``: True where query i may attend to key j.

    prefix_len: int or int64 ``[B]`` (required for PREFIX); key_padding_mask: bool ``[B, Nk]``.
    """
    i = torch.arange(nq, device=device).view(nq, 1)
    j = torch.arange(nk, device=device).view(1, nk)
    causal = j <= i + (nk - nq)  # [Nq, Nk]
    if mask_mode == CAUSAL:
        mask = causal.view(1, 1, nq, nk)
    elif mask_mode == PREFIX:
        if prefix_len is None:
            raise ValueError("the prefix mask needs prefix_len")
        prefix_len = torch.as_tensor(prefix_len, device=device)
        in_prefix = j.view(1, 1, 1, nk) < prefix_len.view(-1, 1, 1, 1)  # [B or 1, 1, 1, Nk]
        mask = causal.view(1, 1, nq, nk) | in_prefix
    elif mask_mode == BIDIRECTIONAL:
        mask = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    else:
        raise ValueError(f"unknown mask mode {mask_mode}")
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.to(device).view(-1, 1, 1, nk)
    return mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(t: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hq, N, D]: each key/value head serves Hq // Hkv query heads."""
    return t.repeat_interleave(hq // t.shape[1], dim=1)


def scores(q, k, mask_mode, prefix_len=None, key_padding_mask=None, bias=None, scale=None):
    """Masked scores ``[B, Hq, Nq, Nk]`` in the compute dtype: -inf where a key is hidden."""
    ct = _compute_dtype(q.dtype)
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = scale * (q.to(ct) @ _expand_kv(k, q.shape[1]).to(ct).transpose(-1, -2))  # [B, Hq, Nq, Nk]
    if bias is not None:
        s = s + bias.to(ct)
    mask = visible(nq, nk, mask_mode, prefix_len, key_padding_mask, q.device)
    return s.masked_fill(~mask, float("-inf"))


def attention_lse(q, k, v, mask_mode=CAUSAL, prefix_len=None, key_padding_mask=None, bias=None, scale=None):
    """Returns ``(out [B, Hq, Nq, D] in q.dtype, lse [B, Hq, Nq] in float32/float64)``."""
    s = scores(q, k, mask_mode, prefix_len, key_padding_mask, bias, scale)
    # Softmax with a max that is 0 for rows without a finite score, so such rows give
    # exp(-inf) = 0 everywhere and a zero output instead of 0/0.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ _expand_kv(v, q.shape[1]).to(s.dtype)) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for rows that see nothing
    return out.to(q.dtype), lse


def attention(q, k, v, mask_mode=CAUSAL, prefix_len=None, key_padding_mask=None, bias=None, scale=None):
    """The attention output ``[B, Hq, Nq, D]`` in q.dtype (see the module docstring)."""
    return attention_lse(q, k, v, mask_mode, prefix_len, key_padding_mask, bias, scale)[0]


def attention_backward(grad_out, q, k, v, out, lse, mask_mode=CAUSAL, prefix_len=None, key_padding_mask=None,
                       bias=None, scale=None):
    """Gradients ``(dq, dk, dv, dbias [B, Hq, Nq, Nk])`` recomputed from the saved log-sum-exp.

    With P = exp(S - lse) (0 where hidden or where the row sees nothing) and
    delta_i = sum_d dO[i, d] * O[i, d]:
        dV = P^T dO,   dS = P * (dO V^T - delta),   dQ = scale dS K,   dK = scale dS^T Q,
    and dbias = dS (to be summed over bias's broadcast dimensions). dk and dv are summed over the
    query heads that share a key/value head. Grads come in q's dtype, dbias in the compute dtype.
    """
    ct = _compute_dtype(q.dtype)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = scores(q, k, mask_mode, prefix_len, key_padding_mask, bias, scale)
    lse = lse.to(ct).unsqueeze(-1)
    p = torch.where(torch.isfinite(lse) & torch.isfinite(s), torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)), 0)
    do, o = grad_out.to(ct), out.to(ct)
    ke, ve = _expand_kv(k, hq).to(ct), _expand_kv(v, hq).to(ct)
    dv = p.transpose(-1, -2) @ do  # [B, Hq, Nk, D]
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (do @ ve.transpose(-1, -2) - delta)
    dq = scale * (ds @ ke)
    dk = scale * (ds.transpose(-1, -2) @ q.to(ct))
    group = hq // hkv
    b, nk = k.shape[0], k.shape[2]
    dk = dk.view(b, hkv, group, nk, d).sum(2)
    dv = dv.view(b, hkv, group, nk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds
