"""NF4 kernels on a CUDA device (cuda and triton backends) against the reference; skipped without CUDA."""
import dataclasses

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
    w = torch.randn(n, k, device="cuda") * 0.05
    with ops.use_backend("reference"):  # the reference's bytes, whichever backend is tested
        qc = ops.nf4_quantize(w, blocksize=blocksize, double_quant=(m == 3))
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    # the reference on the device too: on the CPU it dominated the run (144 cases of up to 45M weights)
    expected = ref.matmul(x.float(), qc.data, qc.float_absmax(), blocksize, (n, k), bias.float()).cpu()
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    for backend in _backends():
        with ops.use_backend(backend):
            out = ops.nf4_matmul(x, qc, bias)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float().cpu(), expected, **tol, msg=lambda s: f"{backend}: {s}")


def _close(got, want, dtype):
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_blocks_quantise_to_zero(dtype):
    """All-zero blocks (absmax 0), a zero tail block and a denormal-sized block: the bytes and
    absmax equal the reference's (the 1e-38 clamp is a float32 constant on every Triton)."""
    w = torch.randn(10 * 64 + 17) * 0.05
    w[64:192] = 0
    w[-17:] = 0
    w[256:320] = 1e-39
    w = w.to(dtype)
    data, absmax = ref.quantize(w, 64)
    for backend in _backends():
        with ops.use_backend(backend):
            qw = ops.nf4_quantize(w.cuda(), blocksize=64)
            back = ops.nf4_dequantize(qw)
        assert torch.equal(qw.data.cpu(), data) and torch.equal(qw.absmax.cpu(), absmax), backend
        assert torch.equal(back[64:192].cpu(), torch.zeros(128, dtype=dtype)), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_misaligned_weight_strided_x_odd_k_and_backward(dtype):
    """The packed weight at an odd byte offset (the CUDA GEMV then reads bytewise instead of copying
    the weight), x as a strided view, an odd K (triton's flat-index path), and the gradient to x."""
    n, k = 96, 256
    w = torch.randn(n, k) * 0.05
    qw = ops.nf4_quantize(w, blocksize=64).to("cuda")
    storage = torch.empty(qw.data.numel() + 1, dtype=torch.uint8, device="cuda")
    storage[1:].copy_(qw.data.view(-1))
    shifted = dataclasses.replace(qw, data=storage[1:].view(-1, 1))
    assert shifted.data.data_ptr() % 16 != 0
    x = torch.randn(4, 2 * k, device="cuda").to(dtype)[:, ::2]  # row stride 2K, column stride 2
    expected = ref.matmul(x.float().cpu(), qw.data.cpu(), qw.absmax.cpu(), 64, (n, k), None)
    for backend in _backends():
        with ops.use_backend(backend):
            _close(ops.nf4_matmul(x, shifted), expected, dtype)
            xg = x.detach().clone().requires_grad_(True)
            ops.nf4_matmul(xg, qw).float().sum().backward()
        w_deq = ref.dequantize(qw.data.cpu(), qw.absmax.cpu(), 64, (n, k), torch.float32)
        _close(xg.grad, w_deq.sum(0).expand(4, k), dtype)

    odd = torch.randn(50, 1001) * 0.05
    qo = ops.nf4_quantize(odd, blocksize=64).to("cuda")
    for m in (1, 3, 40):
        xo = torch.randn(m, 1001).to(dtype)
        want = ref.matmul(xo.float(), qo.data.cpu(), qo.absmax.cpu(), 64, (50, 1001), None)
        with ops.use_backend("triton"):
            _close(ops.nf4_matmul(xo.cuda(), qo), want, dtype)
