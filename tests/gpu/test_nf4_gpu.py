"""NF4 kernels on a CUDA device (cuda and triton backends) against the reference; skipped without CUDA."""
import pytest
import torch

from fusedlm import ops
from fusedlm.reference import nf4 as ref

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in ops.available_backends()]


def _backends():
    if not GPU_BACKENDS:
        pytest.skip("neither the cuda nor the triton backend is available")
    return GPU_BACKENDS


@pytest.mark.parametrize("blocksize", ref.BLOCKSIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(7,), (33, 17), (256, 4096)])
def test_quantize_dequantize_byte_identical(blocksize, dtype, shape):
    w = (torch.randn(shape) * 0.05).to(dtype)
    data, absmax = ref.quantize(w, blocksize)
    for backend in _backends():
        with ops.use_backend(backend):
            qw = ops.nf4_quantize(w.cuda(), blocksize=blocksize)
            back = ops.nf4_dequantize(qw)
        assert torch.equal(qw.data.cpu(), data) and torch.equal(qw.absmax.cpu(), absmax), backend
        assert torch.equal(back.cpu(), ref.dequantize(data, absmax, blocksize, shape, dtype)), backend


@pytest.mark.parametrize("m", [1, 3, 16, 100])
@pytest.mark.parametrize("n,k", [(24, 64), (4096, 4096), (11008, 4096), (64, 11008)])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matmul_matches_reference(m, n, k, blocksize, dtype):
    w = torch.randn(n, k) * 0.05
    qw = ops.nf4_quantize(w, blocksize=blocksize, double_quant=(m == 3))
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    expected = ref.matmul(x.float(), qw.data, qw.float_absmax(), blocksize, (n, k), bias.float())
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    qc = qw.to("cuda")
    for backend in _backends():
        with ops.use_backend(backend):
            out = ops.nf4_matmul(x.cuda(), qc, bias.cuda())
        assert out.dtype == dtype
        torch.testing.assert_close(out.float().cpu(), expected, **tol, msg=lambda s: f"{backend}: {s}")
