"""The model-layer features that PEFT, generation and training build on: inputs_embeds, explicit
positions, prefix keys/values, the cache's reorder/truncate, dropout, token log-probs."""
import pytest
import torch

from fusedlm import ops
from tiny_models import fused

from fusedlm.models import get_config
from fusedlm.models.logprobs import token_logprobs

DECODERS = ["gpt2-tiny", "llama-tiny", "qwen2-tiny"]


def _model(name, **kw):
    return fused(name, perturb=("norm", "bias"), **kw)  # non-trivial norms and biases


def _ids(b=3, n=7, seed=0):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _left_padded(b=3, n=7):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, :3] = False
    return mask


def _prefix_of(model, ids):
    """Per-layer (k, v) of running `ids` through the model: what a cache holds after them."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    model(ids, cache=cache)
    return [(cache.k[i].clone(), cache.v[i].clone()) for i in range(model.config.n_layers)]


@torch.no_grad()
@pytest.mark.parametrize("name", DECODERS)
def test_inputs_embeds_and_position_ids_equal_the_default_path(name):
    model = _model(name)
    ids, mask = _ids(), _left_padded()
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(model(inputs_embeds=model.embed(ids), attention_mask=mask).logits, out)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)  # what pad-aware positions are
    torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=pos).logits, out)
    shifted = model(ids, attention_mask=mask, position_ids=2 * pos).logits  # (RoPE ignores a constant shift)
    assert (shifted - out)[mask].abs().max() > 1e-4  # positions do reach the model
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=torch.zeros(3, 7, 5))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(ids, position_ids=pos[:, :3])


@torch.no_grad()
@pytest.mark.parametrize("name", DECODERS)
def test_prefix_kv_equals_continuing_after_those_tokens(name):
    """Prefix keys/values count as P past tokens: the tokens after them see exactly what they would
    see after P real tokens, with or without a cache, decoding step by step too."""
    model = _model(name)
    a, b = _ids(n=4, seed=1), _ids(n=5, seed=2)
    full = model(torch.cat([a, b], 1)).logits[:, 4:]
    prefix = _prefix_of(model, a)
    torch.testing.assert_close(model(b, cache=model.new_cache(3, 5, prefix_kv=prefix)).logits, full, atol=1e-5, rtol=1e-5)
    cache = model.new_cache(3, 5, prefix_kv=prefix)
    steps = [model(b[:, :3], cache=cache).logits]
    assert cache.length == 7 and cache.n_prefix == 4
    steps += [model(b[:, i : i + 1], cache=cache).logits for i in (3, 4)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="first call"):
        cache.add_prefix(prefix)
    with pytest.raises(ValueError, match=r"prefix_kv\[0\] must be"):
        model.new_cache(3, 5, prefix_kv=[(k, v[:, :, :1]) for k, v in prefix])
    with pytest.raises(ValueError, match="one per layer"):
        model.new_cache(3, 5, prefix_kv=prefix[:1])


@torch.no_grad()
def test_prefix_kv_with_padding_and_prefix_lm():
    model = _model("llama-tiny")
    a, b, mask = _ids(n=3, seed=1), _ids(n=6, seed=2), _left_padded(n=6)
    prefix = _prefix_of(model, a)
    full = model(torch.cat([a, b], 1), attention_mask=torch.cat([torch.ones(3, 3, dtype=torch.bool), mask], 1)).logits
    got = model(b, attention_mask=mask, cache=model.new_cache(3, 6, prefix_kv=prefix)).logits
    torch.testing.assert_close(got[mask], full[:, 3:][mask], atol=1e-5, rtol=1e-5)
    # prefix_len counts the sequence's own tokens: the prefix keys come before them (a cache
    # continuation counts every key before it, so the same keys are prefix_len=5 there)
    got = model(b, prefix_len=2, cache=model.new_cache(3, 6, prefix_kv=prefix)).logits
    cache = model.new_cache(3, 9)
    model(a, cache=cache)
    want = model(b, prefix_len=5, cache=cache).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", ["t5-tiny", "bart-tiny"])
def test_seq2seq_prefixes(name):
    model = _model(name)
    src, dec = _ids(n=6), _ids(n=5, seed=3)
    # encoder prefix: extra keys/values every source token sees
    prefix = [(torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16)) for _ in range(2)]
    mem = model.encode(src, cache=model.new_cache(3, 6, prefix_kv=prefix, encoder=True))
    assert mem.shape == (3, 6, 64) and (mem - model.encode(src)).abs().max() > 1e-3
    # cross prefix = keys/values of extra memory rows: equals attending to the concatenated memory
    memory = model.encode(src)
    extra = torch.randn(3, 2, 64)
    cross = [(blk.cross_attn._heads(blk.cross_attn.k_proj(extra), 4), blk.cross_attn._heads(blk.cross_attn.v_proj(extra), 4))
             for blk in model.decoder.blocks]
    want = model(decoder_input_ids=dec, encoder_out=torch.cat([extra, memory], 1)).logits
    got = model(decoder_input_ids=dec, encoder_out=memory, cache=model.new_cache(3, 5, cross_prefix_kv=cross)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # ... and with the cache, decoding one token at a time (the cache keeps the prefix and its mask)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    want = model(decoder_input_ids=dec, encoder_out=torch.cat([extra, memory], 1),
                 attention_mask=torch.cat([torch.ones(3, 2, dtype=torch.bool), mask], 1)).logits
    cache = model.new_cache(3, 5, cross_prefix_kv=cross)
    steps = [model(decoder_input_ids=dec[:, :1], encoder_out=memory, attention_mask=mask, cache=cache).logits]
    steps += [model(decoder_input_ids=dec[:, i : i + 1], encoder_out=memory, attention_mask=mask, cache=cache).logits for i in range(1, 5)]
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=1e-5, rtol=1e-5)
    # decoder self-attention prefix
    a = _ids(n=2, seed=5)
    full = model(decoder_input_ids=torch.cat([a, dec], 1), encoder_out=memory).logits[:, 2:]
    c = model.new_cache(3, 2)
    model(decoder_input_ids=a, encoder_out=memory, cache=c)
    prefix = [(c.k[i].clone(), c.v[i].clone()) for i in range(2)]
    torch.testing.assert_close(model(decoder_input_ids=dec, encoder_out=memory, cache=model.new_cache(3, 5, prefix_kv=prefix)).logits,
                               full, atol=1e-5, rtol=1e-5)
    # inputs_embeds on both sides
    torch.testing.assert_close(model(inputs_embeds=model.embed(src), decoder_inputs_embeds=model.embed(dec)).logits,
                               model(src, decoder_input_ids=dec).logits)


@torch.no_grad()
def test_encoder_inputs_embeds_prefix_and_no_logits():
    model = _model("bert-tiny")
    ids = _ids()
    out = model(ids)
    torch.testing.assert_close(model(inputs_embeds=model.embed(ids)).logits, out.logits)
    bare = model(ids, return_logits=False)
    assert bare.logits is None
    torch.testing.assert_close(bare.last_hidden_state, out.last_hidden_state)
    prefix = [(torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16)) for _ in range(2)]
    assert (model(ids, cache=model.new_cache(3, 7, prefix_kv=prefix)).last_hidden_state - out.last_hidden_state).abs().max() > 1e-3
    with pytest.raises(ValueError, match="return_logits"):
        model(ids, labels=ids, return_logits=False)


@torch.no_grad()
def test_cache_reorder_and_truncate():
    model = _model("llama-tiny")
    ids, mask = _ids(n=6), _left_padded(n=6)
    nxt = _ids(n=1, seed=9)
    cache = model.new_cache(3, 8)
    model(ids, attention_mask=mask, cache=cache)
    index = torch.tensor([2, 0, 0, 1])  # reorder and expand (beams, candidates)
    cache.reorder(index)
    assert cache.batch == 4
    got = model(nxt[index], cache=cache).logits
    want = model(torch.cat([ids, nxt], 1)[index], attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)[index]).logits
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-5, rtol=1e-5)
    cache.truncate(6)  # forget the token just written and write another
    other = (nxt + 1) % 128
    got = model(other[index], cache=cache).logits
    want = model(torch.cat([ids, other], 1)[index], attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)[index]).logits
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="length must be in"):
        cache.truncate(9)
    with pytest.raises(ValueError, match="batch of 4 rows"):
        model(nxt, cache=cache)


def test_dropout_is_training_only_and_reaches_attention(monkeypatch):
    model = _model("gpt2-tiny", dropout=0.2, attn_dropout=0.3, mlp_dropout=0.1)
    ids = _ids()
    with torch.no_grad():
        ref = _model("gpt2-tiny")(ids).logits
        torch.testing.assert_close(model(ids).logits, ref)  # eval: no dropout anywhere
    seen = []
    real = ops.attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p", 0.0))
        return real(*args, **{k: v for k, v in kwargs.items() if k != "dropout_p"})

    monkeypatch.setattr(ops, "attention", spy)
    model.train()
    torch.manual_seed(1)
    a = model(ids).logits
    assert seen == [0.3] * model.config.n_layers
    assert (a - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="dropout must be in"):
        get_config("gpt2-tiny", dropout=1.0)


def test_token_logprobs_and_hidden_only_forward():
    model = _model("qwen2-tiny")
    ids = _ids()
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    lp = token_logprobs(out.logits[:, :-1], labels[:, 1:])
    assert lp.shape == (3, 6) and lp.dtype == torch.float32
    assert torch.all(lp[0, :3] == 0)
    expected = -torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="none").view(3, 6)
    torch.testing.assert_close(lp, expected)
    torch.testing.assert_close(-lp.sum() / (labels[:, 1:] != -100).sum(), out.loss)
    bare = model(ids, return_logits=False)
    assert bare.logits is None
    torch.testing.assert_close(model.head(bare.last_hidden_state), out.logits)
    with pytest.raises(ValueError, match="labels must have shape"):
        token_logprobs(out.logits, labels[:, :3])
