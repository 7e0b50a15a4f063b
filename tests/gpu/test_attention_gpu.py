"""Triton attention kernels on a CUDA device, bf16/fp16 (and fp32), default (H100/H200) block sizes,
against a plain-PyTorch float32 reference with autograd. Skipped without a GPU (tests/gpu/conftest.py).
"""
import math

import pytest
import torch

from fusedlm.reference.attention import BIDIRECTIONAL, CAUSAL, PREFIX

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# max |got - want| / max |want| per dtype; outputs / gradients
TOL = {torch.bfloat16: (2e-2, 4e-2), torch.float16: (5e-3, 1e-2), torch.float32: (1e-4, 1e-4)}


def reference(q, k, v, mode, prefix_len, key_padding_mask, bias, scale):
    """Float32 attention with a materialised mask; rows that see nothing give zeros."""
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    s = scale * q.float() @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias.float()
    i = torch.arange(nq, device=q.device).view(-1, 1)
    j = torch.arange(nk, device=q.device).view(1, -1)
    vis = (j <= i + (nk - nq)).view(1, 1, nq, nk)
    if mode == PREFIX:
        vis = vis | (j.view(1, 1, 1, nk) < prefix_len.view(-1, 1, 1, 1))
    elif mode == BIDIRECTIONAL:
        vis = torch.ones_like(vis)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.view(-1, 1, 1, nk)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see nothing: exp(-inf) = 0
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    return (p @ v) / torch.where(denom > 0, denom, torch.ones_like(denom))


def _rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


CASES = [
    # mode, B, Hq, Hkv, Nq, Nk, D, prefix, padded, bias
    (CAUSAL, 2, 8, 2, 257, 257, 64, None, False, None),
    (CAUSAL, 1, 4, 4, 1, 1000, 128, None, True, None),  # decode against a cache
    (CAUSAL, 2, 8, 1, 300, 129, 80, None, False, "alibi"),  # Nq > Nk, MQA
    (PREFIX, 3, 8, 8, 384, 384, 128, (96, 0, 384), True, None),  # batch row 2 fully padded
    (PREFIX, 3, 4, 1, 200, 333, 256, (333, 7, 150), False, "full"),
    (BIDIRECTIONAL, 2, 8, 2, 129, 511, 64, None, True, "rows"),
    (BIDIRECTIONAL, 1, 2, 2, 1024, 1024, 128, None, False, None),
]


# every case in bf16 and fp16; float32 (exact "ieee" dots, slow to compile) on two of them
PARAMS = [(c, dt) for c in CASES for dt in (torch.bfloat16, torch.float16)] + [
    (CASES[0], torch.float32), (CASES[4], torch.float32)]


@pytest.mark.parametrize("case,dtype", PARAMS, ids=lambda x: str(x) if isinstance(x, torch.dtype) else "-".join(map(str, x)))
def test_triton_attention_matches_reference_on_gpu(case, dtype):
    from fusedlm.kernels import attention as tk

    mode, b, hq, hkv, nq, nk, d, prefix, padded, bias_kind = case
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    q = torch.randn(b, nq, hq, d, device=dev, generator=g).to(dtype).transpose(1, 2)  # strided view
    k = torch.randn(b, hkv, nk, d, device=dev, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, device=dev, generator=g).to(dtype)
    prefix_len = torch.tensor(prefix, device=dev) if prefix is not None else None
    pad = None
    if padded:
        lengths = torch.tensor([nk, nk // 3, 0][:b] if b > 1 else [nk - 5], device=dev)
        pad = torch.arange(nk, device=dev).view(1, -1) < lengths.view(-1, 1)
    bias = None
    if bias_kind == "full":
        bias = torch.randn(b, hq, nq, nk, device=dev, generator=g)
    elif bias_kind == "rows":
        bias = torch.randn(1, 1, nq, nk, device=dev, generator=g)
    elif bias_kind == "alibi":
        slopes = 2.0 ** (-8.0 * torch.arange(1, hq + 1, device=dev) / hq)
        bias = -slopes.view(1, hq, 1, 1) * torch.arange(nk, device=dev).flip(0).float().view(1, 1, 1, nk)
    full_bias = bias.expand(b, hq, nq, nk) if bias is not None else None
    scale = 1.0 / math.sqrt(d)

    out, lse = tk.forward(q, k, v, mode, prefix_len, pad, full_bias, scale)
    torch.cuda.synchronize()
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == (b, hq, nq, d)
    assert not out.isnan().any() and not lse.isnan().any()

    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    rbias = bias.detach().clone().requires_grad_() if bias is not None else None
    want = reference(*leaves, mode, prefix_len, pad, rbias, scale)
    tol_out, tol_grad = TOL[dtype]
    assert _rel_err(out, want) <= tol_out

    grad = torch.randn(out.shape, device=dev, generator=g).to(dtype)
    want.backward(grad.float())
    dq, dk, dv, dbias = tk.backward(grad, q, k, v, out, lse, mode, prefix_len, pad, full_bias, scale)
    torch.cuda.synchronize()
    for name, got, leaf in (("dq", dq, leaves[0]), ("dk", dk, leaves[1]), ("dv", dv, leaves[2])):
        assert got.dtype == dtype and got.shape == leaf.shape, name
        assert not got.isnan().any(), name
        assert _rel_err(got, leaf.grad) <= tol_grad, (name, _rel_err(got, leaf.grad))
    if bias is not None:
        dims = [i for i in range(4) if bias.shape[i] == 1 and dbias.shape[i] != 1]
        reduced = dbias.sum(dims, keepdim=True) if dims else dbias
        assert _rel_err(reduced, rbias.grad) <= tol_grad
    else:
        assert dbias is None
    if padded and b > 2:
        assert torch.equal(out[2], torch.zeros_like(out[2]))  # the fully padded batch row
