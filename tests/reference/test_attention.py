"""The reference attention against torch's scaled_dot_product_attention, and its edge cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from fusedlm.reference import attention as ref


def _qkv(b, hq, hkv, nq, nk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("n,d", [(1, 8), (17, 16), (64, 80)])
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_matches_sdpa_square(n, d, mode):
    q, k, v = _qkv(2, 4, 4, n, n, d)
    out = ref.attention(q, k, v, ref.MASK_MODES[mode])
    want = F.scaled_dot_product_attention(q, k, v, is_causal=mode == "causal")
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("hq,hkv", [(4, 1), (8, 2), (4, 4)])
def test_gqa_matches_sdpa(hq, hkv):
    q, k, v = _qkv(2, hq, hkv, 9, 9, 16)
    out = ref.attention(q, k, v, ref.CAUSAL)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, want)


def test_bottom_right_causal_and_prefix_and_padding_match_sdpa_bool_mask():
    b, nq, nk = 3, 5, 11
    q, k, v = _qkv(b, 4, 2, nq, nk, 16)
    prefix = torch.tensor([0, 3, 11])
    pad = torch.rand(b, nk, generator=torch.Generator().manual_seed(1)) > 0.3
    pad[:, -1] = True  # every query sees at least its causal last key
    for mode in (ref.CAUSAL, ref.PREFIX, ref.BIDIRECTIONAL):
        mask = ref.visible(nq, nk, mode, prefix, pad)
        out = ref.attention(q, k, v, mode, prefix, pad)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out, want)


def test_bias_and_scale_match_sdpa_float_mask():
    q, k, v = _qkv(2, 4, 4, 7, 13, 16)
    bias = torch.randn(1, 4, 7, 13, dtype=torch.float64)
    out = ref.attention(q, k, v, ref.BIDIRECTIONAL, bias=bias, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out, want)


def test_visibility_rules():
    # causal, bottom-right: Nq=2, Nk=4 -> query 0 sees keys 0..2, query 1 sees 0..3
    m = ref.visible(2, 4, ref.CAUSAL)[0, 0]
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    # Nq > Nk: the first queries see nothing
    m = ref.visible(3, 1, ref.CAUSAL)[0, 0]
    assert m.tolist() == [[False], [False], [True]]
    # prefix: keys < prefix_len visible to all
    m = ref.visible(3, 3, ref.PREFIX, torch.tensor([2]))[0, 0]
    assert m.tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    m = ref.visible(2, 2, ref.PREFIX, 0)[0, 0]
    assert m.tolist() == ref.visible(2, 2, ref.CAUSAL)[0, 0].tolist()
    pad = torch.tensor([[True, False]])
    assert ref.visible(2, 2, ref.BIDIRECTIONAL, key_padding_mask=pad)[0, 0].tolist() == [[True, False], [True, False]]


def test_fully_masked_rows_give_zeros_and_zero_grads():
    q, k, v = _qkv(2, 2, 2, 4, 3, 8)
    q.requires_grad_(True)
    pad = torch.tensor([[False, False, False], [True, True, True]])
    bias = torch.zeros(1, 1, 4, 3, dtype=torch.float64)
    bias[..., 0, :] = float("-inf")  # row 0 of every batch: all visible scores are -inf
    bias.requires_grad_(True)
    out, lse = ref.attention_lse(q, k, v, ref.CAUSAL, None, pad, bias)
    # Nq=4 > Nk=3: query 0 sees nothing causally; batch 0 sees nothing at all
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :, 0] == 0).all()
    assert torch.isinf(lse[0]).all() and torch.isinf(lse[1, :, 0]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[0] == 0).all()
    assert torch.isfinite(bias.grad).all()


def test_single_query_against_cache_sees_everything():
    q, k, v = _qkv(1, 2, 2, 1, 9, 8)
    torch.testing.assert_close(ref.attention(q, k, v, ref.CAUSAL), ref.attention(q, k, v, ref.BIDIRECTIONAL))


def test_lse_and_low_precision_accumulate_in_fp32():
    q, k, v = _qkv(1, 2, 2, 6, 6, 8, dtype=torch.float32)
    out, lse = ref.attention_lse(q.bfloat16(), k.bfloat16(), v.bfloat16(), ref.BIDIRECTIONAL)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    s = (q.bfloat16().float() @ k.bfloat16().float().transpose(-1, -2)) / math.sqrt(8)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


@pytest.mark.parametrize("mode", [ref.CAUSAL, ref.PREFIX, ref.BIDIRECTIONAL])
def test_backward_formula_equals_autograd(mode):
    b, hq, hkv, nq, nk, d = 2, 4, 2, 5, 7, 8
    q, k, v = (t.requires_grad_(True) for t in _qkv(b, hq, hkv, nq, nk, d))
    bias = torch.randn(b, 1, nq, nk, dtype=torch.float64, requires_grad=True)
    prefix = torch.tensor([2, 7])
    pad = torch.ones(b, nk, dtype=torch.bool)
    pad[0, 1] = False
    out, lse = ref.attention_lse(q, k, v, mode, prefix, pad, bias, 0.5)
    go = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v, bias), go)
    dq, dk, dv, ds = ref.attention_backward(go, q, k, v, out, lse, mode, prefix, pad, bias, 0.5)
    for got, w in zip((dq, dk, dv, ds.sum(1, keepdim=True)), want):
        torch.testing.assert_close(got, w)
