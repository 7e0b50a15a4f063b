"""ops.attention: every backend against the reference (outputs and gradients), its autograd and
torch.library wiring, the edge cases of DESIGN.md rule 3, and argument checks."""
import importlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedlm import ops
from fusedlm.ops import _backends
from fusedlm.reference import attention as ref

attention_module = importlib.import_module("fusedlm.ops.attention")  # ops.attention is the function

HAS_CPU = "cpu" in ops.available_backends()
TOL = {  # (atol, rtol) for the output and for the gradients
    torch.float32: ((2e-5, 1e-4), (1e-4, 1e-3)),
    torch.bfloat16: ((2e-2, 2e-2), (6e-2, 3e-2)),
}


def _inputs(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


def _bias(kind, b, hq, nq, nk, seed=1):
    shapes = {None: None, "full": (b, hq, nq, nk), "heads": (1, hq, nq, nk), "batch": (b, 1, nq, nk),
              "keys": (nk,), "3d": (hq, nq, nk)}
    shape = shapes[kind]
    return None if shape is None else torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _run(backend, q, k, v, grad_out=None, **kw):
    """Output and gradients (q, k, v, bias) of ops.attention on `backend`, on fresh leaves."""
    q, k, v = (t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v))
    bias = kw.pop("bias", None)
    if bias is not None:
        bias = bias.detach().clone().requires_grad_(grad_out is not None)
    with ops.use_backend(backend):
        out = ops.attention(q, k, v, bias=bias, **kw)
    if grad_out is None:
        return out, ()
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    return out, torch.autograd.grad(out, inputs, grad_out)


_REFERENCE: dict = {}  # reference results of the tests that run once per SIMD level, by their `cache` key


def _check_backend(backend, q, k, v, *, grads=True, cache=None, **kw):
    dtype = q.dtype
    (atol, rtol), (gatol, grtol) = TOL[dtype]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype) if grads else None
    out, got = _run(backend, q, k, v, grad_out, **dict(kw))
    reference = _REFERENCE.get(cache) if cache is not None else None
    if reference is None:
        reference = _run("reference", q, k, v, grad_out, **dict(kw))
        if cache is not None:
            _REFERENCE[cache] = reference
    want_out, want = reference
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want_out, atol=atol, rtol=rtol)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert torch.isfinite(g).all(), name
        scale = max(1.0, float(w.float().abs().max()))  # gradients grow with N: compare relative to their size
        torch.testing.assert_close(g.float(), w.float(), atol=gatol * scale, rtol=grtol, msg=lambda m: f"{name}: {m}")


# (B, Hq, Hkv, Nq, Nk, D, mask, prefix_len, padding, bias): a sample of the cross product of the
# issue's grid (Nq in {1, 17, 128}, Nk in {1, 33, 257}, D in {16, 64, 80, 128}, Hq/Hkv in {1, 4, 8})
# in which every value and every feature appears, several together.
CASES = [
    (2, 4, 4, 17, 33, 16, "causal", None, None, None),
    (1, 8, 1, 128, 257, 64, "prefix", "rows", "random", None),
    (2, 4, 1, 1, 257, 80, "causal", None, "random", None),
    (2, 8, 1, 128, 33, 128, "bidirectional", None, None, "heads"),
    (2, 4, 4, 17, 1, 64, "causal", None, None, None),  # Nq > Nk: the first 16 queries see nothing
    (2, 4, 4, 128, 257, 80, "prefix", 100, None, "batch"),
    (1, 4, 4, 17, 257, 128, "bidirectional", None, "random", "keys"),
    (2, 8, 2, 1, 1, 16, "bidirectional", None, None, "3d"),
    (2, 4, 1, 128, 128, 16, "prefix", "rows", "one-empty", "full"),  # batch 0: every key is padding
    (1, 8, 8, 128, 33, 64, "causal", None, None, None),  # Nq > Nk, several tiles of fully hidden rows
]


