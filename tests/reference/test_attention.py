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


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
@pytest.mark.parametrize("mode", [ref.CAUSAL, ref.PREFIX, ref.BIDIRECTIONAL])
def test_backward_formula_equals_autograd(mode, dropout_p):
    b, hq, hkv, nq, nk, d = 2, 4, 2, 5, 7, 8
    q, k, v = (t.requires_grad_(True) for t in _qkv(b, hq, hkv, nq, nk, d))
    bias = torch.randn(b, 1, nq, nk, dtype=torch.float64, requires_grad=True)
    prefix = torch.tensor([2, 7])
    pad = torch.ones(b, nk, dtype=torch.bool)
    pad[0, 1] = False
    out, lse = ref.attention_lse(q, k, v, mode, prefix, pad, bias, 0.5, dropout_p, 5)
    go = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v, bias), go)
    dq, dk, dv, ds = ref.attention_backward(go, q, k, v, out, lse, mode, prefix, pad, bias, 0.5, dropout_p, 5)
    for got, w in zip((dq, dk, dv, ds.sum(1, keepdim=True)), want):
        torch.testing.assert_close(got, w)


# ---- dropout on the attention probabilities ---------------------------------------------------

# Random123's known-answer vectors for Philox-4x32-10: (counter, key) -> output words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", PHILOX_KAT)
def test_philox_known_answers(counter, key, want):
    words = ref.philox4x32(*(torch.tensor([c]) for c in counter), *key)
    assert [int(w) for w in words] == list(want)


def _explicit_dropout_attention(q, k, v, mode, seed, p, **kw):
    """softmax -> * keep / (1 - p) -> @ v, written the way SDPA's documentation writes it."""
    s = ref.scores(q, k, mode, **kw)
    probs = torch.nan_to_num(torch.softmax(s, dim=-1))  # rows that see nothing: 0
    keep = ref.dropout_keep(seed, p, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return (probs * keep / (1 - p)) @ v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


@pytest.mark.parametrize("mode", [ref.CAUSAL, ref.PREFIX, ref.BIDIRECTIONAL])
def test_dropout_scales_the_normalised_probabilities(mode):
    b, nq, nk = 2, 6, 11
    q, k, v = _qkv(b, 4, 2, nq, nk, 8)
    kw = dict(prefix_len=torch.tensor([3, 11]) if mode == ref.PREFIX else None,
              key_padding_mask=torch.tensor([[True] * nk, [True, False] * 5 + [True]]),
              bias=torch.randn(b, 1, nq, nk, dtype=torch.float64))
    out, lse = ref.attention_lse(q, k, v, mode, dropout_p=0.3, seed=99, **kw)
    torch.testing.assert_close(out, _explicit_dropout_attention(q, k, v, mode, 99, 0.3, **kw))
    torch.testing.assert_close(lse, ref.attention_lse(q, k, v, mode, **kw)[1], rtol=0, atol=0)  # lse unchanged


def test_dropout_zero_is_the_no_dropout_path():
    q, k, v = _qkv(2, 4, 2, 5, 7, 8)
    out, lse = ref.attention_lse(q, k, v, ref.CAUSAL)
    out0, lse0 = ref.attention_lse(q, k, v, ref.CAUSAL, dropout_p=0.0, seed=123)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)


def test_keep_mask_is_a_function_of_seed_and_coordinates():
    big = ref.dropout_keep(7, 0.5, 3, 4, 9, 21)
    assert torch.equal(ref.dropout_keep(7, 0.5, 2, 3, 5, 6), big[:2, :3, :5, :6])  # same (b, h, i, j) -> same bit
    assert torch.equal(ref.dropout_keep(7, 0.5, 3, 4, 9, 21), big)
    assert not torch.equal(ref.dropout_keep(8, 0.5, 3, 4, 9, 21), big)
    assert not torch.equal(ref.dropout_keep(7 + 2**32, 0.5, 3, 4, 9, 21), big)  # the seed's high word counts
    assert ref.dropout_keep(7, 0.0, 3, 4, 9, 21).all()


