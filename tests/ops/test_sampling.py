"""ops.sample / ops.filter_logits: every backend against the reference (kept sets, tokens, the drawn
distribution by a chi-square test), seeding, per-row parameters, greedy, bad inputs, opcheck."""
import functools

import pytest
import torch

from fusedlm import ops
from fusedlm.ops import _backends
from fusedlm.ops import sampling as sampling_ops
from fusedlm.reference import sampling as ref

HAS_TRITON = "triton" in ops.available_backends()
TRITON = pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")])
BACKENDS = ["reference", "cpu", TRITON]
# the cpu backend once per SIMD level this machine has (on_backend in tests/conftest.py)
CPU_ISAS = [f"cpu:{isa}" for isa in _backends.cpu_isa_levels()]
FAST_BACKENDS = ["reference", "cpu"]  # for many rows / large vocabularies (the interpreter is slow)


def quantised_logits(rows, vocab, seed, neg_inf=0.1):
    """Logits on a coarse grid (many ties), some -inf; every row keeps a finite value."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 24, (rows, vocab), generator=g) * 0.25 - 3.0
    logits[torch.rand(rows, vocab, generator=g) < neg_inf] = float("-inf")
    logits[:, -1] = logits[:, -1].clamp(min=-4.0)
    return logits.float()


# (temperature, top_k, top_p): top-p only, top-k only, both, off, greedy
PARAMS = [(1.0, 0, 0.9), (0.7, 5, 0.9), (1.0, 3, 1.0), (1.5, 0, 0.35), (1.0, 0, 1.0), (0.0, 0, 1.0), (0.8, 40, 0.6)]


@pytest.mark.parametrize("backend", ["reference", *CPU_ISAS, TRITON])
@pytest.mark.parametrize("temperature,top_k,top_p", PARAMS)
@pytest.mark.parametrize("vocab", [1, 17, 130])
def test_matches_reference(on_backend, backend, temperature, top_k, top_p, vocab):
    logits = quantised_logits(24 if backend != "triton" else 5, vocab, seed=vocab + top_k)  # the interpreter is slow
    expected = ref.filter_logits(logits, temperature, top_k, top_p)
    tokens = ref.sample_with_seed(logits, 4242, temperature, top_k, top_p)
    with on_backend(backend) as name:
        out = ops.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        inputs = sampling_ops.SamplingInputs(logits, *sampling_ops._params(logits, temperature, top_k, top_p), 4242)
        drawn = sampling_ops._sample_op(inputs, name)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert drawn.dtype == torch.int64 and torch.equal(drawn, tokens)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 5, 0.6)])
def test_triton_several_chunks_per_row(monkeypatch, temperature, top_k, top_p):
    from fusedlm.kernels import sampling as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 32)  # 130 columns = 5 chunks
    logits = quantised_logits(3, 130, seed=21)
    t, k, p = sampling_ops._params(logits, temperature, top_k, top_p)
    with ops.use_backend("triton"):
        out = ops.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        drawn = sampling_ops._sample_op(sampling_ops.SamplingInputs(logits, t, k, p, 99), "triton")
    assert torch.equal(out, ref.filter_logits(logits, temperature, top_k, top_p))
    assert torch.equal(drawn, ref.sample_with_seed(logits, 99, temperature, top_k, top_p))


@functools.lru_cache(maxsize=None)
def _large_vocab_case(vocab, temperature, top_k, top_p):
    """Logits with ties and without, and the reference's kept logits and tokens (once per case)."""
    logits = torch.cat([quantised_logits(8, vocab, seed=vocab), torch.randn(8, vocab, generator=torch.Generator().manual_seed(1)) * 3])
    return logits, ref.filter_logits(logits, temperature, top_k, top_p), ref.sample_with_seed(logits, 77, temperature, top_k, top_p)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 2500, 0.95), (1.0, 2500, 1.0), (0.6, 50, 0.8)])
@pytest.mark.parametrize("vocab", [3001, 5000])
def test_cpu_large_vocab_paths_match_reference(cpu_isa, temperature, top_k, top_p, vocab):
    # vocab > 2048 survivors: the histogram path (top-p) and the dense path (large top-k)
    logits, expected, tokens = _large_vocab_case(vocab, temperature, top_k, top_p)
    with ops.use_backend("cpu"):
        out = ops.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        inputs = sampling_ops.SamplingInputs(logits, *sampling_ops._params(logits, temperature, top_k, top_p), 77)
        drawn = sampling_ops._sample_op(inputs, "cpu")
    assert torch.equal(out, expected)
    assert torch.equal(drawn, tokens)


@pytest.mark.parametrize("backend", ["reference", *CPU_ISAS, TRITON])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_logits_and_row_strides(on_backend, backend, dtype):
    wide = quantised_logits(9, 80, seed=5).to(dtype)
    logits = wide[:, 3:67]  # rows 80 elements apart
    kw = dict(temperature=0.9, top_k=7, top_p=0.8)
    with on_backend(backend):
        out = ops.filter_logits(logits, **kw)
    assert torch.equal(out, ref.filter_logits(logits.contiguous(), 0.9, 7, 0.8))