def _case_kwargs(case):
    b, hq, hkv, nq, nk, d, mask, prefix, padding, bias = case
    kw = {"mask": mask, "bias": _bias(bias, b, hq, nq, nk)}
    if prefix == "rows":
        kw["prefix_len"] = torch.linspace(0, nk, b).round().long()  # per-row, includes 0 and Nk
    elif prefix is not None:
        kw["prefix_len"] = prefix
    if padding is not None:
        pad = torch.rand(b, nk, generator=torch.Generator().manual_seed(3)) > 0.25
        if padding == "one-empty":
            pad[0] = False
        kw["key_padding_mask"] = pad
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_cpu_matches_reference(cpu_isa, case, dtype):
    q, k, v = _inputs(*case[:6], dtype=dtype)
    _check_backend("cpu", q, k, v, cache=(case, dtype), **_case_kwargs(case))


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), hkv=st.integers(1, 2), nq=st.integers(1, 70),
    nk=st.integers(1, 140), d=st.sampled_from([1, 8, 17, 32, 80]), mask=st.sampled_from(list(ref.MASK_MODES)),
    pad=st.booleans(), bias=st.sampled_from([None, "heads", "batch"]), seed=st.integers(0, 1000),
)
def test_cpu_matches_reference_random(b, group, hkv, nq, nk, d, mask, pad, bias, seed):
    if not HAS_CPU:
        pytest.skip("fusedlm._C is not built")
    q, k, v = _inputs(b, hkv * group, hkv, nq, nk, d, seed=seed)
    g = torch.Generator().manual_seed(seed)
    kw = {"mask": mask, "bias": _bias(bias, b, hkv * group, nq, nk, seed)}
    if mask == "prefix":
        kw["prefix_len"] = torch.randint(0, nk + 1, (b,), generator=g)
    if pad:
        kw["key_padding_mask"] = torch.rand(b, nk, generator=g) > 0.3
    _check_backend("cpu", q, k, v, **kw)


def test_cpu_fully_masked_rows_are_zero_with_zero_grads(cpu_isa):
    q, k, v = _inputs(2, 2, 1, 5, 3, 16)
    pad = torch.tensor([[False, False, False], [True, True, True]])
    bias = torch.zeros(1, 1, 5, 3)
    bias[..., 4, :] = float("-inf")  # the last query: every visible score is -inf
    grad_out = torch.ones_like(q)
    out, (dq, dk, dv, db) = _run("cpu", q, k, v, grad_out, mask="causal", key_padding_mask=pad, bias=bias)
    # Nq=5 > Nk=3: queries 0 and 1 see nothing causally; batch 0 sees nothing at all
    assert (out[0] == 0).all() and (out[1, :, :2] == 0).all() and (out[1, :, 4] == 0).all()
    assert (dq[0] == 0).all() and (dq[1, :, :2] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    for t in (out, dq, dk, dv, db):
        assert torch.isfinite(t).all()
    _check_backend("cpu", q, k, v, mask="causal", key_padding_mask=pad, bias=bias)


NAN_CASES = [  # (where the NaN goes, Nq, Nk): the tiled path, the decode path, decode split into key chunks
    (where, nq, nk) for where in ("q", "q-inf", "k-visible", "k-hidden", "v-visible", "bias") for nq, nk in ((5, 7), (1, 300))
] + [("q", 4, 1500), ("k-visible", 4, 1500)]


def _nan_inputs(where, nq, nk, dtype):
    q, k, v = _inputs(1, 4, 2, nq, nk, 16, dtype=dtype)
    bias = torch.zeros(1, 4, nq, nk) if where == "bias" else None
    i = nq // 2
    if where in ("q", "q-inf"):
        q[0, 1, i, 3] = float("nan") if where == "q" else float("inf")
    elif where == "k-visible":
        k[0, 0, 1, 0] = float("nan")  # key 1: seen by every query (causal, Nk >= Nq)
    elif where == "k-hidden":
        k[0, 0, nk - 1, 0] = float("nan")  # the last key: seen by the last query only
    elif where == "v-visible":
        v[0, 1, 1, 5] = float("nan")
    else:
        bias[0, 2, i, 1] = float("nan")
    return q, k, v, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", NAN_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_nan_rows_are_nan_on_every_backend(cpu_isa, case, dtype):
    # DESIGN.md rule 3 and ops.attention's docstring: a NaN (or a +inf score) in what a row sees makes
    # that row NaN (a NaN in v: the entries it reaches), never zeros; the other rows are untouched.
    # The reference defines it.
    where, nq, nk = case
    q, k, v, bias = _nan_inputs(where, nq, nk, dtype)
    want = ref.attention(q, k, v, ref.CAUSAL, None, None, bias, 16 ** -0.5)
    rows = want.isnan().any(-1)
    assert rows.any() and not rows.all()
    backends = [("cpu", "cpu")]
    if dtype == torch.float32 and "triton" in ops.available_backends():
        if torch.cuda.is_available():
            backends.append(("triton", "cuda"))  # the compiled kernel
        elif cpu_isa == _backends.cpu_isa_levels()[-1] and nk < 1500:
            backends.append(("triton", "cpu"))  # interpreted (slow): once, not per SIMD level of the cpu kernels
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if nk >= 1500 else 1)  # two threads split the 1500 keys into chunks
        for backend, device in backends:
            args = [t.to(device) for t in (q, k, v)]
            with ops.use_backend(backend):
                out = ops.attention(*args, bias=None if bias is None else bias.to(device)).cpu()
            assert torch.equal(out.isnan(), want.isnan()), backend  # the same entries are NaN
            (atol, rtol), _ = TOL[dtype]
            torch.testing.assert_close(out[~rows], want[~rows], atol=atol, rtol=rtol)
    finally:
        torch.set_num_threads(before)


