"""NF4 quantise / dequantise / dequant-matmul: every backend against the reference and bitsandbytes."""
import dataclasses
import warnings

import pytest
import torch

from fusedlm import ops
from fusedlm.ops import _backends
from fusedlm.ops import nf4 as nf4_ops
from fusedlm.reference import nf4 as ref

bnbf = pytest.importorskip("bitsandbytes.functional")

HAS_TRITON = "triton" in ops.available_backends()
TRITON = pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")])
BACKENDS = ["reference", "cpu", TRITON]
# the cpu backend once per SIMD level this machine has (on_backend in tests/conftest.py)
CPU_ISAS = [f"cpu:{isa}" for isa in _backends.cpu_isa_levels()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
QUANT_SHAPES = [(7,), (33, 17), (64, 96)]  # odd numel, a short tail block, whole blocks


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


# ---------------------------------------------------------------------------------------------
# quantise / dequantise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", *CPU_ISAS, TRITON])
@pytest.mark.parametrize("blocksize", ref.BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_is_byte_identical_to_reference_and_bitsandbytes(on_backend, backend, blocksize, dtype):
    for i, shape in enumerate(QUANT_SHAPES):
        w = _weight(shape, dtype, seed=i)
        with on_backend(backend):
            qw = ops.nf4_quantize(w, blocksize=blocksize)
            back = ops.nf4_dequantize(qw)
        data, absmax = ref.quantize(w, blocksize)
        assert torch.equal(qw.data, data) and torch.equal(qw.absmax, absmax), shape
        bnb_data, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        assert torch.equal(qw.data, bnb_data) and torch.equal(qw.absmax, state.absmax), shape
        assert back.dtype == dtype and back.shape == w.shape
        assert torch.equal(back, ref.dequantize(data, absmax, blocksize, shape, dtype)), shape


def test_dequantize_equals_bitsandbytes():
    # rows a multiple of every blocksize: bitsandbytes' CPU dequantiser gets blocks that cross
    # rows wrong (e.g. [64, 96] with blocksize 64), so that case is compared with the reference only
    w = _weight((16, 4096), torch.float32)
    for blocksize in ref.BLOCKSIZES:
        qw = ops.nf4_quantize(w, blocksize=blocksize)
        data, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        assert torch.equal(ops.nf4_dequantize(qw), bnbf.dequantize_4bit(data, state))


@pytest.mark.parametrize("backend", ["reference", *CPU_ISAS, TRITON])
def test_quantize_edge_values(on_backend, backend):
    # zero blocks (full and tail), exact code values, values exactly on a midpoint
    w = torch.zeros(64 + 64 + 10)
    w[64:80] = ref.NF4_CODE
    w[80:95] = ref.NF4_MIDPOINTS
    w[95] = 1.0  # absmax 1: the midpoints are hit exactly
    with on_backend(backend):
        qw = ops.nf4_quantize(w, blocksize=64)
    data, absmax = ref.quantize(w, 64)
    assert torch.equal(qw.data, data) and torch.equal(qw.absmax, absmax)
    bnb_data, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(qw.data, bnb_data) and torch.equal(qw.absmax, state.absmax)
    assert absmax[0] == 0 and absmax[2] == 1e-38  # a zero tail block stores the clamped absmax


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("scale", [0.01, 3.0])
def test_double_quant_is_identical_to_bitsandbytes(blocksize, scale):
    w = _weight((300, 512), torch.float32) * scale
    qw = ops.nf4_quantize(w, blocksize=blocksize, double_quant=True)
    data, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(qw.data, data)
    assert torch.equal(qw.absmax, state.absmax)  # the 8-bit codes, bitsandbytes' grid lookup included
    assert torch.equal(qw.nested_absmax, state.state2.absmax)
    assert torch.equal(qw.offset, state.offset)
    theirs = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset  # bnb leaves the offset out
    assert torch.equal(qw.float_absmax(), theirs)


def test_double_quant_codes_are_nearest_but_near_boundaries():
    # bitsandbytes (and so the reference) rounds the scaled value v to a grid of 65536 points before
    # taking the nearest map entry, so the grid point g lies within half a grid step of v and the
    # chosen entry is at most one grid step farther from v than the nearest entry. Near 0 the map's
    # entries are closer together than the grid, so the chosen entry may be several entries away
    # there (an earlier version of this test claimed "one entry" and failed on some draws).
    step = 1 / 32767.5
    absmax = torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 0.1
    codes, nested, offset = ref.quantize_absmax(absmax)
    scaled = ((absmax - offset).view(-1, 256) / nested[:, None]).reshape(-1)
    code = ref.dynamic_map()
    nearest = (scaled[:, None] - code[None, :]).abs().argmin(1)
    chosen_error = (code[codes.long()] - scaled).abs()
    nearest_error = (code[nearest] - scaled).abs()
    assert (chosen_error <= nearest_error + step).all()
    differ = codes.long() != nearest
    far = differ & ((codes.long() - nearest).abs() > 1)
    assert (code[nearest][far].abs() < step).all()  # several entries apart only where the map is denser than the grid
    boundary = (code[codes.long()] + code[nearest]) / 2
    assert ((scaled - boundary).abs()[differ & ~far] <= step).all()


def test_double_quant_round_trip():
    w = _weight((256, 128), torch.float32)
    qw = ops.nf4_quantize(w, blocksize=32, double_quant=True)
    plain = ops.nf4_quantize(w, blocksize=32)
    assert qw.absmax.dtype == torch.uint8 and qw.nested_absmax.shape == (4,)
    torch.testing.assert_close(qw.float_absmax(), plain.absmax, rtol=0, atol=qw.nested_absmax.max().item() / 100)


def test_quantisation_error_equals_bitsandbytes():
    w = torch.randn(512, 512)
    qw = ops.nf4_quantize(w, blocksize=64)
    data, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = (ops.nf4_dequantize(qw) - w).norm() / w.norm()
    theirs = (ref.dequantize(data, state.absmax, 64, w.shape, torch.float32) - w).norm() / w.norm()
    assert ours.item() == theirs.item() and 0.05 < ours.item() < 0.15


# ---------------------------------------------------------------------------------------------
# matmul
# ---------------------------------------------------------------------------------------------
MATMUL_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _check_matmul(backend, m, n, k, blocksize, double_quant, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    qw = ops.nf4_quantize(w, blocksize=blocksize, double_quant=double_quant)
    with ops.use_backend(backend):
        out = ops.nf4_matmul(x, qw, bias)
    expected = ref.matmul(x, qw.data, qw.float_absmax(), blocksize, (n, k), bias)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.float(), expected.float(), **MATMUL_TOL[dtype])


@pytest.mark.parametrize("m", [1, 3, 16, 100])
@pytest.mark.parametrize("n,k", [(24, 64), (9, 96), (40, 1024)])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matmul_cpu_matches_reference(cpu_isa, m, n, k, blocksize, dtype):
    # double quantisation only changes the absmax the kernels receive: one case in four has it
    _check_matmul("cpu", m, n, k, blocksize, (m + blocksize) % 4 == 0, dtype, with_bias=(m % 2 == 1))


def _bf16_dots(isa: str, dtype: torch.dtype, precision: str) -> bool:
    """Whether the cpu GEMV multiplies in bf16 (ops/nf4.py: nf4_matmul's numerics)."""
    return isa == "avx512_bf16" and (dtype == torch.bfloat16 or (dtype == torch.float32 and precision == "medium"))


@pytest.mark.parametrize("m", [1, 4, 5, 16, 70])
@pytest.mark.parametrize("n,k,blocksize", [(37, 256, 32), (16, 192, 64), (48, 4096, 4096), (5, 96, 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_gemv_against_the_exact_product(cpu_isa, m, n, k, blocksize, dtype, precision):
    # Each output against the float64 product of x and the dequantised weight, to the bound of its
    # numerics: float32 products exactly rounded (1e-6 of sum |x w|), or bf16 dot products (the
    # code values rounded to bf16, and float32 x rounded to bf16: 2^-8 of sum |x w|); then the
    # rounding to the output dtype. N=37 and 5 leave a partial tile; K=96 is not a multiple of the
    # blocksize (the GEMV reads the flat bytes); double quantisation when m is odd; 70 rows run the
    # fused kernel as a GEMM (row groups of 6, tiles in pairs) on AVX-512, decode + torch's GEMM
    # elsewhere.
    g = torch.Generator().manual_seed(m + n)
    qw = ops.nf4_quantize(torch.randn(n, k, generator=g) * 0.05, blocksize=blocksize, double_quant=m % 2 == 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) if m > 1 else None
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with ops.use_backend("cpu"):
            out = ops.nf4_matmul(x, qw, bias)
    finally:
        torch.set_float32_matmul_precision(before)
    assert (qw.cpu_tiles() is None) == (k % blocksize != 0)
    w = ops.nf4_dequantize(qw).double()
    exact = x.double() @ w.T + (0 if bias is None else bias.double())
    scale = x.double().abs() @ w.abs().T
    rel = 2.0**-8 if _bf16_dots(cpu_isa, dtype, precision) else 1e-6
    out_rounding = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert out.dtype == dtype
    err = (out.double() - exact).abs()
    assert (err <= rel * scale + out_rounding * exact.abs() + 1e-30).all(), err.max()


@pytest.mark.parametrize("kind", ["fc1", "fc2", "attn"])
@pytest.mark.parametrize("dim", [256, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemv_within_the_bitsandbytes_bounds(cpu_isa, kind, dim, dtype):
    # bitsandbytes' test_gemv_4bit: inputs, error measures (mean / mean relative / max absolute
    # error, each averaged over 10 draws and divided by sqrt(dim)) and bounds for the activation
    # dtype, here against the exact (float64) product with the dequantised weight. bf16 dot
    # products (avx512_bf16) are held to the bf16 bounds, float32 x (exact products) to float32's.
    g = torch.Generator().manual_seed(dim)
    errs, relerrs, maxerrs = [], [], []
    for _ in range(10):
        rows, cols = {"fc1": (4 * dim, dim), "fc2": (dim, 4 * dim), "attn": (dim, dim)}[kind]
        x = torch.randn(1, cols, generator=g).to(dtype)
        qw = ops.nf4_quantize(torch.randn(rows, cols, generator=g) / dim**0.5)
        with ops.use_backend("cpu"):
            out = ops.nf4_matmul(x, qw).double()
        exact = x.double() @ ops.nf4_dequantize(qw).double().T
        err = (out - exact).abs()
        errs.append(err.mean().item())
        relerrs.append((err / (exact.abs() + 1e-5)).mean().item())
        maxerrs.append(err.max().item())
    err, relerr, maxerr = (sum(v) / len(v) / dim**0.5 for v in (errs, relerrs, maxerrs))
    if dtype == torch.bfloat16:  # bitsandbytes' bounds for bf16, dim <= 512 and above
        bounds = (6e-4, 0.007, 0.015) if dim <= 512 else (2e-4, 0.002, 0.0012)
    else:
        bounds = (5e-8, 1e-6, 1e-7) if dim <= 512 else (5e-8, 8e-6, 1e-7)
    assert err < bounds[0] and relerr < bounds[1] and maxerr < bounds[2], (err, relerr, maxerr)


def test_cpu_tiles_are_cached_and_follow_the_weight():
    qw = ops.nf4_quantize(torch.randn(40, 128) * 0.05, blocksize=64)
    x = torch.randn(2, 128)
    tiles = qw.cpu_tiles()
    assert tiles.shape == (3, 2, 64 * 8 + 64) and tiles.dtype == torch.uint8
    assert qw.cpu_tiles() is tiles  # made once
    before = ops.nf4_matmul(x, qw)
    other = ops.nf4_quantize(torch.randn(40, 128) * 0.05, blocksize=64)
    qw.data.copy_(other.data)  # in place: the tiles are made again
    qw.absmax.copy_(other.absmax)
    assert qw.cpu_tiles() is not tiles
    torch.testing.assert_close(ops.nf4_matmul(x, qw), ops.nf4_matmul(x, other))
    assert not torch.equal(before, ops.nf4_matmul(x, qw))
    assert dataclasses.replace(qw).__dict__.get("_derived") is None  # a copy starts without
    assert ops.nf4_quantize(torch.randn(8, 96), blocksize=64).cpu_tiles() is None  # K % blocksize != 0


def test_a_weight_made_under_inference_mode_is_cached_too():
    # inference tensors have no version counter: the cache keys on the tensors alone
    with torch.inference_mode():
        w = torch.randn(40, 128) * 0.05
        qw = ops.nf4_quantize(w, blocksize=64, double_quant=True)
        x = torch.randn(2, 128)
        tiles = qw.cpu_tiles()
        assert qw.cpu_tiles() is tiles and qw.float_absmax() is qw.float_absmax()
        out = ops.nf4_matmul(x, qw)
    torch.testing.assert_close(out, x @ ops.nf4_dequantize(qw).T, atol=1e-5, rtol=1e-5)


def test_repack_checks_the_tiles_it_writes():
    qw = ops.nf4_quantize(torch.randn(20, 128), blocksize=64)
    for shape in [(2, 2, 575), (1, 2, 576), (2, 3, 576)]:
        with pytest.raises(ValueError, match="tiles|whole rows"):
            nf4_ops._checks.launch("nf4_repack", "Nf4Args", torch.device("cpu"), data=qw.data.view(-1), absmax=qw.absmax,
                                   blocksize=64, tiles=torch.empty(shape, dtype=torch.uint8))


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k,blocksize", [(24, 64, 32), (9, 40, 64), (5, 256, 4096)])
def test_matmul_triton_matches_reference(m, n, k, blocksize):
    # the GEMV path (m <= 8, with split-K for k=256) and the tiled tl.dot path; K=40 is not a
    # multiple of 32 or of the blocksize
    _check_matmul("triton", m, n, k, blocksize, double_quant=(m == 3), dtype=torch.float32, with_bias=(m != 1))


def test_matmul_leading_dims_and_fp16():
    w = torch.randn(24, 64) * 0.05
    qw = ops.nf4_quantize(w, blocksize=64)
    x = torch.randn(2, 3, 64)
    out = ops.nf4_matmul(x, qw)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, ref.matmul(x.reshape(-1, 64), qw.data, qw.absmax, 64, (24, 64)).view(2, 3, 24))
    xh = x.half()
    torch.testing.assert_close(ops.nf4_matmul(xh, qw).float(), ref.matmul(xh, qw.data, qw.absmax, 64, (24, 64)).float(), rtol=1e-2, atol=1e-2)
    xt = torch.randn(64, 5).T  # x with a non-unit stride along K
    torch.testing.assert_close(ops.nf4_matmul(xt, qw), ref.matmul(xt, qw.data, qw.absmax, 64, (24, 64)))
    xh = torch.randn(40, 64).half()  # fp16 x on the tiled path (computes in fp32)
    torch.testing.assert_close(ops.nf4_matmul(xh, qw).float(), ref.matmul(xh, qw.data, qw.absmax, 64, (24, 64)).float(), rtol=1e-2, atol=1e-2)
    assert ops.nf4_matmul(torch.randn(0, 64), qw).shape == (0, 24)  # no rows


def test_matmul_k_not_multiple_of_32_falls_back_or_raises():
    w = torch.randn(8, 40)
    qw = ops.nf4_quantize(w, blocksize=64)
    x = torch.randn(3, 40)
    with pytest.warns(RuntimeWarning, match="K % 32 == 0"):
        out = ops.nf4_matmul(x, qw)
    torch.testing.assert_close(out, ref.matmul(x, qw.data, qw.absmax, 64, (8, 40)))
    with ops.use_backend("cpu"), pytest.raises(RuntimeError, match="K % 32 == 0"):
        ops.nf4_matmul(x, qw)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_matmul_grads(backend):
    w = torch.randn(24, 64) * 0.05
    qw = ops.nf4_quantize(w, blocksize=32)
    x = torch.randn(5, 64, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    with ops.use_backend(backend):
        ops.nf4_matmul(x, qw, bias).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_()
    (x2 @ ops.nf4_dequantize(qw).T + b2).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-4, atol=1e-4)


def test_matmul_gradcheck():
    # gradcheck in float32 (the op takes fp32/bf16/fp16): the op is linear in x and bias
    qw = ops.nf4_quantize(torch.randn(6, 32), blocksize=32)
    x = torch.randn(2, 32, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not double precision": expected here
        assert torch.autograd.gradcheck(lambda a, b: ops.nf4_matmul(a, qw, b), (x, bias), eps=1e-2, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# custom-op registration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    def opcheck(op, inputs):  # called with the schema's arguments: the record's fields, then the backend
        torch.library.opcheck(op.custom_op, (*inputs, backend))

    w = torch.randn(16, 64)
    opcheck(nf4_ops._nf4_quantize_op, nf4_ops.Nf4QuantizeInputs(w, 64))
    data, absmax = ref.quantize(w, 64)
    opcheck(nf4_ops._nf4_dequantize_op, nf4_ops.Nf4DequantizeInputs(data, absmax, 64, [16, 64], torch.bfloat16))
    for m in (2, 20):  # GEMV and tiled paths
        x = torch.randn(m, 64, requires_grad=True)
        bias = torch.randn(16, requires_grad=True)
        opcheck(nf4_ops._nf4_matmul_op, nf4_ops.Nf4MatmulInputs(x, data, absmax, 64, [16, 64], bias))
        opcheck(nf4_ops._nf4_matmul_op, nf4_ops.Nf4MatmulInputs(x, data, absmax, 64, [16, 64], None))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_quantize_inputs_name_the_argument():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        ops.nf4_quantize(w, blocksize=48)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        ops.nf4_quantize(w, blocksize=64.0)
    with pytest.raises(TypeError, match="w must have dtype"):
        ops.nf4_quantize(w.double())
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        ops.nf4_quantize(w.numpy())
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="w must be finite"):
        ops.nf4_quantize(bad)
    bad[3, 5] = float("inf")
    with pytest.raises(ValueError, match="w must be finite"):
        ops.nf4_quantize(bad)
    with pytest.raises(ValueError, match="w must have at least one element"):
        ops.nf4_quantize(torch.empty(0, 64))
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        ops.nf4_quantize(w, double_quant=1)


# grad mode of a call: enable_grad with plain inputs and no_grad / inference_mode take the inference
# fast path when the inputs are good; a bad input must raise the same error on either path
GRAD_MODES = [torch.enable_grad, torch.no_grad, torch.inference_mode]


@pytest.mark.parametrize("grad_mode", GRAD_MODES, ids=lambda f: f.__name__)
def test_bad_matmul_inputs_name_the_argument(grad_mode):
    with grad_mode():
        _bad_matmul_inputs()


def _bad_matmul_inputs():
    qw = ops.nf4_quantize(torch.randn(8, 64), blocksize=64)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="x must have last dimension K=64"):
        ops.nf4_matmul(torch.randn(3, 65), qw)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.nf4_matmul(x.double(), qw)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.nf4_matmul(x.long(), qw)
    with pytest.raises(TypeError, match="qw must be an NF4Weight"):
        ops.nf4_matmul(x, torch.randn(8, 64))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.nf4_matmul(x, qw, torch.randn(9))
    with pytest.raises(TypeError, match="bias must have dtype"):
        ops.nf4_matmul(x, qw, torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="qw.data must hold 256 bytes"):
        ops.nf4_matmul(x, dataclasses.replace(qw, data=qw.data[:-1]))
    with pytest.raises(ValueError, match="qw.absmax must have 8 entries"):
        ops.nf4_matmul(x, dataclasses.replace(qw, absmax=qw.absmax[:-1]))
    with pytest.raises(TypeError, match="qw.data must have dtype"):
        ops.nf4_matmul(x, dataclasses.replace(qw, data=qw.data.to(torch.int8)))
    with pytest.raises(TypeError, match="qw.absmax must have dtype"):
        ops.nf4_matmul(x, dataclasses.replace(qw, absmax=qw.absmax.half()))
    with pytest.raises(ValueError, match="qw.blocksize must be one of"):
        ops.nf4_matmul(x, dataclasses.replace(qw, blocksize=100))
    with pytest.raises(ValueError, match="qw must be a 2-D weight"):
        ops.nf4_matmul(x, ops.nf4_quantize(torch.randn(2, 4, 64)))
    dq = ops.nf4_quantize(torch.randn(8, 64), blocksize=32, double_quant=True)
    with pytest.raises(ValueError, match="qw.nested_absmax must have 1 entries"):
        ops.nf4_matmul(x, dataclasses.replace(dq, nested_absmax=torch.zeros(2)))
    with pytest.raises(TypeError, match="qw.absmax must have dtype"):
        ops.nf4_matmul(x, dataclasses.replace(dq, absmax=dq.absmax.float()))
    with pytest.raises(TypeError, match="qw must be an NF4Weight"):
        ops.nf4_dequantize("weights")


# ---- the inference fast path: the cpu GEMV without the custom op (decode) ----

@pytest.mark.parametrize("lead", [(1, 1), (3,), (2, 8), "strided"], ids=str)
@pytest.mark.parametrize("n,k,blocksize,double_quant", [(37, 256, 32, False), (40, 1024, 64, True), (5, 96, 64, False),
                                                        (17, 4096, 4096, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=str)
def test_inference_fast_path_equals_the_op_path(cpu_isa, monkeypatch, lead, n, k, blocksize, double_quant, dtype, bias_dtype):
    qw = ops.nf4_quantize(_weight((n, k), torch.float32), blocksize=blocksize, double_quant=double_quant)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 2 * k, generator=g)[:, ::2] if lead == "strided" else torch.randn(*lead, k, generator=g)).to(dtype)
    bias = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    op_out = ops.nf4_matmul(x.clone().requires_grad_(), qw, bias).detach()  # autograd wants x: the custom op runs
    monkeypatch.setattr(nf4_ops, "_nf4_matmul_op", lambda *a: pytest.fail("the fast path ran the custom op"))
    for grad_mode in GRAD_MODES:
        with grad_mode():
            fast = ops.nf4_matmul(x, qw, bias)
        assert fast.shape == op_out.shape and fast.dtype == op_out.dtype
        assert torch.equal(fast, op_out)  # the same kernel on the same arguments: the same bits
    torch.testing.assert_close(fast.float(), ref.matmul(x.float(), qw.data, qw.float_absmax(), blocksize, [n, k],
                                                        None if bias is None else bias.float()),
                               atol=0.05, rtol=0.02)


def test_fast_path_is_not_taken_where_the_op_must_run(monkeypatch):
    qw = ops.nf4_quantize(_weight((24, 64), torch.float32), blocksize=64)
    x = torch.randn(2, 64)
    calls = []
    real = nf4_ops._fast_gemv
    monkeypatch.setattr(nf4_ops, "_fast_gemv", lambda *a: calls.append(1) or real(*a))
    ops.nf4_matmul(x.requires_grad_(), qw).sum().backward()  # autograd
    assert x.grad is not None
    with ops.use_backend("reference"):  # another backend forced
        ops.nf4_matmul(x.detach(), qw)
    monkeypatch.setenv("FUSEDLM_BACKEND", "reference")
    ops.nf4_matmul(x.detach(), qw)
    monkeypatch.delenv("FUSEDLM_BACKEND")
    torch.library.opcheck(nf4_ops._nf4_matmul_op.custom_op,
                          (*nf4_ops.Nf4MatmulInputs(x.detach(), qw.data, qw.absmax, 64, [24, 64], None), "cpu"))
    assert not calls
    ops.nf4_matmul(torch.randn(17, 64), qw)  # more rows than a decode GEMV: the op path (asked, declined)
    ops.nf4_matmul(x.detach(), qw)
    assert len(calls) == 2


def test_fast_path_sees_a_weight_change():
    qw = ops.nf4_quantize(_weight((40, 128), torch.float32), blocksize=64)
    other = ops.nf4_quantize(_weight((40, 128), torch.float32, seed=3), blocksize=64)
    x = torch.randn(1, 128)
    with torch.no_grad():
        before = ops.nf4_matmul(x, qw)
        qw.data.copy_(other.data)  # in place
        qw.absmax.copy_(other.absmax)
        assert torch.equal(ops.nf4_matmul(x, qw), ops.nf4_matmul(x, other))
        assert not torch.equal(ops.nf4_matmul(x, qw), before)
        qw.data = torch.zeros(0, dtype=torch.uint8)  # replaced by a bad field: the op path's error
        with pytest.raises(ValueError, match="qw.data must hold"):
            ops.nf4_matmul(x, qw)
        qw.data, qw.blocksize = other.data, 32  # a field the views depend on
        with pytest.raises(ValueError, match="qw.absmax must have 160 entries"):
            ops.nf4_matmul(x, qw)