@pytest.mark.parametrize("backend", ["reference", *CPU_ISAS, TRITON])
def test_per_row_parameters(on_backend, backend):
    logits = quantised_logits(6, 40, seed=11)
    t = torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0, 0.8])
    k = torch.tensor([0, 5, 3, 1, 40, 10], dtype=torch.int32)
    p = torch.tensor([0.9, 1.0, 0.5, 0.3, 0.7, 1.0])
    with on_backend(backend):
        out = ops.filter_logits(logits, temperature=t, top_k=k, top_p=p)
        g = torch.Generator().manual_seed(3)
        tokens = ops.sample(logits, temperature=t, top_k=k, top_p=p, generator=g)
        g.manual_seed(3)
        first = ops.sample(logits[:2], temperature=t[:2], top_k=k[:2], top_p=p[:2], generator=g)
    assert torch.equal(out, ref.filter_logits(logits, t, k, p.double()))
    assert torch.equal(tokens[:2], first)  # a row's draw does not depend on the other rows
    assert tokens[2] == int(logits[2].argmax())


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_replays_and_advances(backend):
    logits = torch.randn(32 if backend != "triton" else 6, 50)
    g = torch.Generator().manual_seed(123)
    with ops.use_backend(backend):
        a = ops.sample(logits, top_p=0.95, generator=g)
        b = ops.sample(logits, top_p=0.95, generator=g)
        g.manual_seed(123)
        again = ops.sample(logits, top_p=0.95, generator=g)
    assert torch.equal(a, again) and not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_takes_first_maximum(backend):
    logits = torch.tensor([[1.0, 7.0, 7.0, float("-inf")], [float("-inf"), -2.0, -3.0, -2.0]])
    with ops.use_backend(backend):
        assert ops.sample(logits, temperature=0.0, top_k=2, top_p=0.1).tolist() == [1, 1]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of the chi-square statistic of `counts` against `probs` (cells with p > 0)."""
    n = counts.sum()
    live = probs > 0
    assert counts[~live].sum() == 0, "a removed token was drawn"
    expected = probs[live] * n
    stat = ((counts[live] - expected) ** 2 / expected).sum()
    dof = int(live.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


CHI_PARAMS = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 4, 1.0), (0.8, 5, 0.75), (2.0, 0, 0.5)]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("temperature,top_k,top_p", CHI_PARAMS)
def test_drawn_distribution_chi_square(backend, temperature, top_k, top_p):
    row = torch.tensor([[0.3, -1.0, 2.0, 2.0, float("-inf"), 0.9, 1.5, -0.2, 1.5, 0.0]])
    probs = ref.probabilities(row, temperature, top_k, top_p)[0]
    logits = row.expand(200_000, -1)
    with ops.use_backend(backend):
        tokens = ops.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(2024))
    counts = torch.bincount(tokens, minlength=row.shape[1]).double()
    assert chi_square_p_value(counts, probs) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "logits,kwargs,error,match",
    [
        (torch.tensor([[0.0, float("nan")]]), {}, ValueError, "NaN"),
        (torch.tensor([[0.0, float("inf")]]), {}, ValueError, r"\+inf"),
        (torch.tensor([[0.0, 1.0], [float("-inf")] * 2]), {}, ValueError, "all -inf"),
        (torch.tensor([[1e30, 0.0]]), {"temperature": 1e-20}, ValueError, "overflows"),
    ],
)
def test_bad_values(backend, logits, kwargs, error, match):
    with ops.use_backend(backend), pytest.raises(error, match=match):
        ops.sample(logits, **kwargs)
    with ops.use_backend(backend), pytest.raises(error, match=match):
        ops.filter_logits(logits, **kwargs)


@pytest.mark.parametrize(
    "logits,kwargs,error,match",
    [
        (torch.zeros(2, 3), {"temperature": -0.5}, ValueError, "temperature"),
        (torch.zeros(2, 3), {"temperature": float("nan")}, ValueError, "temperature"),
        (torch.zeros(2, 3), {"top_p": 0.0}, ValueError, "top_p"),
        (torch.zeros(2, 3), {"top_p": 1.5}, ValueError, "top_p"),
        (torch.zeros(2, 3), {"top_k": -1}, ValueError, "top_k"),
        (torch.zeros(2, 3), {"top_k": 2.5}, TypeError, "top_k"),
        (torch.zeros(2, 3), {"top_k": True}, TypeError, "top_k"),
        (torch.zeros(2, 3), {"temperature": torch.ones(3)}, ValueError, r"temperature.*shape \[2\]"),
        (torch.zeros(2, 3), {"top_p": torch.tensor([0.5, 0.0])}, ValueError, "top_p"),
        (torch.zeros(2, 3), {"top_k": torch.ones(2)}, TypeError, "top_k.*integer"),
        (torch.zeros(2, 3), {"temperature": torch.ones(2, dtype=torch.int64)}, TypeError, "temperature.*floating"),
        (torch.zeros(2, 3), {"top_p": torch.ones(2, 1)}, ValueError, "top_p"),
        (torch.zeros(2, 3, dtype=torch.int64), {}, TypeError, "logits"),
        (torch.zeros(3), {}, ValueError, "logits.*2 dimensions"),
        (torch.zeros(2, 0), {}, ValueError, "logits.*column"),
        ([[0.0, 1.0]], {}, TypeError, "logits"),
    ],
)
def test_bad_arguments(logits, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.sample(logits, **kwargs)
    with pytest.raises(error, match=match):
        ops.filter_logits(logits, **kwargs)


def test_bad_generator():
    with pytest.raises(TypeError, match="generator"):
        ops.sample(torch.zeros(1, 3), generator=3)


def test_empty_batch():
    assert ops.sample(torch.zeros(0, 5)).shape == (0,)
    assert ops.filter_logits(torch.zeros(0, 5)).shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logits = quantised_logits(4, 33, seed=9)
    inputs = sampling_ops.SamplingInputs(logits, *sampling_ops._params(logits, 0.8, 5, 0.9), 17)
    # the schema's arguments: the record's fields, then the backend
    torch.library.opcheck(torch.ops.fusedlm.sample.default, (*inputs, backend))
    torch.library.opcheck(torch.ops.fusedlm.filter_logits.default, (*inputs._replace(seed=0), backend))