def test_cpu_nan_row_lse_is_nan():
    q, k, v, _ = _nan_inputs("q", 5, 7, torch.float32)
    out, lse = _cpu_out_lse(q, k, v, ref.CAUSAL, None, None, None)
    want_out, want_lse = ref.attention_lse(q, k, v, ref.CAUSAL, None, None, None, 16 ** -0.5)
    assert torch.equal(lse.isnan(), want_lse.isnan()) and lse.isnan().any()


@pytest.mark.parametrize("scale", [0.0, -0.7, 2.5])
def test_cpu_any_scale(cpu_isa, scale):
    q, k, v = _inputs(1, 2, 2, 9, 140, 16)
    pad = torch.ones(1, 140, dtype=torch.bool)
    pad[0, 5] = False
    _check_backend("cpu", q, k, v, mask="prefix", prefix_len=70, key_padding_mask=pad, scale=scale)


def test_cpu_strided_inputs(cpu_isa):
    # [B, N, H, D] memory viewed as [B, H, N, D] (the layout of a fused QKV projection), and a
    # k whose last dimension is not contiguous.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 70, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 2, 16, 130, generator=g).transpose(2, 3)
    v = torch.randn(2, 130, 2, 16, generator=g).transpose(1, 2)
    _check_backend("cpu", q, k, v, mask="causal")


def test_cpu_threads_do_not_change_results():
    if not HAS_CPU:
        pytest.skip("fusedlm._C is not built")
    q, k, v = _inputs(1, 8, 2, 200, 300, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, g1 = _run("cpu", q, k, v, torch.ones_like(q), mask="prefix", prefix_len=50)
        torch.set_num_threads(2)
        two, g2 = _run("cpu", q, k, v, torch.ones_like(q), mask="prefix", prefix_len=50)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, atol=0, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # dq splits may sum in another order


def test_auto_choice_uses_cpu_and_float16_falls_back_with_a_warning():
    if not HAS_CPU:
        pytest.skip("fusedlm._C is not built")
    q, k, v = _inputs(1, 2, 2, 4, 4, 8)
    assert attention_module._forward.choose(q.device, dtype=q.dtype, head_dim=8) == "cpu"
    assert attention_module._forward.choose(q.device, dtype=torch.bfloat16, head_dim=8) == "cpu"
    with pytest.raises(RuntimeError, match="cpu kernel supports float32 and bfloat16"):
        with ops.use_backend("cpu"):
            ops.attention(q.half(), k.half(), v.half())


# ---- torch.library wiring -------------------------------------------------------------------

def _op_inputs(dtype=torch.float32, bias=True, mode=ref.PREFIX):
    q, k, v = (t.requires_grad_(True) for t in _inputs(2, 4, 2, 9, 70, 16, dtype=dtype))
    prefix = torch.tensor([3, 70]) if mode == ref.PREFIX else None
    pad = torch.rand(2, 70, generator=torch.Generator().manual_seed(0)) > 0.2
    b = torch.randn(1, 4, 9, 70, dtype=dtype, requires_grad=True) if bias else None
    return attention_module.AttentionInputs(q, k, v, mode, prefix, pad, b, 0.25, 0.0, None)


def _opcheck(inputs, backend):
    """torch.library.opcheck of fusedlm::attention, called with the schema's arguments: the record's fields, the backend."""
    torch.library.opcheck(attention_module._attention_op.custom_op, (*inputs, backend))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mode", [ref.CAUSAL, ref.PREFIX])
def test_opcheck(backend, mode):
    if backend not in ops.available_backends():
        pytest.skip(f"{backend} not available")
    _opcheck(_op_inputs(mode=mode), backend)
    _opcheck(_op_inputs(bias=False, mode=mode), backend)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("mask", list(ref.MASK_MODES))
def test_gradcheck_float64(mask, dropout_p):
    # The registered backward (recomputation from the saved lse, written out in
    # reference.attention_backward and mirrored by the kernels) against finite differences. With
    # dropout, a fixed generator seed fixes the mask: the op is then a deterministic function.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 1, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[True] * 6, [True, False] * 3])
    kw = {"mask": mask, "key_padding_mask": pad}
    if mask == "prefix":
        kw["prefix_len"] = torch.tensor([0, 4])

    def f(q, k, v, bias):
        return ops.attention(q, k, v, bias=bias, dropout_p=dropout_p, generator=torch.Generator().manual_seed(2), **kw)

    with ops.use_backend("reference"):
        assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_compile():
    # The whole call traces into one graph (argument checks, backend choice, the custom op):
    # traceable dispatch is a design point (ops/_backends.py).
    q, k, v = _inputs(1, 2, 2, 9, 9, 16)
    f = torch.compile(lambda q, k, v: ops.attention(q, k, v, mask="prefix", prefix_len=3), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), ref.attention(q, k, v, ref.PREFIX, 3), atol=2e-5, rtol=1e-4)


