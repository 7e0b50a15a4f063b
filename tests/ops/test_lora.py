"""ops.lora_linear: every backend against the reference (forward and grads), opcheck, bad input."""
import pytest
import torch

from fusedlm import ops
from fusedlm.ops import _backends
from fusedlm.ops import lora as lora_ops
from fusedlm.reference import lora as ref

HAS_TRITON = "triton" in ops.available_backends()
TRITON = pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")])
# the cpu backend once per SIMD level this machine has (on_backend in tests/conftest.py)
BACKENDS = ["reference", *(f"cpu:{isa}" for isa in _backends.cpu_isa_levels()), TRITON]
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _case(m, k, n, r, n_adapters=None, dtype=torch.float32, bias=True, seed=0, none_rows=True):
    """Random x, W, b, A, B (+ ids with some -1 rows for many adapters); values kept O(1) in y."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    lead = (n_adapters,) if n_adapters else ()
    case = dict(
        x=rnd(m, k), weight=rnd(n, k, std=k**-0.5), lora_a=rnd(*lead, r, k, std=k**-0.5),
        lora_b=rnd(*lead, n, r, std=r**-0.5), bias=rnd(n) if bias else None, adapter_ids=None,
    )
    if n_adapters:
        ids = torch.randint(-1 if none_rows else 0, n_adapters, (m,), generator=g)
        case["adapter_ids"] = ids
    return case


def _call(fn, case, scaling=0.5, **kw):
    return fn(case["x"], case["weight"], case["lora_a"], case["lora_b"], scaling, bias=case["bias"],
              adapter_ids=case["adapter_ids"], **kw)


SHAPES = [(1, 32, 16, 4), (17, 48, 40, 8), (64, 64, 96, 16), (5, 33, 17, 3)]  # M, K, N, r; odd ones too


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n_adapters", [None, 3])
def test_forward_matches_reference(on_backend, backend, dtype, shape, n_adapters):
    case = _case(*shape, n_adapters=n_adapters, dtype=dtype)
    gates = None if n_adapters is None else torch.tensor([0.5, 1.0, 0.0], dtype=dtype)
    expected = _call(ref.lora_linear, case, gates=gates)
    with on_backend(backend):
        got = _call(ops.lora_linear, case, gates=gates)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_adapter_equals_per_row_loop_with_none_rows(on_backend, backend):
    case = _case(11, 24, 20, 4, n_adapters=4)
    case["adapter_ids"] = torch.tensor([3, -1, 0, 0, 2, -1, 1, 3, 3, -1, 0])
    gates = torch.tensor([1.0, 0.25, 2.0, 0.5])
    with on_backend(backend):
        got = _call(ops.lora_linear, case, gates=gates)
    for row, a in enumerate(case["adapter_ids"].tolist()):
        single = dict(case, x=case["x"][row : row + 1], adapter_ids=None,
                      lora_a=case["lora_a"][max(a, 0)], lora_b=case["lora_b"][max(a, 0)])
        expected = _call(ref.lora_linear, single, scaling=0.5 if a >= 0 else 0.0, gates=float(gates[max(a, 0)]))
        torch.testing.assert_close(got[row : row + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_gates_float_and_no_bias(on_backend, backend):
    case = _case(6, 16, 8, 2, bias=False)
    case["x"] = case["x"].view(2, 3, 16)
    expected = _call(ref.lora_linear, case, gates=0.3)
    with on_backend(backend):
        got = _call(ops.lora_linear, case, gates=0.3)
        got_t = _call(ops.lora_linear, case, gates=torch.tensor([0.3]))
    assert got.shape == (2, 3, 8)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    torch.testing.assert_close(got_t, expected, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_and_all_none_rows(on_backend, backend):
    with on_backend(backend):
        empty = _case(0, 16, 8, 2, n_adapters=2)
        assert _call(ops.lora_linear, empty).shape == (0, 8)
        case = _case(4, 16, 8, 2, n_adapters=2)
        case["adapter_ids"] = torch.full((4,), -1)
        got = _call(ops.lora_linear, case)
    torch.testing.assert_close(got, case["x"] @ case["weight"].T + case["bias"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", TRITON])
def test_nf4_weight_uses_nf4_matmul_base(on_backend, backend):
    case = _case(9, 64, 32, 4)
    qw = ops.nf4_quantize(case["weight"], blocksize=64)
    dense = dict(case, weight=ops.nf4_dequantize(qw))
    expected = _call(ref.lora_linear, dense)
    with on_backend(backend):
        x = case["x"].clone().requires_grad_()
        got = _call(ops.lora_linear, dict(case, weight=qw, x=x))
        got.sum().backward()
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    xr = case["x"].clone().requires_grad_()
    _call(ref.lora_linear, dict(dense, x=xr)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
def _grads(fn, case, gates, **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in case.items()
              if k != "adapter_ids" and isinstance(v, torch.Tensor)}  # an NF4 weight stays as it is (frozen)
    g = gates.detach().clone().requires_grad_()
    y = _call(fn, dict(case, **leaves), gates=g, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    (y * gy).sum().backward()
    return {**{k: v.grad for k, v in leaves.items()}, "gates": g.grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_adapters", [None, 3])
def test_grads_match_reference_autograd(on_backend, backend, dtype, n_adapters):
    case = _case(13, 40, 24, 4, n_adapters=n_adapters, dtype=dtype)
    gates = torch.tensor([0.7] if n_adapters is None else [0.5, 1.0, 2.0], dtype=dtype)
    expected = _grads(ref.lora_linear, case, gates)
    with on_backend(backend):
        got = _grads(ops.lora_linear, case, gates)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-1, rtol=5e-2)
    for name in expected:
        torch.testing.assert_close(got[name].float(), expected[name].float(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_from_generator_reused_in_backward(on_backend, backend):
    case = _case(10, 32, 16, 4, n_adapters=2)
    gates = torch.tensor([1.0, 0.5])
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    mask = ref.dropout_mask(10, 32, 0.3, seed, torch.device("cpu"))
    expected = _grads(ref.lora_linear, case, gates, dropout_mask=mask)
    with on_backend(backend):
        got = _grads(ops.lora_linear, case, gates, dropout_p=0.3, generator=torch.Generator().manual_seed(5))
        y = _call(ops.lora_linear, case, dropout_p=0.3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(y, _call(ref.lora_linear, case, dropout_mask=mask), **TOL[torch.float32])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_backward_saves_no_m_by_n_tensor():
    m, k, n, r = 64, 16, 48, 4
    case = _case(m, k, n, r)
    saved = []
    leaves = {key: v.clone().requires_grad_() for key, v in case.items() if key != "adapter_ids"}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = _call(ops.lora_linear, dict(case, **leaves))
    assert (m, n) not in saved and (m, r) in saved
    y.sum().backward()


@pytest.mark.parametrize("n_adapters", [None, 2])
def test_gradcheck_float64(n_adapters):
    case = _case(5, 6, 4, 2, n_adapters=n_adapters, dtype=torch.float64)
    gates = torch.tensor([0.7] if n_adapters is None else [0.5, 1.5], dtype=torch.float64, requires_grad=True)
    leaves = [case[k].requires_grad_() for k in ("x", "weight", "lora_a", "lora_b", "bias")]

    def fn(x, w, a, b, bias, g):
        return ops.lora_linear(x, w, a, b, 0.5, bias=bias, adapter_ids=case["adapter_ids"], gates=g,
                               dropout_p=0.25, generator=torch.Generator().manual_seed(1))

    with ops.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (*leaves, gates))


@pytest.mark.parametrize("backend", ["reference", "cpu", TRITON])
@pytest.mark.parametrize("n_adapters", [None, 2])
def test_opcheck(backend, n_adapters):
    case = _case(6, 32, 16, 4, n_adapters=n_adapters)
    x, w = case["x"].requires_grad_(), case["weight"].requires_grad_()
    a = (case["lora_a"] if n_adapters else case["lora_a"][None]).requires_grad_()
    b = (case["lora_b"] if n_adapters else case["lora_b"][None]).requires_grad_()
    gates = torch.ones(n_adapters or 1, requires_grad=True)
    inputs = lora_ops.LoraInputs(x, w, None, a, b, 0.5, case["bias"], case["adapter_ids"], gates, 0.0, None, None, None, 0, False)
    base = (x @ w.T).detach().requires_grad_()
    qw = ops.nf4_quantize(case["weight"], blocksize=64)
    nf4 = inputs._replace(weight=None, nf4_data=qw.data.view(-1), nf4_absmax=qw.absmax, nf4_blocksize=64)
    for checked in (inputs, inputs._replace(dropout_p=0.2, seed=torch.tensor(123)),
                    inputs._replace(weight=None, base=base, bias=None), inputs._replace(compute_bf16=True), nf4,
                    nf4._replace(compute_bf16=True)):
        if backend == "triton" and checked.nf4_data is not None:
            continue  # the op's wrapper gives the triton backend an NF4 base product, never the weight
        # the schema's arguments: the record's fields, then the backend
        torch.library.opcheck(lora_ops._lora_linear_op.custom_op, (*checked, backend))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _bad(**changes):
    case = _case(4, 16, 8, 2, n_adapters=3, none_rows=False)
    args = dict(case, scaling=1.0, gates=None, dropout_p=0.0)
    args.update(changes)
    return lambda: ops.lora_linear(args["x"], args["weight"], args["lora_a"], args["lora_b"], args["scaling"],
                                   bias=args["bias"], adapter_ids=args["adapter_ids"], gates=args["gates"],
                                   dropout_p=args["dropout_p"])


@pytest.mark.parametrize("changes,error,match", [
    (dict(adapter_ids=torch.tensor([0, 1, 3, 0])), ValueError, "adapter_ids"),
    (dict(adapter_ids=torch.tensor([0, -2, 1, 0])), ValueError, "adapter_ids"),
    (dict(adapter_ids=torch.tensor([0, 1, 2])), ValueError, "adapter_ids"),
    (dict(adapter_ids=torch.tensor([0, 1, 2, 0], dtype=torch.int32)), TypeError, "adapter_ids"),
    (dict(adapter_ids=None), ValueError, "adapter_ids"),
    (dict(lora_b=torch.randn(3, 8, 3)), ValueError, "rank mismatch"),
    (dict(lora_b=torch.randn(2, 8, 2)), ValueError, "lora_b"),
    (dict(lora_b=torch.randn(3, 9, 2)), ValueError, "lora_b"),
    (dict(lora_a=torch.randn(3, 2, 15)), ValueError, "lora_a"),
    (dict(lora_a=torch.randn(3, 2, 16, dtype=torch.bfloat16)), TypeError, "lora_a"),
    (dict(weight=torch.randn(8, 16, dtype=torch.float16)), TypeError, "weight"),
    (dict(weight=torch.randn(8, 15)), ValueError, "K=15"),
    (dict(bias=torch.randn(9)), ValueError, "bias"),
    (dict(gates=torch.ones(2)), ValueError, "gates"),
    (dict(gates="1"), TypeError, "gates"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(scaling=None), TypeError, "scaling"),
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), TypeError, "weight"),
    (dict(x=torch.randint(0, 3, (4, 16))), TypeError, "x"),
    (dict(x=torch.randn(4, 16, device="meta")), ValueError, "device"),
])
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        _bad(**changes)()


def test_single_adapter_gates_must_have_one_entry():
    case = _case(4, 16, 8, 2)
    with pytest.raises(ValueError, match="gates"):
        _call(ops.lora_linear, case, gates=torch.ones(2))
    with pytest.raises(ValueError, match="adapter_ids"):
        _call(ops.lora_linear, dict(case, adapter_ids=torch.tensor([0, 1, 0, 0])))


def test_torch_compile_forward_and_backward(fresh_inductor_cache):
    case = _case(8, 32, 16, 4, n_adapters=2)
    a = case["lora_a"].clone().requires_grad_()
    compiled = torch.compile(lambda x, a: ops.lora_linear(x, case["weight"], a, case["lora_b"], 0.5,
                                                          adapter_ids=case["adapter_ids"]))
    y = compiled(case["x"], a)
    y.sum().backward()
    a_ref = case["lora_a"].clone().requires_grad_()
    y_ref = ref.lora_linear(case["x"], case["weight"], a_ref, case["lora_b"], 0.5, adapter_ids=case["adapter_ids"])
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(a.grad, a_ref.grad, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_adapters", [None, 2])
def test_autocast_runs_in_bf16_with_float32_gradients(on_backend, backend, n_adapters):
    if backend == "triton":
        pytest.skip("the Triton interpreter has no bfloat16")
    case = _case(12, 32, 24, 4, n_adapters=n_adapters)
    leaves = {k: v.clone().requires_grad_() for k, v in case.items() if k != "adapter_ids" and v is not None}
    with on_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        y = _call(ops.lora_linear, dict(case, **leaves))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    bf = {k: v.to(torch.bfloat16) for k, v in case.items() if k != "adapter_ids" and v is not None}
    expected = _call(ref.lora_linear, dict(case, **bf))  # the operands autocast gives F.linear
    torch.testing.assert_close(y.float(), expected.float(), **TOL[torch.bfloat16])
    ref_leaves = {k: v.clone().requires_grad_() for k, v in bf.items()}
    _call(ref.lora_linear, dict(case, **ref_leaves)).float().sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == torch.float32, name
        torch.testing.assert_close(leaf.grad, ref_leaves[name].grad.float(), atol=1e-1, rtol=5e-2, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# the fused GEMM of the cpu backend (csrc/cpu/lora_gemm.cpp) and NF4 / bf16-operand records
# ---------------------------------------------------------------------------------------------
GEMM_SHAPES = [(1, 32, 32, 1), (7, 96, 64, 3), (33, 200, 160, 16), (130, 300, 1024, 8), (5, 37, 64, 5)]  # M, N, K, r


@pytest.mark.parametrize("isa", _backends.cpu_isa_levels())
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("weight_kind", ["float32", "bfloat16", "nf4"])
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_gemm_matches_float64(isa, shape, weight_kind, a_dtype):
    from fusedlm.ops import _gemm

    m, n, k, r = shape
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(n, k, generator=g) * k**-0.5
    if weight_kind == "nf4":
        weight = ops.nf4_quantize(w, blocksize=32 if k == 32 else 64, double_quant=True)
        dense = ops.nf4_dequantize(weight).double()
    else:
        weight = w.to(getattr(torch, weight_kind))
        dense = weight.double()
    a_f, a_g = torch.randn(m, k, generator=g).to(a_dtype), torch.randn(m, n, generator=g).to(a_dtype)
    h, dh = torch.randn(m, r, generator=g).to(a_dtype), torch.randn(m, r, generator=g).to(a_dtype)
    b, lora_a = torch.randn(n, r, generator=g), torch.randn(r, k, generator=g)
    init_f, init_g = torch.randn(m, n, generator=g), torch.randn(m, k, generator=g)
    with _backends.cpu_isa_limit(isa):
        fwd = _gemm.lora_gemm(a_f, weight, transposed=False, a2=h, w2=b, init=init_f, out_dtype=torch.float32)
        grad = _gemm.lora_gemm(a_g, weight, transposed=True, a2=dh, w2=lora_a, init=init_g, out_dtype=a_dtype)
    exp_f = init_f.double() + a_f.double() @ dense.T + h.double() @ b.double().T
    exp_g = init_g.to(a_dtype).double() + a_g.double() @ dense + dh.double() @ lora_a.double()
    # bf16 operands: the weights (and w2) are rounded to bf16 in the panels where the dot products are native
    tol = dict(atol=1e-4, rtol=1e-4) if a_dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    assert fwd.dtype == torch.float32 and grad.dtype == a_dtype
    torch.testing.assert_close(fwd.double(), exp_f, **tol)
    torch.testing.assert_close(grad.double(), exp_g, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_adapters", [None, 3])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=str)
def test_nf4_base_forward_and_grads(on_backend, backend, n_adapters, compute_dtype):
    case = _case(21, 64, 40, 4, n_adapters=n_adapters)
    qw = ops.nf4_quantize(case["weight"], blocksize=64, double_quant=True)
    gates = torch.tensor([0.7] if n_adapters is None else [0.5, 1.0, 2.0])
    dense = dict(case, weight=ops.nf4_dequantize(qw))
    if compute_dtype is not None:  # the products' operands rounded to bf16 (float32 sums)
        dense = {key: v.to(torch.bfloat16).float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for key, v in dense.items()}
        dense["bias"] = case["bias"]
    expected = _grads(ref.lora_linear, dense, gates)
    with on_backend(backend):
        got = _grads(ops.lora_linear, dict(case, weight=qw), gates, compute_dtype=compute_dtype)
    tol = dict(atol=2e-4, rtol=2e-4) if compute_dtype is None else dict(atol=5e-2, rtol=5e-2)
    for name in ("x", "lora_a", "lora_b", "bias", "gates"):
        torch.testing.assert_close(got[name], expected[name], **tol, msg=lambda m: f"{name}: {m}")


def test_compute_dtype_is_checked():
    case = _case(4, 16, 8, 2)
    with pytest.raises(ValueError, match="compute_dtype"):
        _call(ops.lora_linear, case, compute_dtype=torch.float16)
