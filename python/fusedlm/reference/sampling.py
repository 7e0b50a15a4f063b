"""Reference token sampling (temperature -> top-k -> top-p -> one draw), in plain PyTorch.

The kept set is exactly what transformers' ``TemperatureLogitsWarper -> TopKLogitsWarper ->
TopPLogitsWarper`` keep, per row ``b`` of ``logits [B, V]``:

* temperature: ``x = logits.float() / temperature[b]`` (a float32 division, as the warper does);
* top-k (``0 < k < V``): keep every token with ``x >= kth``, the k-th largest value counted with
  multiplicity, so all ties of the k-th value are kept; ``k == 0`` or ``k >= V`` is off;
* top-p (``p < 1``; ``p == 1`` is off, as transformers adds no TopP warper then): over the softmax of
  the top-k survivors, a token is kept when the probability of the tokens ranked before it is
  ``< p`` (so the token that crosses ``p`` is kept and the top token always is). Ranking:
  descending value, and among equal values the HIGHER index first. Computed as
  ``before < p * Z`` with unnormalised float64 masses ``exp(x - max)`` summed in ranking order
  (so a tie group of the top value sums exactly). transformers' warper sorts ascending with
  torch's unstable sort and compares float32 cumulative sums with ``1 - p``: it keeps the same
  number of tokens of the crossing value, but which of those equal-valued tokens follows
  torch.sort's internal order; and the two can differ when the mass before a token is within
  float32 rounding of ``p`` (tests skip such rows, a few in a thousand of quantised ones);
* draw: ``u = uniform(seed, row)`` (:func:`row_uniforms`), then the first token, in index order,
  whose cumulative kept probability (float64) exceeds ``u`` times the kept total.

``temperature == 0`` is greedy: the argmax, the FIRST index among equal maxima; ``top_k`` and
``top_p`` are ignored on such rows, and :func:`filter_logits` keeps that one token with its
unscaled logit.

Values: ``-inf`` logits are allowed (probability 0, never drawn; filtered logits stay ``-inf``).
NaN or ``+inf`` logits, a row with no finite logit, or a temperature so small that
``logits / temperature`` overflows to ``+inf`` are errors (:class:`ValueError`).

Randomness: one 63-bit seed per call from the generator (:func:`draw_seed`), then a counter-based
hash of ``(seed, row)`` (SplitMix64, :func:`row_uniforms`), so a row's draw does not depend on the
other rows. Every backend uses this scheme; they pick the same token whenever they compute the
same probabilities (see :mod:`fusedlm.ops.sampling`).

This module imports nothing of fusedlm: it is the one place the sampling order lives.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: row r hashes seed + (r + 1) * GOLDEN


def splitmix64(z: int) -> int:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014) on a 64-bit unsigned int."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return z ^ (z >> 31)


def row_uniforms(seed: int, rows: int) -> torch.Tensor:
    """float64 [rows] uniforms in [0, 1): the top 53 bits of splitmix64(seed + (r + 1) * GOLDEN)."""
    return torch.tensor(
        [(splitmix64((seed + (r + 1) * GOLDEN) & _MASK64) >> 11) * 2.0**-53 for r in range(rows)],
        dtype=torch.float64,
    )


def draw_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """One 63-bit seed from `generator` (or the default one of `device`), advancing its state."""
    if generator is not None:
        device = generator.device
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=device).item())


def _per_row(value, rows: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to("cpu", dtype).reshape(-1).expand(rows) if value.numel() == 1 else value.to("cpu", dtype)
    return torch.full((rows,), value, dtype=dtype)


def _check_values(logits: torch.Tensor) -> None:
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits must not contain NaN")
    if bool(torch.isposinf(logits).any()):
        raise ValueError("logits must not contain +inf (only -inf is allowed)")
    if logits.numel() and not bool(torch.isfinite(logits).any(dim=-1).all()):
        raise ValueError("every row of logits needs at least one finite value; a row is all -inf")


def kept_mask(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, keep)``: the temperature-scaled float32 logits [B, V] and the bool mask of kept tokens."""
    _check_values(logits)
    rows, vocab = logits.shape
    temperature = _per_row(temperature, rows, torch.float32)
    top_k = _per_row(top_k, rows, torch.int64)
    top_p = _per_row(top_p, rows, torch.float64)
    greedy = temperature == 0
    x = logits.detach().to("cpu", torch.float32) / torch.where(greedy, 1.0, temperature)[:, None]
    if bool(torch.isposinf(x).any()):
        raise ValueError("logits / temperature overflows to +inf; use a larger temperature")
    if not bool(torch.isfinite(x).any(dim=-1).all()):
        raise ValueError("every row of logits / temperature needs a finite value; a row is all -inf")
    keep = torch.ones_like(x, dtype=torch.bool)

    # top-k: keep x >= the k-th largest value (all its ties); rows with k == 0 or k >= V are off
    k_on = (top_k > 0) & (top_k < vocab)
    if bool(k_on.any()):
        descending = x.sort(dim=-1, descending=True).values
        kth = descending.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
        keep &= ~k_on[:, None] | (x >= kth)

    # top-p: rank by (value desc, index desc); keep a token while the mass ranked before it is
    # < p * Z (unnormalised float64 masses e = exp(x - max), summed in ranking order)
    p_on = top_p < 1
    if bool(p_on.any()):
        masked = x.masked_fill(~keep, float("-inf")).flip(-1)  # flipped: ties then rank higher index first
        ranked, order = masked.sort(dim=-1, descending=True, stable=True)
        e = (ranked.double() - ranked[:, :1].double()).exp()
        before = torch.cat([torch.zeros_like(e[:, :1]), e.cumsum(dim=-1)[:, :-1]], dim=-1)
        keep_ranked = before < (top_p * e.sum(dim=-1))[:, None]
        kept_p = torch.zeros_like(keep).scatter(1, vocab - 1 - order, keep_ranked)
        keep &= ~p_on[:, None] | kept_p

    # greedy rows: the first argmax only
    if bool(greedy.any()):
        first_max = torch.zeros_like(keep).scatter(1, logits.float().cpu().argmax(dim=-1, keepdim=True), True)
        keep = torch.where(greedy[:, None], first_max, keep)
        x = torch.where(greedy[:, None], logits.detach().to("cpu", torch.float32), x)
    return x, keep


def filter_logits(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """float32 [B, V]: ``logits / temperature`` on the kept tokens, ``-inf`` elsewhere (greedy rows:
    the argmax's unscaled logit). On logits' device."""
    x, keep = kept_mask(logits, temperature, top_k, top_p)
    return x.masked_fill(~keep, float("-inf")).to(logits.device)


def probabilities(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """float64 [B, V]: the distribution :func:`sample` draws from (one-hot on greedy rows)."""
    x, keep = kept_mask(logits, temperature, top_k, top_p)
    return x.double().masked_fill(~keep, float("-inf")).softmax(dim=-1)


def sample_with_seed(logits: torch.Tensor, seed: int, temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """int64 [B]: one token per row, drawn by inverse CDF with the uniforms of ``(seed, row)``."""
    probs = probabilities(logits, temperature, top_k, top_p)
    cdf = probs.cumsum(dim=-1)
    target = row_uniforms(seed, probs.shape[0]) * cdf[:, -1]
    token = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]  # first index with cdf > target
    last_kept = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(token, last_kept).to(logits.device)


def sample(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 [B]: temperature -> top-k -> top-p -> one draw per row, seeded from `generator`."""
    return sample_with_seed(logits, draw_seed(generator, logits.device), temperature, top_k, top_p)