# ---- argument checks --------------------------------------------------------------------------

def _bad(**changes):
    q, k, v = _inputs(2, 4, 2, 5, 6, 8)
    args = {"q": q, "k": k, "v": v}
    args.update(changes)
    return args


BAD = [
    (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError, "multiple of the number of key/value heads"),
    (dict(mask="prefix", prefix_len=-1), ValueError, "prefix_len"),
    (dict(mask="prefix", prefix_len=7), ValueError, "prefix_len"),
    (dict(mask="prefix", prefix_len=torch.tensor([0, 7])), ValueError, "prefix_len"),
    (dict(mask="prefix", prefix_len=torch.tensor([1, 2, 3])), ValueError, "prefix_len"),
    (dict(mask="prefix", prefix_len=torch.tensor([1.0, 2.0])), TypeError, "prefix_len"),
    (dict(mask="prefix"), ValueError, "prefix_len"),
    (dict(mask="causal", prefix_len=2), ValueError, "prefix_len"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(2, 6)), TypeError, "key_padding_mask"),
    (dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float64)), TypeError, "dtype"),
    (dict(q=torch.randn(2, 4, 5, 8).bfloat16()), TypeError, "dtype"),
    (dict(q=torch.randn(2, 4, 5, 300), k=torch.randn(2, 2, 6, 300), v=torch.randn(2, 2, 6, 300)), ValueError, "<= 256"),
    (dict(q=torch.randn(4, 5, 8)), ValueError, "q must have 4 dimensions"),
    (dict(v=torch.randn(2, 2, 7, 8)), ValueError, "v must have shape"),
    (dict(k=torch.randn(2, 2, 6, 4)), ValueError, "k must have shape"),
    (dict(q=torch.randn(2, 4, 5, 8, dtype=torch.float64).long()), TypeError, "q must have dtype"),
    (dict(mask="sliding"), ValueError, "mask must be one of"),
    (dict(mask=0), TypeError, "mask must be a str"),
    (dict(bias=torch.randn(3, 4, 5, 6)), ValueError, "bias must be broadcastable"),
    (dict(bias=torch.randn(5, 7)), ValueError, "bias must be broadcastable"),
    (dict(bias=torch.ones(2, 4, 5, 6, dtype=torch.long)), TypeError, "bias"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.inference_mode], ids=lambda f: f.__name__)
@pytest.mark.parametrize("changes,error,match", BAD, ids=[m + str(i) for i, (_, _, m) in enumerate(BAD)])
def test_bad_inputs(changes, error, match, grad_mode):
    # under inference_mode good inputs take the fast path: bad ones raise the op path's errors
    args = _bad(**changes)
    with grad_mode(), pytest.raises(error, match=match):
        ops.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


# ---- the inference fast path: the cpu forward kernel without the custom op (decode) ----

