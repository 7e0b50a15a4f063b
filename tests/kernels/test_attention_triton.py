"""Triton attention kernels (kernels/attention.py) against the plain-PyTorch reference.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (float32 only, tiny shapes);
with one they run the same cases on CUDA tensors. Gradients are compared with torch autograd
through the reference; dbias comes from the kernel already summed to the bias's broadcast shape
(``bias_grad_shape``), and not at all when the bias needs no gradient.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import dataclasses

import pytest

pytest.importorskip("triton")

from fusedlm.kernels import attention as tk  # noqa: E402
from fusedlm.reference import attention as ref  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
CAUSAL, PREFIX, BIDIRECTIONAL = ref.CAUSAL, ref.PREFIX, ref.BIDIRECTIONAL
ATOL = RTOL = 2e-4  # float32 (exact dots in the interpreter, "tf32x3" on a GPU)

pytestmark = pytest.mark.triton


@dataclasses.dataclass
class Case:
    mode: int
    nq: int
    nk: int
    d: int = 16
    hq: int = 2
    hkv: int = 2
    b: int = 2
    prefix: tuple | None = None  # per batch row, for PREFIX
    pad: tuple | None = None  # number of real (leading) keys per batch row; None = no padding mask
    bias: str | None = None  # None | "full" | "rows" ([1, 1, Nq, Nk] expanded) | "alibi" ([1, Hq, 1, Nk]) | "neginf"
    #                           | "keys" ([B, 1, 1, Nk]) | "queries" ([1, 1, Nq, 1]) | "scalar" ([1, 1, 1, 1])
    blocks: tuple = (16, 16)  # (block_m, block_n)
    strided: bool = False  # q/k/v as transposed views of [B, N, H, D] tensors

    def __str__(self):
        return "-".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v is not None)


CASES = [
    Case(CAUSAL, 17, 17),
    Case(CAUSAL, 1, 33),  # one query against a cache: sees every key
    Case(CAUSAL, 33, 17, blocks=(16, 32)),  # Nq > Nk: the first 16 rows see nothing
    Case(CAUSAL, 33, 33, d=80, hq=4, hkv=1, blocks=(32, 16), strided=True),  # GQA 4, D padded to 128
    Case(BIDIRECTIONAL, 17, 33, d=80, hq=4, hkv=1),
    Case(BIDIRECTIONAL, 1, 17, hq=8, hkv=1, b=1),  # MQA 8
    Case(PREFIX, 33, 33, hq=8, hkv=1, b=3, prefix=(0, 33, 12)),  # GQA 8, prefix 0 / Nk / mid
    Case(PREFIX, 17, 33, prefix=(20, 3), pad=(33, 30), blocks=(16, 32)),
    Case(CAUSAL, 17, 33, pad=(27, 0)),  # batch row 1 fully padded: zeros, no NaN
    Case(BIDIRECTIONAL, 17, 17, pad=(17, 5), bias="full"),
    Case(CAUSAL, 33, 17, bias="rows", blocks=(16, 32)),  # zero strides over batch and heads
    Case(PREFIX, 17, 33, prefix=(9, 16), bias="alibi", hq=4, hkv=2),  # zero strides over batch and rows
    Case(BIDIRECTIONAL, 17, 17, bias="neginf"),  # rows whose visible scores are all -inf
    Case(CAUSAL, 17, 17, d=256, hq=1, hkv=1, b=1),  # the largest head dim
    Case(PREFIX, 17, 17, d=3, prefix=(4, 17)),  # a head dim below the 16-wide block
    Case(CAUSAL, 1, 1),
    Case(CAUSAL, 17, 1, pad=(1, 0)),  # only the last query row sees the one key
    Case(CAUSAL, 128, 257, d=64, hq=4, hkv=1, b=1, pad=(250,), blocks=(32, 64)),
    Case(PREFIX, 33, 40, prefix=(5, 40), pad=(40, 31), bias="keys"),  # dbias: column sums, atomic over tiles
    Case(CAUSAL, 33, 17, hq=4, hkv=2, bias="queries"),  # dbias: row sums (zero: softmax ignores a row shift)
    Case(BIDIRECTIONAL, 17, 33, bias="scalar", blocks=(16, 32)),
]


def _inputs(case: Case, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(h, n):
        if case.strided:  # [B, N, H, D] storage seen as [B, H, N, D]
            return torch.randn(case.b, n, h, case.d, generator=g).transpose(1, 2)
        return torch.randn(case.b, h, n, case.d, generator=g)

    q, k, v = make(case.hq, case.nq), make(case.hkv, case.nk), make(case.hkv, case.nk)
    prefix = torch.tensor(case.prefix, dtype=torch.int64) if case.prefix is not None else None
    pad = None
    if case.pad is not None:
        pad = torch.arange(case.nk).view(1, -1) < torch.tensor(case.pad).view(-1, 1)  # [B, Nk]
    bias = None
    if case.bias == "full":
        bias = torch.randn(case.b, case.hq, case.nq, case.nk, generator=g)
    elif case.bias == "rows":
        bias = torch.randn(1, 1, case.nq, case.nk, generator=g)
    elif case.bias == "alibi":
        slopes = torch.rand(1, case.hq, 1, 1, generator=g)
        bias = -slopes * torch.arange(case.nk, dtype=torch.float32).flip(0).view(1, 1, 1, -1)
    elif case.bias == "keys":
        bias = torch.randn(case.b, 1, 1, case.nk, generator=g)
    elif case.bias == "queries":
        bias = torch.randn(1, 1, case.nq, 1, generator=g)
    elif case.bias == "scalar":
        bias = torch.randn(1, 1, 1, 1, generator=g)
    elif case.bias == "neginf":
        bias = torch.randn(case.b, 1, case.nq, case.nk, generator=g)
        bias[:, :, 3] = float("-inf")  # query row 3 of every head sees only -inf scores
        bias[:, :, 5, 7] = float("-inf")  # one hidden key
    move = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return [move(t) for t in (q, k, v, prefix, pad, bias)]


def _full(bias, case):
    return bias.expand(case.b, case.hq, case.nq, case.nk) if bias is not None else None


def _grad_shape(bias):
    return tuple(bias.shape) if bias is not None else None


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_backward_match_reference(case):
    q, k, v, prefix, pad, bias = _inputs(case)
    scale = case.d ** -0.5
    bm, bn = case.blocks
    out, lse = tk.forward(q, k, v, case.mode, prefix, pad, _full(bias, case), scale, block_m=bm, block_n=bn)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    rbias = bias.detach().clone().requires_grad_() if bias is not None else None
    ref_out, ref_lse = ref.attention_lse(*leaves, case.mode, prefix, pad, rbias, scale)
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out.detach(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse.detach(), atol=ATOL, rtol=RTOL)  # -inf where a row sees nothing

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    if case.strided:  # grad_out as a [B, Nq, Hq, D] layout too
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    ref_out.backward(grad)
    dq, dk, dv, dbias = tk.backward(grad, q, k, v, out, lse, case.mode, prefix, pad, _full(bias, case), scale,
                                    bias_grad_shape=_grad_shape(bias), block_m=bm, block_n=bn)
    for got, leaf, name in ((dq, leaves[0], "dq"), (dk, leaves[1], "dk"), (dv, leaves[2], "dv")):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        assert not got.isnan().any(), name
        torch.testing.assert_close(got, leaf.grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    if bias is None:
        assert dbias is None
    else:
        assert dbias.shape == bias.shape and dbias.dtype == torch.float32
        torch.testing.assert_close(dbias, rbias.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("bias_kind", ["full", "alibi", "rows"])
def test_bias_without_grad_gets_no_gradient_buffer(bias_kind, monkeypatch):
    """A bias that needs no gradient costs no dbias: the dq kernel is built without it and gets a
    dummy pointer, and backward returns None (a [B, Hq, Nq, Nk] float32 buffer for ALiBi at
    B 8, H 32, N 4096 would be 17 GiB)."""
    case = Case(CAUSAL, 33, 33, hq=4, hkv=2, bias=bias_kind)
    q, k, v, prefix, pad, bias = _inputs(case)
    out, lse = tk.forward(q, k, v, CAUSAL, None, None, _full(bias, case), 0.25)
    seen = {}
    launcher = tk._dq_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen["dbias"], seen["DBIAS"] = args[10], kwargs["DBIAS"]
                return launcher[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tk, "_dq_kernel", Spy())
    dq, dk, dv, dbias = tk.backward(torch.ones_like(out), q, k, v, out, lse, CAUSAL, None, None, _full(bias, case), 0.25)
    assert dbias is None and seen["DBIAS"] is False and seen["dbias"] is q
    _, _, _, dbias = tk.backward(torch.ones_like(out), q, k, v, out, lse, CAUSAL, None, None, _full(bias, case), 0.25,
                                 bias_grad_shape=tuple(bias.shape))
    assert seen["DBIAS"] is True and seen["dbias"].shape == bias.shape  # reduced in the kernel, never full size
    with pytest.raises(ValueError, match="bias_grad_shape"):
        tk.backward(torch.ones_like(out), q, k, v, out, lse, CAUSAL, None, None, _full(bias, case), 0.25,
                    bias_grad_shape=(2, 3, 33, 33))


def test_rows_that_see_nothing_give_zeros_and_zero_grads():
    case = Case(CAUSAL, 33, 17, pad=(17, 0), blocks=(16, 16))
    q, k, v, prefix, pad, _ = _inputs(case)
    out, lse = tk.forward(q, k, v, CAUSAL, None, pad, None, 0.25, block_m=16, block_n=16)
    grad = torch.ones_like(out)
    dq, dk, dv, _ = tk.backward(grad, q, k, v, out, lse, CAUSAL, None, pad, None, 0.25, block_m=16, block_n=16)
    # causal with Nq - Nk = 16: rows 0..15 see nothing; batch row 1 is fully padded
    assert torch.equal(out[0, :, :16], torch.zeros_like(out[0, :, :16]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[0, :, :16]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, :, 16:]).all()
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dq[0, :, :16], torch.zeros_like(dq[0, :, :16]))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))


@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("mode,prefix", [(CAUSAL, None), (PREFIX, 8)])
def test_hidden_tiles_are_never_read(mode, prefix):
    """With 16 x 16 tiles and Nq = Nk = 48, query rows 0..15 see keys < 16 only, so key tiles 1
    and 2 must be skipped for them (forward and dq), and query tile 0 for key tiles 1 and 2
    (dk, dv): NaN planted there would otherwise reach the results through 0 * NaN."""
    case = Case(mode, 48, 48, b=1, hq=1, hkv=1)
    q, k, v, _, _, _ = _inputs(case)
    prefix = torch.tensor([prefix], device=DEVICE) if prefix is not None else None
    kw = dict(block_m=16, block_n=16)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 16:], v_nan[:, :, 16:] = float("nan"), float("nan")
    out, lse = tk.forward(q, k_nan, v_nan, mode, prefix, None, None, 0.25, **kw)
    assert torch.isfinite(out[:, :, :16]).all() and torch.isfinite(lse[:, :, :16]).all()
    dq, _, _, _ = tk.backward(torch.ones_like(out), q, k_nan, v_nan, out, lse, mode, prefix, None, None, 0.25, **kw)
    assert torch.isfinite(dq[:, :, :16]).all()

    q_nan = q.clone()
    q_nan[:, :, :16] = float("nan")
    out, lse = tk.forward(q_nan, k, v, mode, prefix, None, None, 0.25, **kw)
    _, dk, dv, _ = tk.backward(torch.ones_like(out), q_nan, k, v, out, lse, mode, prefix, None, None, 0.25, **kw)
    assert torch.isfinite(dk[:, :, 16:]).all() and torch.isfinite(dv[:, :, 16:]).all()
    assert torch.isnan(dk[:, :, :16]).any()  # the planted NaN does reach the tile that sees it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs_with_default_blocks(dtype):
    """bf16/fp16 in, same dtype out, lse in float32 (the interpreter widens them exactly)."""
    case = Case(PREFIX, 17, 33, hq=4, hkv=2, prefix=(5, 0), pad=(33, 20), bias="alibi")
    q, k, v, prefix, pad, bias = _inputs(case)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, lse = tk.forward(q, k, v, PREFIX, prefix, pad, _full(bias, case), 0.25)
    ref_out, ref_lse = ref.attention_lse(q.float(), k.float(), v.float(), PREFIX, prefix, pad, bias, 0.25)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    dq, dk, dv, dbias = tk.backward(grad, q, k, v, out, lse, PREFIX, prefix, pad, _full(bias, case), 0.25)
    rq, rk, rv, rds = ref.attention_backward(grad.float(), q.float(), k.float(), v.float(), out.float(), lse,
                                             PREFIX, prefix, pad, _full(bias, case), 0.25)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    assert dbias is None  # no bias_grad_shape: no bias gradient
    _, _, _, dbias = tk.backward(grad, q, k, v, out, lse, PREFIX, prefix, pad, _full(bias, case), 0.25,
                                 bias_grad_shape=tuple(bias.shape))
    torch.testing.assert_close(dbias, rds.sum((0, 2), keepdim=True), atol=1e-2, rtol=1e-2)


# The sm_90 ahead-of-time build of these kernels (and every other one): tests/kernels/test_aot_sm90.py.


@pytest.mark.parametrize("bias_requires_grad", [False, True])
def test_op_asks_the_kernel_for_a_bias_gradient_only_when_needed(bias_requires_grad, monkeypatch):
    """ops.attention's backward passes bias_grad_shape (the broadcast shape) only for a bias that
    requires grad; the gradient that comes back equals the reference's."""
    from fusedlm import ops

    case = Case(CAUSAL, 17, 17, hq=4, hkv=2, bias="alibi")
    q, k, v, _, _, bias = _inputs(case)
    q.requires_grad_(True)
    bias = bias.requires_grad_(bias_requires_grad)
    asked = []
    backward = tk.backward

    def spy(*args, **kwargs):
        asked.append(kwargs.get("bias_grad_shape"))
        return backward(*args, **kwargs)

    monkeypatch.setattr(tk, "backward", spy)
    with ops.use_backend("triton"):
        out = ops.attention(q, k, v, bias=bias)
    out.sum().backward()
    assert asked == [[1, 4, 1, 17] if bias_requires_grad else None]
    rq, rb = q.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(bias_requires_grad)
    with ops.use_backend("reference"):
        ops.attention(rq, k, v, bias=rb).sum().backward()
    torch.testing.assert_close(q.grad, rq.grad, atol=ATOL, rtol=RTOL)
    if bias_requires_grad:
        assert bias.grad.shape == bias.shape
        torch.testing.assert_close(bias.grad, rb.grad, atol=ATOL, rtol=RTOL)


