"""ops.attention on a CUDA device through the torch.library custom op (triton backend) with
autograd, against the reference backend: KV-cache views, long sequences, D 64/128, GQA, a bias
that requires grad (and one that does not), prefix and padding, opcheck, torch.compile; skipped
without CUDA (tests/gpu/conftest.py)."""
import pytest
import torch

from fusedlm import ops

pytestmark = pytest.mark.skipif("triton" not in ops.available_backends(), reason="triton is not installed")

DEV = "cuda"
TOL = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (5e-3, 1e-2), torch.float32: (2e-4, 2e-4)}


def _rel(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


def _run(backend, q, k, v, grad, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    bias = kw.pop("bias", None)
    if bias is not None:
        bias = bias.detach().clone().requires_grad_(bias.requires_grad)
    with ops.use_backend(backend):
        out = ops.attention(*leaves, bias=bias, **kw)
    out.backward(grad)
    return out, [t.grad for t in leaves], None if bias is None else bias.grad


CASES = [
    # B, Hq, Hkv, Nq, Nk, D, kwargs
    (2, 8, 2, 300, 300, 64, dict(mask="causal")),
    (1, 16, 4, 1024, 1024, 128, dict(mask="prefix", prefix_len=200)),
    (2, 4, 4, 129, 513, 128, dict(mask="bidirectional", key_padding_mask="pad")),
    (2, 8, 1, 64, 320, 64, dict(mask="causal", bias="alibi")),  # MQA, bias with grad (reduced in-kernel)
    (1, 4, 2, 97, 97, 80, dict(mask="bidirectional", bias="t5")),  # [1, H, N, N] bias with grad
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c[:6]) + "-" + "-".join(map(str, c[6].values())))
def test_custom_op_forward_backward_match_reference(case, dtype):
    b, hq, hkv, nq, nk, d, kw = case
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(b, hq, nq, d, device=DEV, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, device=DEV, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, device=DEV, generator=g).to(dtype)
    kw = dict(kw)
    if kw.get("key_padding_mask") == "pad":
        kw["key_padding_mask"] = torch.arange(nk, device=DEV)[None, :] < torch.tensor([nk, nk // 3], device=DEV)[:, None]
    if kw.get("bias") == "alibi":
        slopes = 2.0 ** (-8.0 * torch.arange(1, hq + 1, device=DEV) / hq)
        kw["bias"] = (-slopes.view(1, hq, 1, 1) * torch.arange(nk, device=DEV).flip(0).view(1, 1, 1, nk)).requires_grad_(True)
    elif kw.get("bias") == "t5":
        kw["bias"] = torch.randn(1, hq, nq, nk, device=DEV, generator=g).requires_grad_(True)
    grad = torch.randn(b, hq, nq, d, device=DEV, generator=g).to(dtype)
    out, grads, dbias = _run("triton", q, k, v, grad, **dict(kw))
    r_out, r_grads, r_dbias = _run("reference", q.float(), k.float(), v.float(), grad.float(), **dict(kw))
    tol_out, tol_grad = TOL[dtype]
    assert out.dtype == dtype and _rel(out, r_out) <= tol_out
    for name, got, want in zip(("dq", "dk", "dv"), grads, r_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert _rel(got, want) <= tol_grad, (name, _rel(got, want))
    if dbias is not None:
        assert dbias.shape == kw["bias"].shape and _rel(dbias, r_dbias) <= tol_grad


@pytest.mark.parametrize("d", [64, 128])
def test_kv_cache_views_and_decode(d):
    """k / v as views into a preallocated cache (stride over the full capacity), one new query and a
    chunk of new queries, against contiguous copies through the reference."""
    g = torch.Generator(device=DEV).manual_seed(1)
    cache_k = torch.randn(2, 8, 4096, d, device=DEV, generator=g).to(torch.bfloat16)
    cache_v = torch.randn(2, 8, 4096, d, device=DEV, generator=g).to(torch.bfloat16)
    for nq, filled in ((1, 1000), (1, 4096), (7, 2049)):
        q = torch.randn(2, 32, nq, d, device=DEV, generator=g).to(torch.bfloat16)
        k, v = cache_k[:, :, :filled], cache_v[:, :, :filled]
        with ops.use_backend("triton"):
            out = ops.attention(q, k, v)
        with ops.use_backend("reference"):
            want = ops.attention(q.float(), k.float().contiguous(), v.float().contiguous())
        assert _rel(out, want) <= 2e-2, (nq, filled)


def test_long_sequence_forward_backward():
    """N = 8192 causal, bf16, D 128, GQA: the long-sequence tiles and loop bounds."""
    g = torch.Generator(device=DEV).manual_seed(2)
    n, d = 8192, 128
    q = torch.randn(1, 4, n, d, device=DEV, generator=g).to(torch.bfloat16).requires_grad_(True)
    k = torch.randn(1, 2, n, d, device=DEV, generator=g).to(torch.bfloat16).requires_grad_(True)
    v = torch.randn(1, 2, n, d, device=DEV, generator=g).to(torch.bfloat16).requires_grad_(True)
    with ops.use_backend("triton"):
        out = ops.attention(q, k, v)
    out.float().sum().backward()
    want = torch.nn.functional.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float(),
                                                            is_causal=True, enable_gqa=True)
    assert _rel(out, want) <= 2e-2
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bias_without_grad_allocates_no_score_sized_buffer():
    """A bias that needs no gradient: the backward allocates nothing of [B, H, Nq, Nk] (it was a
    float32 buffer of that size, 17 GiB for ALiBi at B 8, H 32, N 4096)."""
    b, h, n, d = 2, 16, 2048, 64
    g = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = (torch.randn(b, h, n, d, device=DEV, generator=g).to(torch.bfloat16).requires_grad_(True) for _ in range(3))
    alibi = -torch.rand(1, h, 1, n, device=DEV, generator=g)
    with ops.use_backend("triton"):
        out = ops.attention(q, k, v, bias=alibi)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < b * h * n * n * 4 / 8, f"backward used {extra / 2**20:.0f} MiB"


def test_opcheck_and_compile_on_cuda():
    from fusedlm.ops import attention as attention_module

    g = torch.Generator(device=DEV).manual_seed(4)
    q, k, v = (torch.randn(1, 2, 33, 64, device=DEV, generator=g).requires_grad_(True) for _ in range(3))
    bias = torch.randn(1, 2, 33, 33, device=DEV, generator=g).requires_grad_(True)
    inputs = attention_module.AttentionInputs(q, k, v, 0, None, None, bias, 0.125, 0.0, None)
    torch.library.opcheck(attention_module._attention_op.custom_op, (*inputs, "triton"))
    compiled = torch.compile(lambda q, k, v: ops.attention(q, k, v), fullgraph=True)
    with ops.use_backend("triton"):
        got = compiled(q, k, v)
        want = ops.attention(q, k, v)
    assert _rel(got, want) <= 1e-5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_tensors_on_a_second_device():
    """The dispatcher runs the kernels under the inputs' device, whatever the current one is."""
    q, k, v = (torch.randn(1, 2, 65, 64, device="cuda:1") for _ in range(3))
    x = torch.randn(2, 128, device="cuda:1")
    w = torch.randn(64, 128, device="cuda:1")
    for backend in ("triton", "cuda"):
        if backend not in ops.available_backends():
            continue
        with torch.cuda.device(0), ops.use_backend(backend):
            qw = ops.nf4_quantize(w)
            y = ops.nf4_matmul(x, qw)
        with ops.use_backend("reference"):
            y_want = ops.nf4_matmul(x, ops.nf4_quantize(w))
        assert y.device == x.device and _rel(y, y_want) <= 1e-4, backend
    with torch.cuda.device(0), ops.use_backend("triton"):
        out = ops.attention(q, k, v)
    with ops.use_backend("reference"):
        want = ops.attention(q, k, v)
    assert out.device == q.device and _rel(out, want) <= 2e-4