def test_dropout_threshold_is_exact():
    assert ref.dropout_threshold(0.0) == 0
    assert ref.dropout_threshold(0.5) == 2**23
    assert ref.dropout_threshold(2**-24) == 1 and ref.dropout_threshold(2**-25) == 1
    assert ref.dropout_threshold(1 - 2**-53) == 2**24  # keeps nothing, still no overflow of 24 bits


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_binomial(p):
    keep = ref.dropout_keep(2024, p, 2, 4, 64, 257)
    n = keep.numel()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(int(keep.sum()) - n * (1 - p)) < 5 * sigma
    # neighbours (one Philox call serves four keys; rows and heads use other counters) are independent
    for a, b in ((keep[..., 1:], keep[..., :-1]), (keep[:, :, 1:], keep[:, :, :-1]), (keep[:, 1:], keep[:, :-1])):
        both = (a & b).sum()
        m = a.numel()
        assert abs(int(both) - m * (1 - p) ** 2) < 5 * math.sqrt(m * (1 - p) ** 2 * (1 - (1 - p) ** 2))


def test_dropout_is_unbiased():
    # 400 copies of one batch row: each copy has its own mask (b is a counter coordinate)
    q, k, v = (t.expand(400, -1, -1, -1) for t in _qkv(1, 2, 1, 8, 16, 8))
    want = ref.attention(q[:1], k[:1], v[:1], ref.CAUSAL)
    out = ref.attention(q, k, v, ref.CAUSAL, dropout_p=0.2, seed=3)
    # Var(out_id) = sum_j P_ij^2 v_jd^2 p / (1 - p): allow 5 standard errors of the mean of 400
    probs = torch.softmax(ref.scores(q[:1], k[:1], ref.CAUSAL), dim=-1)
    std_err = ((probs**2 @ v[:1].repeat_interleave(2, dim=1) ** 2) * 0.2 / 0.8 / 400).sqrt()
    assert ((out.mean(0, keepdim=True) - want).abs() <= 5 * std_err).all()
    assert ((out[:1] - want).abs() > 5 * std_err).any()  # one draw is far from the mean


def test_dropout_fully_masked_rows_give_zeros():
    q, k, v = _qkv(2, 2, 2, 4, 3, 8)
    q.requires_grad_(True)
    pad = torch.tensor([[False, False, False], [True, True, True]])
    out, lse = ref.attention_lse(q, k, v, ref.CAUSAL, None, pad, dropout_p=0.5, seed=1)
    assert torch.isfinite(out).all() and (out[0] == 0).all() and (out[1, :, 0] == 0).all()
    dq, dk, dv, _ = ref.attention_backward(torch.ones_like(out), q, k, v, out, lse, ref.CAUSAL, None, pad,
                                           dropout_p=0.5, seed=1)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()


# The recipe as a Triton kernel would write it (docstring of fusedlm.reference.attention), checked
# bit for bit against the reference: Triton's tl.philox is Philox-4x32-10 with the same key split.
def _triton_keep_kernel():
    triton = pytest.importorskip("triton")
    tl = triton.language

    @triton.jit
    def keep_kernel(out_ptr, seed, threshold, h, nq, nk, n, BLOCK: tl.constexpr):
        # out_ptr: int8 [B, H, Nq, Nk] keep mask; one program computes BLOCK consecutive elements
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        j = offs % nk
        i = (offs // nk) % nq
        hh = (offs // (nk * nq)) % h
        b = offs // (nk * nq * h)
        w0, w1, w2, w3 = tl.philox(seed, (j >> 2).to(tl.uint32), i.to(tl.uint32), hh.to(tl.uint32), b.to(tl.uint32))
        r = j & 3
        word = tl.where(r == 0, w0, tl.where(r == 1, w1, tl.where(r == 2, w2, w3)))
        keep = (word >> 8).to(tl.int32) >= threshold
        tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)

    return triton, keep_kernel


@pytest.mark.triton
@pytest.mark.parametrize("seed,p", [(0, 0.5), (12345, 0.1), (2**62 - 7, 0.9), (0x5DEECE66_0BADF00D, 1 / 3)])
def test_keep_mask_matches_a_triton_kernel_bit_for_bit(seed, p):
    triton, kernel = _triton_keep_kernel()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, h, nq, nk = 2, 3, 5, 13
    out = torch.empty(b, h, nq, nk, dtype=torch.int8, device=device)
    kernel[(triton.cdiv(out.numel(), 256),)](out, seed, ref.dropout_threshold(p), h, nq, nk, out.numel(), BLOCK=256)
    assert torch.equal(out.bool().cpu(), ref.dropout_keep(seed, p, b, h, nq, nk))