FAST_CASES = [  # (B, Hq, Hkv, Nq, Nk, D, mask, padding)
    (1, 32, 4, 1, 33, 64, "causal", None),  # a decode step of the TinyLlama shape
    (2, 8, 2, 3, 1029, 80, "causal", "random"),
    (1, 4, 4, 5, 3, 17, "causal", None),  # more queries than keys: rows that see nothing
    (2, 6, 3, 7, 40, 128, "bidirectional", "one-empty"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("layout", ["contiguous", "cache"])
def test_inference_fast_path_equals_the_op_path(cpu_isa, monkeypatch, case, dtype, layout):
    b, hq, hkv, nq, nk, d, mask, pad = case
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dtype=dtype)
    if layout == "cache":  # k, v: the first Nk rows of a preallocated cache; q from [B, N, H, D]
        k = torch.cat([k, torch.randn(b, hkv, 9, d).to(dtype)], dim=2)[:, :, :nk]
        v = torch.cat([v, torch.randn(b, hkv, 9, d).to(dtype)], dim=2)[:, :, :nk]
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    kw = dict(mask=mask, key_padding_mask=_case_kwargs((b, hq, hkv, nq, nk, d, mask, None, pad, None)).get("key_padding_mask"))
    with ops.use_backend("cpu"):
        op_out = ops.attention(q.clone().requires_grad_(), k, v, **kw).detach()  # autograd: the custom op
        monkeypatch.setattr(attention_module, "_attention_op", lambda *a: pytest.fail("the fast path ran the custom op"))
        with torch.inference_mode():
            fast = ops.attention(q, k, v, **kw)
    with torch.no_grad():
        fast_auto = ops.attention(q, k, v, scale=d ** -0.5, **kw)
    assert torch.equal(fast, op_out) and torch.equal(fast_auto, op_out)  # the same kernel and arguments: the same bits
    want = ref.attention(q.float(), k.float(), v.float(), ref.MASK_MODES[mask], None, kw["key_padding_mask"])
    (atol, rtol), _ = TOL[dtype]
    torch.testing.assert_close(fast.float(), want, atol=atol, rtol=rtol)


def test_fast_path_is_not_taken_where_the_op_must_run(monkeypatch):
    q, k, v = _inputs(1, 4, 2, 1, 9, 16)
    calls = []
    real = attention_module._fast_forward
    monkeypatch.setattr(attention_module, "_fast_forward", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        ops.attention(q, k, v, mask="prefix", prefix_len=3)
        ops.attention(q, k, v, bias=torch.zeros(9))
        ops.attention(q, k, v, dropout_p=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no cpu kernel: the op path falls back, warning once
            ops.attention(q.half(), k.half(), v.half())
        with ops.use_backend("reference"):
            ops.attention(q, k, v)
    ops.attention(q.requires_grad_(), k, v).sum().backward()
    assert len(calls) == 1 and q.grad is not None  # only the float16 call asked (and was declined)
    with torch.no_grad():
        ops.attention(q, k, v)
    assert len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mismatched_devices():
    q, k, v = _inputs(1, 2, 2, 3, 3, 8)
    with pytest.raises(ValueError, match="device"):
        ops.attention(q.cuda(), k, v)


def test_mismatched_device_of_padding_mask():
    q, k, v = _inputs(1, 2, 2, 3, 3, 8)
    pad = torch.ones(1, 3, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        ops.attention(q, k, v, key_padding_mask=pad)


# ---- triton (interpreter on the CPU) ---------------------------------------------------------

def _triton_kernels():
    kernels = pytest.importorskip("fusedlm.kernels.attention")
    if not hasattr(kernels, "forward") or not hasattr(kernels, "backward"):
        pytest.skip("kernels/attention.py has no forward/backward yet")
    if not torch.cuda.is_available() and not _backends.triton_interpreting():
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    return kernels


TRITON_CASES = [
    (1, 2, 2, 5, 9, 16, "causal", None, None, None),
    (2, 4, 1, 17, 9, 16, "prefix", "rows", "random", None),
    (1, 4, 2, 1, 33, 32, "bidirectional", None, "random", "heads"),
    (2, 2, 2, 9, 4, 8, "causal", None, None, "batch"),  # Nq > Nk: fully masked rows
]


@pytest.mark.triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_triton_matches_reference(case):
    _triton_kernels()
    q, k, v = _inputs(*case[:6])
    _check_backend("triton", q, k, v, **_case_kwargs(case))


@pytest.mark.triton
def test_triton_opcheck():
    _triton_kernels()
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 2, 1, 5, 9, 16))
    bias = torch.randn(1, 2, 5, 9, requires_grad=True)
    pad = torch.tensor([[True] * 8 + [False]])
    _opcheck(attention_module.AttentionInputs(q, k, v, ref.PREFIX, torch.tensor([3]), pad, bias, 0.25, 0.0, None), "triton")


# ---- cpu decode path: Nq * (Hq / Hkv) <= 16 rows per key/value head, K/V streamed, split-K ----

# (B, Hq, Hkv, Nq, Nk, D, mask, prefix_len, padding, bias): few queries against a long KV cache.
DECODE_CASES = [
    (1, 8, 2, 1, 1100, 128, "causal", None, None, None),  # GQA group 4
    (2, 8, 2, 4, 1037, 80, "prefix", "rows", "random", None),  # 16 rows per head, D % 64 != 0
    (2, 4, 1, 4, 1200, 64, "causal", None, "one-empty", "full"),  # batch 0 sees nothing
    (1, 4, 4, 1, 1500, 17, "bidirectional", None, "random", "keys"),
    (2, 8, 2, 3, 1029, 128, "prefix", 700, None, "heads"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_cpu_decode_matches_reference(cpu_isa, case, dtype):
    q, k, v = _inputs(*case[:6], dtype=dtype)
    _check_backend("cpu", q, k, v, cache=(case, dtype), **_case_kwargs(case))


def _cpu_out_lse(q, k, v, mode=ref.CAUSAL, prefix_len=None, pad=None, bias=None, scale=None, dropout_p=0.0, seed=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seed = None if seed is None else torch.tensor(seed)
    inputs = attention_module.AttentionInputs(q, k, v, mode, prefix_len, pad, bias, scale, dropout_p, seed)
    return attention_module._attention_op(inputs, "cpu")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("padded", ["first-600", "all"])
def test_cpu_decode_split_keys(cpu_isa, threads, padded):
    # One (batch, key/value head) and enough work that two threads split its keys into chunks:
    # chunks wholly padded (keys < 600), or every key padding (rows see nothing: 0, lse -inf).
    q, k, v = _inputs(1, 4, 1, 4, 1500, 128)
    pad = torch.ones(1, 1500, dtype=torch.bool)
    pad[0, : 600 if padded == "first-600" else 1500] = False
    bias = torch.randn(1, 4, 4, 1500, generator=torch.Generator().manual_seed(5))
    prefix = torch.tensor([900])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for b in (None, bias):
            out, lse = _cpu_out_lse(q, k, v, ref.PREFIX, prefix, pad, b)
            want_out, want_lse = ref.attention_lse(q, k, v, ref.PREFIX, prefix, pad, b, 128 ** -0.5)
            torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(lse, want_lse.float(), atol=2e-5, rtol=1e-5)
            if padded == "all":
                assert (out == 0).all() and (lse == float("-inf")).all()
        _check_backend("cpu", q, k, v, mask="prefix", prefix_len=prefix, key_padding_mask=pad, bias=bias)
    finally:
        torch.set_num_threads(before)


def test_cpu_decode_strided_kv_cache(cpu_isa):
    # K and V: the first Nk rows of a preallocated cache (head stride > Nk * D), q in [B, N, H, D]
    # memory, and a value cache laid out [B, N, H, D].
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 8, 64, generator=g).transpose(1, 2)
    k = torch.randn(2, 2, 1500, 64, generator=g)[:, :, :1100]
    v = torch.randn(2, 1100, 2, 64, generator=g).transpose(1, 2)
    _check_backend("cpu", q, k, v, mask="causal")


# ---- dropout on the attention probabilities (reference and cpu backends; triton falls back) ----

def _drawn_seed(generator_seed):
    """The seed ops.attention draws from torch.Generator().manual_seed(generator_seed)."""
    return int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(generator_seed)))


DROPOUT_CASES = [  # (B, Hq, Hkv, Nq, Nk, D, mask, prefix_len, padding, bias)
    (2, 4, 2, 9, 13, 16, "causal", None, "random", "heads"),
    (2, 4, 1, 17, 17, 8, "prefix", "rows", None, "batch"),
    (1, 2, 2, 5, 33, 16, "bidirectional", None, "random", None),
    (2, 2, 1, 9, 4, 8, "causal", None, "one-empty", None),  # fully hidden rows
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_dropout_matches_reference_with_the_drawn_seed(case):
    q, k, v = _inputs(*case[:6])
    kw = _case_kwargs(case)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    out, grads = _run("reference", q, k, v, grad_out, dropout_p=0.3, generator=torch.Generator().manual_seed(11),
                      **dict(kw))
    mode = ref.MASK_MODES[kw.pop("mask")]
    bias = kw.pop("bias")
    bias = None if bias is None else bias.clone().requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = ref.attention(*leaves, mode, kw.get("prefix_len"), kw.get("key_padding_mask"), bias,
                         dropout_p=0.3, seed=_drawn_seed(11))
    want_grads = torch.autograd.grad(want, leaves + ([bias] if bias is not None else []), grad_out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# the cpu kernel's tiles and decode path (Nq * group <= 16), several key tiles of 128, GQA, bf16
CPU_DROPOUT_CASES = DROPOUT_CASES + [
    (1, 4, 2, 70, 300, 64, "causal", None, "random", None),
    (2, 4, 4, 3, 260, 32, "prefix", 100, None, "batch"),
    (1, 2, 1, 129, 129, 80, "bidirectional", None, None, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CPU_DROPOUT_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_cpu_dropout_matches_reference(cpu_isa, case, dtype):
    # Same generator seed -> the same Philox keep decisions in the kernel's forward and in the
    # backward it regenerates them in: outputs and gradients as the reference's, to rounding.
    q, k, v = _inputs(*case[:6], dtype=dtype)
    (atol, rtol), (gatol, grtol) = TOL[dtype]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = _run("cpu", q, k, v, grad_out, dropout_p=0.3, generator=torch.Generator().manual_seed(11), **_case_kwargs(case))
    want = _run("reference", q, k, v, grad_out, dropout_p=0.3, generator=torch.Generator().manual_seed(11),
                **_case_kwargs(case))
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got[1], want[1]):
        scale = max(1.0, float(w.float().abs().max()))
        torch.testing.assert_close(g.float(), w.float(), atol=gatol * scale, rtol=grtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("nq", [1, 100])  # the decode path and the tiles
def test_cpu_dropout_keeps_exactly_the_reference_elements(cpu_isa, nq):
    # v = one-hot keys, so out[..., j] = P[i, j] * Z[i, j]: the elements the kernel dropped are
    # exactly those out of the reference's keep mask (bit-identical decisions, every element).
    b, h, nk, p, seed = 2, 3, 257, 0.3, 12345678901234
    q, k, _ = _inputs(b, h, h, nq, nk, nk)
    v = torch.eye(nk).expand(b, h, nk, nk)
    out, _ = _cpu_out_lse(q, k, v, ref.BIDIRECTIONAL, dropout_p=p, seed=seed)
    keep = ref.dropout_keep(seed, p, b, h, nq, nk)
    assert torch.equal(out != 0, keep)


def test_dropout_same_generator_state_same_mask_and_another_differs():
    q, k, v = _inputs(2, 4, 2, 9, 13, 16)
    grad_out = torch.ones_like(q)

    def run(generator):
        return _run("reference", q, k, v, grad_out, mask="bidirectional", dropout_p=0.25, generator=generator)

    (o1, g1), (o2, g2) = run(torch.Generator().manual_seed(3)), run(torch.Generator().manual_seed(3))
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    o3, g3 = run(torch.Generator().manual_seed(4))
    assert not torch.equal(o1, o3) and not torch.equal(g1[0], g3[0])
    torch.manual_seed(5)  # generator=None: torch's default generator
    o4, _ = run(None)
    torch.manual_seed(5)
    assert torch.equal(o4, run(None)[0]) and not torch.equal(o4, run(None)[0])  # a fresh seed per call


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dropout_zero_is_the_no_dropout_op(backend):
    if backend not in ops.available_backends():
        pytest.skip(f"{backend} not available")
    q, k, v = _inputs(2, 4, 2, 9, 13, 16)
    grad_out = torch.ones_like(q)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    out, grads = _run(backend, q, k, v, grad_out, mask="prefix", prefix_len=4)
    out0, grads0 = _run(backend, q, k, v, grad_out, mask="prefix", prefix_len=4, dropout_p=0.0, generator=gen)
    assert torch.equal(out, out0) and all(torch.equal(a, b) for a, b in zip(grads, grads0))
    assert torch.equal(gen.get_state(), state)  # no seed drawn


def test_dropout_keep_rate_and_scale_seen_through_the_op():
    # v = one-hot keys, so out[..., :Nk] is (P * Z) itself: P * Z / P is 0 or 1 / (1 - p)
    b, h, n, p = 2, 4, 64, 0.4
    q, k, _ = _inputs(b, h, h, n, n, n)
    v = torch.eye(n).expand(b, h, n, n)
    with ops.use_backend("reference"):
        probs = ops.attention(q, k, v, mask="bidirectional")
        dropped = ops.attention(q, k, v, mask="bidirectional", dropout_p=p, generator=torch.Generator().manual_seed(1))
    z = dropped / probs
    kept = z > 0
    torch.testing.assert_close(z[kept], torch.full_like(z[kept], 1 / (1 - p)))
    m = z.numel()
    assert abs(int(kept.sum()) - m * (1 - p)) < 5 * (m * p * (1 - p)) ** 0.5


def test_dropout_fully_masked_rows_give_zeros():
    q, k, v = _inputs(2, 2, 1, 5, 3, 16)
    pad = torch.tensor([[False, False, False], [True, True, True]])
    out, (dq, dk, dv) = _run("reference", q, k, v, torch.ones_like(q), key_padding_mask=pad, dropout_p=0.5,
                             generator=torch.Generator().manual_seed(0))
    # Nq=5 > Nk=3: queries 0 and 1 see nothing causally; batch 0 sees nothing at all
    assert (out[0] == 0).all() and (out[1, :, :2] == 0).all() and (dq[0] == 0).all() and (dv[0] == 0).all()
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()


def test_dropout_falls_back_from_triton(monkeypatch):
    q, k, v = _inputs(1, 2, 2, 4, 4, 8)
    assert attention_module._cpu_supports(torch.float32, dropout=True) is None
    assert "dropout" in attention_module._triton_supports(torch.float32, dropout=True)
    if "triton" in ops.available_backends() and _backends.triton_interpreting():
        with pytest.raises(RuntimeError, match="triton.*dropout_p > 0"):
            with ops.use_backend("triton"):
                ops.attention(q, k, v, dropout_p=0.1)


def test_dropout_opcheck():
    _opcheck(_op_inputs()._replace(dropout_p=0.3, seed=torch.tensor(123456789012345)), "reference")


def test_compile_fullgraph_with_and_without_dropout(monkeypatch, fresh_inductor_cache):
    # v = one-hot keys makes out = P * Z, so the backward's mask can be checked against the
    # forward's: dv = (P * Z)^T grad_out (the seed is drawn inside the graph, generator=None).
    monkeypatch.setattr(_backends, "_warned", set())
    b, h, n, p = 1, 2, 16, 0.5
    q, k, _ = _inputs(b, h, h, n, n, n)
    v = torch.eye(n).expand(b, h, n, n).clone().requires_grad_()
    f = torch.compile(lambda q, k, v, p: ops.attention(q, k, v, mask="prefix", prefix_len=3, dropout_p=p),
                      fullgraph=True)
    torch.testing.assert_close(f(q, k, v, 0.0), ref.attention(q, k, v, ref.PREFIX, 3), atol=2e-5, rtol=1e-4)
    pz = f(q, k, v, p)
    grad_out = torch.randn(pz.shape, generator=torch.Generator().manual_seed(0))
    (dv,) = torch.autograd.grad(pz, v, grad_out)
    torch.testing.assert_close(dv, pz.detach().transpose(-1, -2) @ grad_out, atol=1e-5, rtol=1e-5)
    probs = ref.attention(q, k, v, ref.PREFIX, 3)
    z = pz.detach()[probs > 0] / probs[probs > 0]
    assert ((z == 0) | torch.isclose(z, torch.tensor(1 / (1 - p)))).all() and (z == 0).any()


@pytest.mark.parametrize("changes,error,match", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_p"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(dropout_p=True), TypeError, "dropout_p"),
    (dict(dropout_p=torch.tensor(0.1)), TypeError, "dropout_p"),
    (dict(dropout_p=0.1, generator=3), TypeError, "generator must be a torch.Generator"),
])
def test_dropout_bad_arguments(changes, error, match):
    q, k, v = _inputs(2, 4, 2, 5, 6, 8)
    with pytest.raises(error, match=match):
        ops.attention(q, k, v, **changes)