DECODE_CASES = [
    Case(CAUSAL, 1, 100, hq=8, hkv=2),  # one token against a cache, GQA 4
    Case(CAUSAL, 5, 70, pad=(70, 33), bias="alibi", hq=4, hkv=2),
    Case(PREFIX, 16, 50, prefix=(3, 50)),
    Case(BIDIRECTIONAL, 3, 81, d=80, hq=4, hkv=1, bias="full"),
    Case(CAUSAL, 6, 4, pad=(4, 0)),  # rows that see nothing (Nq > Nk, a fully padded batch row)
]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_split_kv_matches_reference(case, splits):
    """Nq <= DECODE_ROWS: one 16-row tile per (batch, head), the keys split over `splits`
    programs and merged by the combine kernel; out and lse as the reference's (lse -inf and out 0
    for rows that see nothing), and the backward runs from that lse."""
    q, k, v, prefix, pad, bias = _inputs(case)
    scale = case.d ** -0.5
    out, lse = tk.forward(q, k, v, case.mode, prefix, pad, _full(bias, case), scale, splits=splits)
    ref_out, ref_lse = ref.attention_lse(q, k, v, case.mode, prefix, pad, bias, scale)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)
    grad = torch.ones_like(out)
    dq, _, _, _ = tk.backward(grad, q, k, v, out, lse, case.mode, prefix, pad, _full(bias, case), scale)
    rq, _, _, _ = ref.attention_backward(grad, q, k, v, ref_out, ref_lse, case.mode, prefix, pad, _full(bias, case), scale)
    torch.testing.assert_close(dq, rq, atol=ATOL, rtol=RTOL)
