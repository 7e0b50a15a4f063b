"""What a transformers attention mask means for :func:`fusedlm.ops.attention`.

transformers describes a mask by absolute positions: query row i sits at position ``q_offset + i``,
key column j at ``kv_offset + j``; a causal mask lets a query see the keys at or before its
position, a sliding window of W also hides the keys W or more positions behind it, and a 2-D
padding mask hides padded keys. ``ops.attention`` knows "causal" (aligned bottom-right: row i sees
column ``j <= i + Nk - Nq``), "bidirectional" and a ``[B, Nk]`` key padding mask. A
:class:`MaskPlan` says how one mask maps onto those: the mode, the number of leading key columns
any query can see (a static cache holds more; they are sliced away, a view, no copy) and the
padding over them; or, when there is no such mapping, why not (the caller then falls back).
"""
from __future__ import annotations

import dataclasses

import torch

from ..reference.attention import MASK_MODES, visible


@dataclasses.dataclass(frozen=True)
class MaskPlan:
    q_length: int
    kv_length: int
    mode: str | None = None  # "causal" | "bidirectional"; None: not expressible, see `reason` (one per kind)
    keys: int = 0  # key columns >= keys are hidden from every query
    key_padding_mask: torch.Tensor | None = None  # bool [B, keys], True = visible; None = all
    reason: str | None = None

    def to(self, device) -> "MaskPlan":
        kpm = None if self.key_padding_mask is None else self.key_padding_mask.to(device)
        return dataclasses.replace(self, key_padding_mask=kpm)

    def dense(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The bool mask ``[B, 1, Nq, Nk]`` this plan stands for (what it is checked against)."""
        out = torch.zeros(batch_size, 1, self.q_length, self.kv_length, dtype=torch.bool, device=device)
        if self.mode is not None:
            out[..., :self.keys] = visible(self.q_length, self.keys, MASK_MODES[self.mode], None,
                                           self.key_padding_mask, device=device)
        return out


def _causal(nq: int, nk: int, diag: int, window: int | None, device=None) -> torch.Tensor:
    """Bool ``[Nq, Nk]``: row i sees column j when ``i + diag - window < j <= i + diag``."""
    i = torch.arange(nq, device=device).view(nq, 1)
    j = torch.arange(nk, device=device).view(1, nk)
    seen = j <= i + diag
    return seen if window is None else seen & (j > i + diag - window)


def _plan(mode: str, q_length: int, kv_length: int, keys: int, padding: torch.Tensor | None) -> MaskPlan:
    kpm = None
    if padding is not None:
        kpm = padding[:, :keys]
        kpm = None if bool(kpm.all()) else kpm.contiguous()
    return MaskPlan(q_length, kv_length, mode, keys, kpm)


def lower(kind: str, q_length: int, kv_length: int, padding: torch.Tensor | None, *, batch_size: int,
          diag: int = 0, window: int | None = None) -> MaskPlan:
    """The plan of a causal (optionally sliding-window) or bidirectional mask plus padding.

    kind: "causal" or "bidirectional". padding: bool ``[B, kv_length]`` (True = real token) or None.
    diag: ``q_offset - kv_offset`` (causal: row i sees column j when ``j <= i + diag``).
    window: causal only: row i also needs ``j > i + diag - window`` (transformers' sliding window).
    """
    if kind == "bidirectional":
        return _plan("bidirectional", q_length, kv_length, kv_length, padding)
    if q_length == 1:  # one query row: whatever it sees is a key padding mask
        device = None if padding is None else padding.device
        row = _causal(1, kv_length, diag, window, device).expand(batch_size, kv_length)
        return _plan("bidirectional", q_length, kv_length, kv_length, row if padding is None else row & padding)
    keys = q_length + diag  # columns from here on come after every query
    if keys > kv_length:
        return MaskPlan(q_length, kv_length, reason="a causal mask whose diagonal lies past the last key")
    if keys <= 0:
        return MaskPlan(q_length, kv_length, reason="a causal mask under which no query sees any key")
    if window is not None and keys - 1 >= window:  # then the last query loses column 0, the first does not
        return MaskPlan(q_length, kv_length, reason=(
            "a sliding window that hides keys from some of several queries (ops.attention has no sliding-window "
            "mask; windows run on it where they hide nothing, and for one query at a time, as in decoding)"))
    return _plan("causal", q_length, kv_length, keys, padding)


def recover(mask: torch.Tensor, *, diag: int | None = None, window: int | None = None) -> MaskPlan:
    """The plan of a dense bool mask ``[B or 1, 1, Nq, Nk]`` (True = visible), if it is one of
    bidirectional + padding or causal (diagonal `diag`, default bottom-right; sliding `window`)
    + padding; otherwise a plan with a reason. Costs a few passes over the B x Nq x Nk booleans."""
    b, heads, nq, nk = mask.shape
    if heads != 1:
        return MaskPlan(nq, nk, reason="a mask with per-head patterns")
    diag = nk - nq if diag is None else diag
    padding = mask.any(dim=2).view(b, nk)  # the keys some query sees
    if torch.equal(mask, padding.view(b, 1, 1, nk).expand(b, 1, nq, nk)):
        return lower("bidirectional", nq, nk, padding, batch_size=b)
    if torch.equal(mask, _causal(nq, nk, diag, window, mask.device) & padding.view(b, 1, 1, nk)):
        return lower("causal", nq, nk, padding, batch_size=b, diag=diag, window=window)
    return MaskPlan(nq, nk, reason="a custom mask (not causal, sliding-window or bidirectional with padding)")


def recover_tensor(mask: torch.Tensor) -> MaskPlan:
    """The plan of a 4-D mask a user handed transformers as it is (bool, or additive float that is
    0 where visible and the dtype's minimum / -inf elsewhere); a bias-like float mask has none."""
    if mask.dim() != 4:
        return MaskPlan(0, 0, reason="an attention mask that is not 4-D")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            return MaskPlan(0, 0, reason="an integer attention mask")
        hidden = mask <= torch.finfo(mask.dtype).min
        if not bool((hidden | (mask == 0)).all()):
            return MaskPlan(0, 0, reason="an additive float mask with values other than 0 and -inf (a bias)")
        mask = ~hidden
    return recover(mask)
