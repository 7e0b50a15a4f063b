"""Reference masked scaled-dot-product attention, in plain PyTorch.

``attention(q, k, v, mask, prefix_len, key_padding_mask, bias, scale, dropout_p, seed)`` with

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

NaN in, NaN out (every backend does what this file does): a row with a NaN score -- a NaN in
its q, or in the k or bias of a key it sees -- or a +inf score gets NaN in every entry and a NaN
log-sum-exp, never zeros; a NaN in the v of a key a row sees reaches the entries of that row it
is multiplied into. Other rows are untouched. A NaN in the k or bias of a hidden key never
reaches a row (its score is replaced by -inf); one in the v of a hidden key is unspecified (here
it meets a probability of 0, and 0 * NaN is NaN; the kernels skip hidden keys). Gradients of a
NaN row are unspecified.

The log-sum-exp ``lse[b, h, i] = log(sum_j exp(s[b, h, i, j]))`` over visible keys is what the
kernels save for the backward pass, which recomputes the probabilities as ``exp(s - lse)``
(:func:`attention_backward` writes that recomputation out).

Dropout on the attention probabilities (training), as in torch's SDPA and FlashAttention:
``out = (P * Z) V`` with P the normalised softmax above and ``Z = keep / (1 - dropout_p)``; the
log-sum-exp is unchanged (so the backward recomputes P from it as before), hidden keys keep
probability 0 and rows with no visible key still return zeros. The keep mask is a pure function of
``(seed, b, h, i, j)`` (:func:`dropout_keep`), so a kernel regenerates it tile by tile in the backward
and nothing of size ``Nq x Nk`` is saved. The recipe, to be reproduced bit for bit by every backend:

1. Philox-4x32-10 (Salmon et al., SC'11; the Random123 generator, also torch's CUDA generator and
   Triton's ``tl.philox``), 32-bit unsigned arithmetic, written out in :func:`philox4x32`.
2. Key: the 64-bit seed split into ``k0 = seed & 0xFFFFFFFF`` and ``k1 = seed >> 32``.
3. Counter for element ``[b, h, i, j]`` (h the query head, i the query row, j the key column, all
   0-based positions in the full tensors): ``(c0, c1, c2, c3) = (j >> 2, i, h, b)``.
4. Its random word is output word ``j & 3`` of that Philox call (one call serves four consecutive keys).
5. ``u = (word >> 8) * 2**-24`` (exact in float32, in [0, 1)); keep iff ``u >= dropout_p``. Kernels
   compare integers: keep iff ``(word >> 8) >= ceil(dropout_p * 2**24)``, the threshold computed
   once on the host in float64 (:func:`dropout_threshold`).

In Triton: ``w0, w1, w2, w3 = tl.philox(seed, j >> 2, i, h, b)``, then pick ``w[j & 3]``.

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


# Philox-4x32-10 constants (Random123): round multipliers and the key's Weyl increments.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * x`` (a < 2**32, int64 x in [0, 2**32)), without int64 overflow."""
    lo16 = a * (x & 0xFFFF)  # < 2**48
    hi16 = a * (x >> 16)  # < 2**48; a * x = hi16 * 2**16 + lo16
    return (hi16 + (lo16 >> 16)) >> 16, (((hi16 & 0xFFFF) << 16) + lo16) & _MASK32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32-10 of the counter ``(c0, c1, c2, c3)`` (int64 tensors holding uint32 values) under
    the key ``(k0, k1)``; returns the four output words (int64 tensors in [0, 2**32)).

    Each round: ``(hi0, lo0) = M0 * c0``, ``(hi1, lo1) = M1 * c2`` (64-bit products split into
    words), ``(c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``, then
    ``k0 += W0``, ``k1 += W1`` (mod 2**32).
    """
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """The integer a 24-bit random value must reach to be kept: ``ceil(dropout_p * 2**24)``."""
    return math.ceil(dropout_p * 2**24)


def dropout_keep(seed: int, dropout_p: float, b: int, h: int, nq: int, nk: int, device=None) -> torch.Tensor:
    """Boolean keep mask ``[B, Hq, Nq, Nk]`` for 64-bit `seed` (the recipe in the module docstring)."""
    groups = -(-nk // 4)  # one Philox call per four keys
    shape = (b, h, nq, groups)
    idx = [torch.arange(n, dtype=torch.int64, device=device) for n in shape]
    c3, c2, c1, c0 = (t.view([-1 if d == a else 1 for d in range(4)]).expand(shape) for a, t in enumerate(idx))
    words = philox4x32(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    word = torch.stack(words, dim=-1).view(b, h, nq, 4 * groups)[..., :nk]  # key j <- word j & 3 of call j >> 2
    return (word >> 8) >= dropout_threshold(dropout_p)


def dropout_multiplier(seed: int, dropout_p: float, shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``Z = keep / (1 - dropout_p)`` as a `dtype` tensor ``[B, Hq, Nq, Nk]``: 0 or ``1 / (1 - p)``."""
    return dropout_keep(seed, dropout_p, *shape, device=device).to(dtype) * (1.0 / (1.0 - dropout_p))


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


def attention_lse(q, k, v, mask_mode=CAUSAL, prefix_len=None, key_padding_mask=None, bias=None, scale=None,
                  dropout_p=0.0, seed=0):
    """Returns ``(out [B, Hq, Nq, D] in q.dtype, lse [B, Hq, Nq] in float32/float64)``.

    With ``dropout_p > 0`` the normalised probabilities are multiplied by the mask of `seed` before
    they meet v; lse is that of the scores, not affected by dropout.
    """
    s = scores(q, k, mask_mode, prefix_len, key_padding_mask, bias, scale)
    # Softmax with a max that is 0 for rows without a finite score, so such rows give
    # exp(-inf) = 0 everywhere and a zero output instead of 0/0.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    if dropout_p > 0:
        p = p * dropout_multiplier(seed, dropout_p, p.shape, p.dtype, p.device)
    out = (p @ _expand_kv(v, q.shape[1]).to(s.dtype)) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for rows that see nothing
    return out.to(q.dtype), lse


def attention(q, k, v, mask_mode=CAUSAL, prefix_len=None, key_padding_mask=None, bias=None, scale=None,
              dropout_p=0.0, seed=0):
    """The attention output ``[B, Hq, Nq, D]`` in q.dtype (see the module docstring)."""
    return attention_lse(q, k, v, mask_mode, prefix_len, key_padding_mask, bias, scale, dropout_p, seed)[0]


def attention_backward(grad_out, q, k, v, out, lse, mask_mode=CAUSAL, prefix_len=None, key_padding_mask=None,
                       bias=None, scale=None, dropout_p=0.0, seed=0):
    """Gradients ``(dq, dk, dv, dbias [B, Hq, Nq, Nk])`` recomputed from the saved log-sum-exp.

    With P = exp(S - lse) (0 where hidden or where the row sees nothing), Z the dropout
    multiplier of `seed` (all ones when dropout_p == 0) and delta_i = sum_d dO[i, d] * O[i, d]:
        dV = (P * Z)^T dO,   dP = (dO V^T) * Z,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q,
    and dbias = dS (to be summed over bias's broadcast dimensions). delta needs no mask: with
    O = (P * Z) V, sum_j P_ij dP_ij = dO_i . O_i. dk and dv are summed over the query heads that
    share a key/value head. Grads come in q's dtype, dbias in the compute dtype.
    """
    ct = _compute_dtype(q.dtype)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = scores(q, k, mask_mode, prefix_len, key_padding_mask, bias, scale)
    lse = lse.to(ct).unsqueeze(-1)
    p = torch.where(torch.isfinite(lse) & torch.isfinite(s), torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)), 0)
    do, o = grad_out.to(ct), out.to(ct)
    ke, ve = _expand_kv(k, hq).to(ct), _expand_kv(v, hq).to(ct)
    dp = do @ ve.transpose(-1, -2)  # [B, Hq, Nq, Nk]
    if dropout_p > 0:
        z = dropout_multiplier(seed, dropout_p, p.shape, ct, p.device)
        dv = (p * z).transpose(-1, -2) @ do  # [B, Hq, Nk, D]
        dp = dp * z
    else:
        dv = p.transpose(-1, -2) @ do
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = scale * (ds @ ke)
    dk = scale * (ds.transpose(-1, -2) @ q.to(ct))
    group = hq // hkv
    b, nk = k.shape[0], k.shape[2]
    dk = dk.view(b, hkv, group, nk, d).sum(2)
    dv = dv.view(b, hkv, group, nk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds
