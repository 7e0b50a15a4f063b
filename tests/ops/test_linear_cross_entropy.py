"""ops.linear_cross_entropy: every backend against the reference (loss, argmax, gradients), the
edges, opcheck, a memory probe (the [tokens, vocab] logits are never allocated), bad input."""
import importlib

import pytest
import torch

from fusedlm import ops
from fusedlm.ops import _backends
from fusedlm.reference import linear_cross_entropy as ref

lce_ops = importlib.import_module("fusedlm.ops.linear_cross_entropy")  # ops.linear_cross_entropy is the function

HAS_TRITON = "triton" in ops.available_backends()
TRITON = pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")])
BACKENDS = ["reference", *(f"cpu:{isa}" for isa in _backends.cpu_isa_levels()), TRITON]
# float32 logits agree to rounding; 16-bit logits are rounded once (the same rounding on both
# sides), the gradient chunks are 16-bit too
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}
GRAD_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
            torch.float16: dict(atol=5e-3, rtol=5e-3)}


def _case(m, d, v, dtype=torch.float32, bias=False, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * d**-0.5 * 3).to(dtype)
    b = (torch.randn(v, generator=g)).to(dtype) if bias else None
    t = torch.randint(0, v, (m,), generator=g)
    t[torch.rand(m, generator=g) < ignored] = -100
    return h, w, b, t


SHAPES = [(1, 16, 7), (37, 24, 101), (64, 32, 1000), (9, 40, 33)]  # M, d, V: odd ones too


def _run(fn, h, w, b, t, reduction, **kw):
    out = fn(h, w, t, bias=b, reduction=reduction, **kw)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_argmax_match_reference(on_backend, backend, dtype, shape, reduction):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    h, w, b, t = _case(*shape, dtype=dtype, bias=shape[0] % 2 == 1)
    expected, expected_argmax = ref.linear_cross_entropy(h, w, t, bias=b, reduction=reduction)
    with on_backend(backend):
        got, argmax = ops.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, return_argmax=True, chunk_size=8)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected.float(), **TOL[dtype])
    if dtype == torch.float32:  # 16-bit logits may tie where the reference's do not: compare the picked values
        assert torch.equal(argmax, expected_argmax)
    else:
        logits = torch.nn.functional.linear(h, w, b).float()
        kept = t != -100
        assert torch.equal(argmax[~kept], expected_argmax[~kept])
        picked = logits[kept].gather(1, argmax[kept][:, None]).squeeze(1)
        torch.testing.assert_close(picked, logits[kept].max(1).values)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("train_weight", [True, False])
def test_grads_match_reference_autograd(on_backend, backend, dtype, reduction, train_weight):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    h, w, b, t = _case(29, 24, 101, dtype=dtype, bias=True)
    leaves = {"h": h.requires_grad_(), "w": w.requires_grad_(train_weight), "b": b.requires_grad_(train_weight)}
    want = [leaves["h"]] + ([leaves["w"], leaves["b"]] if train_weight else [])
    g_out = torch.randn(29) if reduction == "none" else torch.tensor(0.7)
    expected = torch.autograd.grad(ref.linear_cross_entropy(h, w, t, bias=b, reduction=reduction)[0], want, g_out)
    with on_backend(backend):
        loss = ops.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_size=5)
    got = torch.autograd.grad(loss, want, g_out)
    for name, x, y in zip(["h", "weight", "bias"], got, expected):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x.float(), y.float(), **GRAD_TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_edges(on_backend, backend):
    h, w, _, t = _case(6, 16, 11, ignored=0.0)
    t[:] = -100
    hl = h.clone().requires_grad_()
    with on_backend(backend):
        mean, argmax = ops.linear_cross_entropy(hl, w, t, return_argmax=True)
        rows = ops.linear_cross_entropy(h, w, t, reduction="none")
    assert mean.item() == 0.0 and torch.equal(argmax, torch.full((6,), -1)) and torch.equal(rows, torch.zeros(6))
    mean.backward()
    assert torch.equal(hl.grad, torch.zeros_like(h))
    t[2] = 3  # one kept row: its loss alone, the others 0 and no gradient
    with on_backend(backend):
        rows = ops.linear_cross_entropy(h, w, t, reduction="none")
        g = torch.autograd.grad(ops.linear_cross_entropy(hl, w, t), hl)[0]
    expected = torch.logsumexp(h[2] @ w.T, 0) - (h[2] @ w[3])
    torch.testing.assert_close(rows[2], expected)
    assert rows[[0, 1, 3, 4, 5]].abs().max() == 0 and g[[0, 1, 3, 4, 5]].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_custom_ignore_index(on_backend, backend):
    h, w, _, t = _case(12, 16, 19, ignored=0.0)
    t[::4] = 7  # the "ignored" value here is a real class id, as some datasets use
    expected = ref.linear_cross_entropy(h, w, t, ignore_index=7, reduction="none")[0]
    with on_backend(backend):
        got = ops.linear_cross_entropy(h.view(3, 4, 16), w, t.view(3, 4), ignore_index=7, reduction="none")
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.view(-1), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_give_nan(on_backend, backend):
    h, w, _, t = _case(4, 8, 10, ignored=0.0)
    h[1, 0] = float("nan")
    h[2, 0] = float("inf")
    with on_backend(backend):
        rows = ops.linear_cross_entropy(h, w, t, reduction="none")
    assert torch.isfinite(rows[[0, 3]]).all() and not torch.isfinite(rows[[1, 2]]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_does_not_change_the_result(on_backend, backend):
    h, w, b, t = _case(50, 16, 40, bias=True)
    h.requires_grad_()
    w.requires_grad_()
    with on_backend(backend):
        results = []
        for chunk in (1, 7, 50, None):
            loss = ops.linear_cross_entropy(h, w, t, bias=b, chunk_size=chunk)
            results.append((loss, *torch.autograd.grad(loss, (h, w))))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_autocast_runs_the_head_in_bf16_with_float32_master_gradients():
    h, w, _, t = _case(33, 32, 70)
    h.requires_grad_()
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(h, w, t)
        expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), t)  # bf16 logits too
    torch.testing.assert_close(loss, expected, atol=2e-3, rtol=2e-3)
    gh, gw = torch.autograd.grad(loss, (h, w))
    eh, ew = torch.autograd.grad(expected, (h, w))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gh, eh, atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(gw, ew, atol=2e-3, rtol=5e-2)


def test_gradcheck_float64():
    h, w, b, t = _case(7, 5, 9, dtype=torch.float64, bias=True)
    leaves = [x.requires_grad_() for x in (h, w, b)]
    with ops.use_backend("reference"):
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(
                lambda h, w, b: ops.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_size=3), leaves)


@pytest.mark.parametrize("backend", ["reference", "cpu", TRITON])
def test_opcheck(backend):
    h, w, b, t = _case(6, 16, 20, bias=True, ignored=0.0)
    base = lce_ops.LinearCrossEntropyInputs(h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), t, -100, 1 / 6,
                                            False, True, True, True, 4)
    for checked in (base, base._replace(per_row=True), base._replace(per_row=True, grad_weight=False, grad_bias=False)):
        torch.library.opcheck(lce_ops._linear_cross_entropy_op.custom_op, (*checked, backend))


def test_memory_probe_never_allocates_the_full_logits():
    """Vocabulary 128256, 4 x 512 tokens: no allocation during the loss's forward and backward is
    as large as the [tokens, vocab] logits; the largest is at most one chunk's."""
    from torch.profiler import ProfilerActivity, profile

    tokens, d, n_vocab = 4 * 512, 64, 128256
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, d, generator=g, requires_grad=True)
    w = torch.randn(n_vocab, d, generator=g) * 0.1
    t = torch.randint(0, n_vocab, (tokens,), generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ops.linear_cross_entropy(h, w, t).backward()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]
    logits_bytes = tokens * n_vocab * 4
    chunk_bytes = lce_ops.chunk_rows(n_vocab, torch.float32) * n_vocab * 4
    assert sizes and max(sizes) <= chunk_bytes < logits_bytes / 8
    # and the live bytes during the loss never reach the logits' size either
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    assert peak < chunk_bytes + 4 * tokens * d * 4 + (1 << 20)


def _bad(**changes):
    h, w, _, t = _case(4, 8, 10, ignored=0.0)
    args = dict(h=h, weight=w, targets=t, bias=None, ignore_index=-100, reduction="mean", chunk_size=None)
    args.update(changes)
    return lambda: ops.linear_cross_entropy(args["h"], args["weight"], args["targets"], bias=args["bias"],
                                            ignore_index=args["ignore_index"], reduction=args["reduction"],
                                            chunk_size=args["chunk_size"])


@pytest.mark.parametrize("changes,error,match", [
    (dict(h=torch.randint(0, 3, (4, 8))), TypeError, "h"),
    (dict(h=torch.tensor(1.0)), ValueError, "h"),
    (dict(weight=torch.randn(10, 9)), ValueError, "weight"),
    (dict(weight=torch.randn(10, 8, dtype=torch.bfloat16)), TypeError, "weight"),
    (dict(targets=torch.zeros(4, dtype=torch.int32)), TypeError, "targets"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.tensor([0, 1, 10, 2])), ValueError, r"targets must lie in \[0, 10\)"),
    (dict(targets=torch.tensor([0, 1, -1, 2])), ValueError, "targets"),
    (dict(bias=torch.randn(9)), ValueError, "bias"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(h=torch.randn(4, 8, device="meta")), ValueError, "device"),
])
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        _bad(**changes)()


def test_torch_compile_forward_and_backward(fresh_inductor_cache):
    h, w, _, t = _case(16, 16, 30, ignored=0.0)
    hl = h.clone().requires_grad_()
    compiled = torch.compile(lambda h: ops.linear_cross_entropy(h, w, t))
    loss = compiled(hl)
    loss.backward()
    h_ref = h.clone().requires_grad_()
    expected = ref.linear_cross_entropy(h_ref, w, t)[0]
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hl.grad, h_ref.grad)
