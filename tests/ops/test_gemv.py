"""ops._gemv.linear, the dense decode GEMV (csrc/cpu/dense_gemv.cpp): against the float64 product at
every SIMD level, and F.linear wherever the kernel does not apply."""
import pytest
import torch
import torch.nn.functional as F

from fusedlm.ops import _backends, _gemv

pytestmark = pytest.mark.skipif(_backends._compiled("_C") is None, reason="fusedlm._C is not built")

# relative to max |exact| of the case: float32 sums of exact products; bf16 adds one output rounding
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}


def _case(m, n, k, dtype, bias_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    bias = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return x, w, bias


def _exact(x, w, bias):
    out = x.double() @ w.double().T
    return out if bias is None else out + bias.double()


def _check(out, x, w, bias):
    want = _exact(x, w, bias)
    assert out.dtype == x.dtype and out.shape == want.shape
    err = (out.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)
    assert err <= TOL[x.dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 100), (5, 2048), (257, 33), (64, 4096), (19, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=str)
def test_gemv_against_the_float64_product(cpu_isa, m, n, k, dtype, bias_dtype):
    x, w, bias = _case(m, n, k, dtype, bias_dtype)
    with torch.inference_mode():
        out = _gemv.gemv(x, w, bias)  # the kernel at this level (linear() takes it where it is the faster one)
    _check(out, x, w, bias)
    if bias is None or bias.dtype == dtype:  # (F.linear refuses a bias of another dtype; so does linear())
        with torch.inference_mode():
            routed = _gemv.linear(x, w, bias)
        if cpu_isa in _gemv._FASTER[dtype]:
            assert torch.equal(routed, out)
        else:
            torch.testing.assert_close(routed, F.linear(x, w, bias))


def test_gemv_leading_dims_strides_and_a_row_slice_of_the_weight(cpu_isa):
    g = torch.Generator().manual_seed(1)
    big = torch.randn(40, 300, generator=g)
    w = big[3:30, :257]  # rows 300 apart, unit stride along K
    x = torch.randn(2, 1, 2 * 257, generator=g)[..., ::2]  # [2, 1, 257], stride 2 along K
    with torch.no_grad():
        out = _gemv.gemv(x, w)
    assert out.shape == (2, 1, 27)
    _check(out.reshape(2, 27), x.reshape(2, 257), w, None)


def test_gemv_threads_do_not_change_results():
    x, w, bias = _case(2, 1000, 512, torch.float32, torch.float32)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(_gemv.gemv(x, w, bias))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # each row's sum is one thread's


@pytest.mark.parametrize("case", ["rows", "grad", "dtypes", "float16", "forced", "weight_t", "empty", "bad_bias", "scalar"])
def test_falls_back_to_f_linear(monkeypatch, case):
    calls = []
    module = _backends.cpu_module()
    real = module.dense_gemv
    monkeypatch.setattr(module, "dense_gemv", lambda a: calls.append(1) or real(a))
    x, w, bias = _case(3, 24, 64, torch.float32, torch.float32)
    ctx = torch.no_grad()
    if case == "rows":
        x = torch.randn(5, 64)  # more than MAX_ROWS
    elif case == "grad":
        w.requires_grad_()
        ctx = torch.enable_grad()
    elif case == "dtypes":
        x = x.bfloat16()
    elif case == "float16":
        x, w, bias = x.half(), w.half(), None
    elif case == "weight_t":
        w = torch.randn(64, 24).T  # stride 1 along N, not K
    elif case == "empty":
        x = torch.randn(0, 64)
    elif case == "bad_bias":
        bias = torch.randn(23)
    with ctx:
        if case == "scalar":  # a level where torch's linear is the faster one
            with _backends.cpu_isa_limit("scalar"):
                out = _gemv.linear(x, w, bias)
        elif case == "forced":
            with _backends.use_backend("reference"):
                out = _gemv.linear(x, w, bias)
        elif case in ("dtypes", "bad_bias"):
            with pytest.raises(RuntimeError):  # F.linear's own error
                _gemv.linear(x, w, bias)
            out = None
        else:
            out = _gemv.linear(x, w, bias)
    if out is not None:
        torch.testing.assert_close(out, F.linear(x, w, bias))
    if case == "grad":
        out.sum().backward()
        assert w.grad is not None
    assert not calls


def test_gemv_calls_the_kernel_and_its_checks_reject_bad_views():
    module = _backends.cpu_module()
    x, w, _ = _case(1, 8, 32, torch.float32)
    out = torch.empty(1, 8)
    args = module.GemvArgs()
    view = lambda t: module.View(t.data_ptr(), 0, t.shape, t.stride())  # noqa: E731 (float32)
    args.x, args.w, args.out, args.num_threads = view(x), view(w), view(out), 1
    module.dense_gemv(args)
    _check(out, x, w, None)
    args.out = view(torch.empty(1, 7))
    with pytest.raises(ValueError, match="out"):
        module.dense_gemv(args)
    args.out, args.x = view(out), view(torch.randn(5, 32))
    with pytest.raises(ValueError, match="x must have 1 to 4 rows"):
        module.dense_gemv(args)
    args.x, args.w = view(x), view(torch.randn(8, 31))
    with pytest.raises(ValueError, match="w"):
        module.dense_gemv(args)
