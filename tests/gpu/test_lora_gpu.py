"""ops.lora_linear on a CUDA device (triton backend) against the reference, forward and autograd;
skipped without CUDA (tests/gpu/conftest.py)."""
import pytest
import torch

from fusedlm import ops

pytestmark = pytest.mark.skipif("triton" not in ops.available_backends(), reason="triton is not installed")

DEV = "cuda"


def _inputs(m, k, n, r, adapters, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, device=DEV, generator=g) * s).to(dtype)

    x, w, bias = rnd(m, k), rnd(n, k, s=k ** -0.5), rnd(n)
    a = rnd(adapters, r, k, s=k ** -0.5) if adapters > 1 else rnd(r, k, s=k ** -0.5)
    b = rnd(adapters, n, r, s=0.3) if adapters > 1 else rnd(n, r, s=0.3)
    ids = torch.randint(-1, adapters, (m,), device=DEV, generator=g) if adapters > 1 else None
    return x, w, bias, a, b, ids


def _rel(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m,k,n,r,adapters", [(1, 64, 96, 8, 1), (33, 257, 130, 16, 1), (512, 1024, 2048, 16, 1),
                                              (8, 4096, 4096, 16, 8), (129, 200, 72, 4, 3), (0, 64, 64, 8, 1)])
def test_forward_and_grads_match_reference(dtype, m, k, n, r, adapters):
    x, w, bias, a, b, ids = _inputs(m, k, n, r, adapters, dtype)
    gates = torch.rand(adapters, device=DEV, dtype=dtype)
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, gates)]
        with ops.use_backend(backend):
            y = ops.lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0, bias=bias, adapter_ids=ids, gates=leaves[3])
            if m:
                (y.float() * torch.linspace(-1, 1, n, device=DEV)).sum().backward()
        results[backend] = (y, *(t.grad for t in leaves))
    assert results["triton"][0].dtype == dtype and results["triton"][0].shape == (m, n)
    if m == 0:
        return
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    for name, got, want in zip(("y", "dx", "dA", "dB", "dgates"), results["triton"], results["reference"]):
        assert not got.isnan().any(), name
        assert _rel(got, want) <= tol, (name, _rel(got, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nf4_base_weight(dtype):
    """QLoRA: the base product is nf4_matmul on the GPU, the adapter term the LoRA kernel."""
    x, w, bias, a, b, _ = _inputs(40, 512, 256, 16, 1, dtype)
    qw = ops.nf4_quantize(w.float(), blocksize=64)
    with ops.use_backend("reference"):
        want = ops.lora_linear(x, qw, a, b, 2.0)
    with ops.use_backend("triton"):
        got = ops.lora_linear(x, qw, a, b, 2.0)
    assert _rel(got, want) <= 2e-2


def test_strided_input_and_large_offsets():
    """x as a column slice (row stride != K) and, when memory allows, M * N past 2^31 elements."""
    x, w, bias, a, b, _ = _inputs(64, 256, 128, 8, 1, torch.bfloat16)
    wide = torch.randn(64, 512, device=DEV).to(torch.bfloat16)[:, 100:356]
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            out = ops.lora_linear(wide, w, a, b, 1.0, bias=bias)
        if backend == "reference":
            want = out
    assert _rel(out, want) <= 2e-2
    free, _ = torch.cuda.mem_get_info()
    m, k, n = 2**20 + 64, 64, 2048  # M * N = 2^31 + 131072
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GiB free for the > 2^31-element output")
    x, w, bias, a, b, _ = _inputs(m, k, n, 8, 1, torch.bfloat16)
    with ops.use_backend("triton"):
        out = ops.lora_linear(x, w, a, b, 1.0)
    tail = slice(m - 64, m)
    with ops.use_backend("reference"):
        want = ops.lora_linear(x[tail], w, a, b, 1.0)
    assert _rel(out[tail], want) <= 2e-2
