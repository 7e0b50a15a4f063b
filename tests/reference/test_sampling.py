"""Reference sampling against transformers' logits warpers, plus greedy, per-row params and seeding."""
import pytest
import torch

from fusedlm.reference import sampling as ref

lp = pytest.importorskip("transformers.generation.logits_process")


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Quantised logits (many ties) with some -inf entries; every row keeps a finite value."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(2, 12, (rows, 1), generator=g)
    logits = torch.randint(0, 1000, (rows, vocab), generator=g) % levels * 0.5 - 2.0
    logits = logits + torch.randn(rows, vocab, generator=g) * (torch.rand(rows, 1, generator=g) < 0.3)
    logits[torch.rand(rows, vocab, generator=g) < 0.1] = float("-inf")
    logits[:, 0] = logits[:, 0].clamp(min=-5.0)
    return logits.float()


def hf_kept(logits, temperature, top_k, top_p):
    scores = logits
    if temperature != 1.0:
        scores = lp.TemperatureLogitsWarper(float(temperature))(None, scores)
    if top_k:
        scores = lp.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = lp.TopPLogitsWarper(top_p)(None, scores)
    return scores > float("-inf"), scores


def ambiguous_rows(x, keep_before_p, top_p):
    """Rows where the mass before some token is within float32 rounding of top_p (HF sums fp32)."""
    probs = x.double().masked_fill(~keep_before_p, float("-inf")).softmax(-1)
    ordered = probs.sort(-1, descending=True).values
    before = ordered.cumsum(-1) - ordered
    return ((before - top_p).abs() < 1e-5).any(-1)


PARAMS = [(1.0, 0, 0.9), (0.7, 50, 0.9), (1.3, 5, 1.0), (1.0, 1, 1.0), (0.5, 0, 0.3), (2.0, 20, 0.05),
          (1.0, 3, 0.999), (0.9, 10, 0.55), (1.0, 0, 0.75), (1.0, 200, 1.0), (1.0, 64, 0.6)]


@pytest.mark.parametrize("temperature,top_k,top_p", PARAMS)
@pytest.mark.parametrize("vocab", [1, 7, 64, 300])
def test_kept_set_matches_transformers(temperature, top_k, top_p, vocab):
    logits = random_logits(400, vocab, seed=vocab * 31 + top_k)
    expected, hf_scores = hf_kept(logits, temperature, top_k, top_p)
    x, keep = ref.kept_mask(logits, temperature, top_k, top_p)
    skip = torch.zeros(logits.shape[0], dtype=torch.bool)
    if top_p < 1.0:
        _, after_k = ref.kept_mask(logits, temperature, top_k, 1.0)
        skip = ambiguous_rows(x, after_k, top_p)
    assert int(skip.sum()) <= 40, "too many rows at the float32 rounding boundary of top_p"
    out = ref.filter_logits(logits, temperature, top_k, top_p)
    # The same multiset of kept values per row. Among tokens of EQUAL value at the top-p crossing,
    # transformers keeps whichever torch's unstable sort happens to put last; the reference keeps the
    # same number of them, the highest indices first. Every other token is kept or removed identically.
    assert torch.equal(out[~skip].sort(-1).values, hf_scores[~skip].sort(-1).values)
    differs = (out > float("-inf")) != expected
    for r in differs.any(-1).nonzero()[:, 0].tolist():
        values = x[r][differs[r]]
        assert bool((values == values[0]).all()), "only tokens of one (the crossing) value may differ"


def test_ties_at_the_crossing_keep_the_higher_indices_first():
    logits = torch.zeros(1, 4)  # uniform: each token 0.25
    _, keep = ref.kept_mask(logits, top_p=0.3)  # before-mass 0, 0.25 (< 0.3), 0.5 -> two kept
    hf, _ = hf_kept(logits, 1.0, 0, 0.3)
    assert torch.equal(keep, hf) and keep.tolist() == [[False, False, True, True]]


def test_top_k_keeps_all_ties_of_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    _, keep = ref.kept_mask(logits, top_k=2)
    assert keep.tolist() == [[True, False, True, True, True, False]]


def test_greedy_takes_the_first_argmax_and_ignores_k_p():
    logits = torch.tensor([[1.0, 5.0, 5.0, float("-inf")], [-1.0, -3.0, -1.0, -2.0]])
    assert ref.sample(logits, temperature=0.0, top_k=3, top_p=0.1).tolist() == [1, 0]
    out = ref.filter_logits(logits, temperature=0.0)
    assert out[0, 1] == 5.0 and torch.isinf(out[0, [0, 2, 3]]).all() and out[1, 0] == -1.0


def test_per_row_parameters_equal_rowwise_calls():
    logits = random_logits(6, 50, seed=3)
    t = torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0, 0.8])
    k = torch.tensor([0, 5, 3, 1, 50, 10])
    p = torch.tensor([0.9, 1.0, 0.5, 0.3, 0.7, 1.0], dtype=torch.float64)
    batched = ref.filter_logits(logits, t, k, p)
    for r in range(6):
        row = ref.filter_logits(logits[r : r + 1], float(t[r]), int(k[r]), float(p[r]))
        assert torch.equal(batched[r : r + 1], row)
    seed = 1234
    tokens = ref.sample_with_seed(logits, seed, t, k, p)
    # a row's draw does not depend on the other rows
    alone = ref.sample_with_seed(logits[:3], seed, t[:3], k[:3], p[:3])
    assert torch.equal(tokens[:3], alone)


def test_generator_replays_and_advances():
    logits = torch.randn(64, 100)
    g = torch.Generator().manual_seed(7)
    a, b = ref.sample(logits, generator=g), ref.sample(logits, generator=g)
    g.manual_seed(7)
    assert torch.equal(ref.sample(logits, generator=g), a) and not torch.equal(a, b)


def test_draws_never_pick_removed_tokens_and_follow_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), 0.5]]).expand(20000, 5)
    probs = ref.probabilities(logits[:1], 1.0, 3, 0.95)[0]
    tokens = ref.sample_with_seed(logits, 99, 1.0, 3, 0.95)
    counts = torch.bincount(tokens, minlength=5).double() / tokens.numel()
    assert counts[probs == 0].sum() == 0
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "logits,match",
    [
        (torch.tensor([[0.0, float("nan")]]), "NaN"),
        (torch.tensor([[0.0, float("inf")]]), r"\+inf"),
        (torch.tensor([[float("-inf"), float("-inf")]]), "all -inf"),
    ],
)
def test_bad_values_raise(logits, match):
    with pytest.raises(ValueError, match=match):
        ref.sample(logits)


def test_temperature_overflow_raises():
    with pytest.raises(ValueError, match="overflows"):
        ref.filter_logits(torch.tensor([[1e30, 0.0]]), temperature=1e-20)
