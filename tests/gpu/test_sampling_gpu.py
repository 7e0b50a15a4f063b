"""Sampling kernels on a CUDA device (cuda and triton backends) against the reference; skipped without CUDA."""
import pytest
import torch

from fusedlm import ops
from fusedlm.ops import sampling as sampling_ops
from fusedlm.reference import sampling as ref

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in ops.available_backends()]


def _backends():
    if not GPU_BACKENDS:
        pytest.skip("neither the cuda nor the triton backend is available")
    return GPU_BACKENDS


def quantised_logits(rows, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 24, (rows, vocab), generator=g) * 0.25 - 3.0
    logits[torch.rand(rows, vocab, generator=g) < 0.1] = float("-inf")
    logits[:, -1] = logits[:, -1].clamp(min=-4.0)
    return logits.float()


def assert_kept_sets_agree(got, expected, logits, temperature, top_k, top_p, tol=1e-5):
    """got == expected, except for tokens whose tie group straddles the top-p boundary within `tol`.

    On a GPU the kernels' masses are float32 exp (``ex2.approx`` in Triton) summed in float64; the
    reference's are float64. A kept set can then differ only where the probability ranked above a
    value is within rounding of top_p: such tokens may be in one set and not the other. Kept values
    must be equal wherever both keep a token.
    """
    got, expected = got.cpu(), expected.cpu()
    if torch.equal(got, expected):
        return
    both = torch.isfinite(got) & torch.isfinite(expected)
    assert torch.equal(got[both], expected[both]), "kept values differ"
    probs = ref.probabilities(logits.cpu(), temperature, top_k, 1.0)  # float64, before top-p
    p_row = torch.as_tensor(top_p, dtype=torch.float64).expand(logits.shape[0])
    x, _ = ref.kept_mask(logits.cpu(), temperature, top_k, 1.0)  # logits / temperature, as the reference has them
    for row in (torch.isfinite(got) != torch.isfinite(expected)).any(1).nonzero()[:, 0].tolist():
        for i in (torch.isfinite(got[row]) != torch.isfinite(expected[row])).nonzero()[:, 0].tolist():
            v = x[row, i]
            above = float(probs[row][x[row] > v].sum())
            ties = float(probs[row][x[row] == v].sum())
            p = float(p_row[row])
            assert above - tol <= p <= above + ties + tol, (row, i, above, ties, p)


PARAMS = [(1.0, 0, 0.9), (0.7, 50, 0.9), (1.0, 50, 1.0), (1.5, 0, 0.35), (1.0, 0, 1.0), (0.0, 0, 1.0), (0.8, 3000, 0.6)]


@pytest.mark.parametrize("temperature,top_k,top_p", PARAMS)
@pytest.mark.parametrize("vocab", [1, 17, 1000, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(temperature, top_k, top_p, vocab, dtype):
    logits = torch.cat([quantised_logits(16, vocab, seed=vocab), torch.randn(16, vocab) * 3]).to(dtype)
    expected = ref.filter_logits(logits, temperature, top_k, top_p)
    tokens = ref.sample_with_seed(logits, 4242, temperature, top_k, top_p)
    x = logits.cuda()
    for backend in _backends():
        with ops.use_backend(backend):
            out = ops.filter_logits(x, temperature=temperature, top_k=top_k, top_p=top_p)
            inputs = sampling_ops.SamplingInputs(x, *sampling_ops._params(x, temperature, top_k, top_p), 4242)
            drawn = sampling_ops._sample_op(inputs, backend)
        assert_kept_sets_agree(out, expected, logits, temperature, top_k, top_p)
        # float32 exp on the GPU vs float64 in the reference: a draw may differ only when its
        # uniform falls within rounding of a boundary
        assert int((drawn.cpu() != tokens).sum()) <= 1, backend


def test_per_row_params_seeding_and_errors():
    logits = quantised_logits(6, 300, seed=3).cuda()
    t = torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0, 0.8], device="cuda")
    k = torch.tensor([0, 5, 3, 1, 40, 10], device="cuda")
    p = torch.tensor([0.9, 1.0, 0.5, 0.3, 0.7, 1.0], device="cuda")
    for backend in _backends():
        with ops.use_backend(backend):
            out = ops.filter_logits(logits, temperature=t, top_k=k, top_p=p)
            g = torch.Generator(device="cuda").manual_seed(5)
            a, _ = ops.sample(logits, temperature=t, top_k=k, top_p=p, generator=g), ops.sample(logits, generator=g)
            g.manual_seed(5)
            assert torch.equal(ops.sample(logits, temperature=t, top_k=k, top_p=p, generator=g), a)
            with pytest.raises(ValueError, match="NaN"):
                ops.sample(torch.tensor([[0.0, float("nan")]], device="cuda"))
        assert_kept_sets_agree(out, ref.filter_logits(logits.cpu(), t.cpu(), k.cpu(), p.cpu().double()), logits, t.cpu(),
                               k.cpu(), p.cpu().double())


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.9), (0.8, 5, 0.75)])
def test_drawn_distribution_chi_square(temperature, top_k, top_p):
    row = torch.tensor([[0.3, -1.0, 2.0, 2.0, float("-inf"), 0.9, 1.5, -0.2, 1.5, 0.0]])
    probs = ref.probabilities(row, temperature, top_k, top_p)[0]
    logits = row.expand(200_000, -1).cuda()
    for backend in _backends():
        with ops.use_backend(backend):
            tokens = ops.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=torch.Generator(device="cuda").manual_seed(1))
        counts = torch.bincount(tokens.cpu(), minlength=10).double()
        live = probs > 0
        assert counts[~live].sum() == 0
        expected = probs[live] * counts.sum()
        stat = ((counts[live] - expected) ** 2 / expected).sum()
        dof = torch.tensor((int(live.sum()) - 1) / 2, dtype=torch.float64)
        assert float(torch.special.gammaincc(dof, stat / 2)) > 1e-3, backend


@pytest.mark.parametrize("vocab", [128256, 151936, 256000])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 50, 0.9), (1.0, 0, 0.95), (0.0, 0, 1.0)])
def test_large_vocabularies(vocab, temperature, top_k, top_p):
    """LLM vocabularies (LLaMA-3 128K, Qwen 152K, Gemma 256K) in bf16 rows: kept sets and greedy
    tokens as the reference's, draws agreeing on all but rounding-boundary rows."""
    g = torch.Generator(device="cuda").manual_seed(vocab)
    logits = (torch.randn(6, vocab, device="cuda", generator=g) * 4).to(torch.bfloat16)
    logits[1, : vocab // 2] = float("-inf")
    expected = ref.filter_logits(logits.cpu(), temperature, top_k, top_p)
    tokens = ref.sample_with_seed(logits.cpu(), 7, temperature, top_k, top_p)
    for backend in _backends():
        with ops.use_backend(backend):
            out = ops.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            inputs = sampling_ops.SamplingInputs(logits, *sampling_ops._params(logits, temperature, top_k, top_p), 7)
            drawn = sampling_ops._sample_op(inputs, backend)
        assert_kept_sets_agree(out, expected, logits, temperature, top_k, top_p)
        assert int((drawn.cpu() != tokens).sum()) <= 1, backend
        if temperature == 0.0:
            assert torch.equal(drawn.cpu(), tokens), backend
