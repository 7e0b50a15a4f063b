"""Prompt tuning, P-tuning and prefix tuning on fusedlm models (peft parity: tests/interop/test_peft.py)."""

import pytest
import torch

from tiny_models import assert_close, batch, fused, run

from fusedlm import peft

P = 3
METHODS = {
    "prompt": lambda m: peft.apply_prompt_tuning(m, n_virtual_tokens=P),
    "p-mlp": lambda m: peft.apply_p_tuning(m, n_virtual_tokens=P, hidden_size=24),
    "p-lstm": lambda m: peft.apply_p_tuning(m, n_virtual_tokens=P, encoder="LSTM", hidden_size=12),
    "prefix": lambda m: peft.apply_prefix_tuning(m, n_virtual_tokens=P),
    "prefix-proj": lambda m: peft.apply_prefix_tuning(m, n_virtual_tokens=P, projection=True, hidden_size=20),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
@torch.no_grad()
def test_left_padded_row_equals_the_row_alone(method, name):
    pm = METHODS[method](fused(name))
    ids, mask = batch()
    out = pm(ids, attention_mask=mask).logits
    assert out.shape == (3, 9, 128)  # the real positions only
    for row in (1, 2):
        keep = mask[row]
        alone = pm(ids[row:row + 1, keep]).logits
        assert_close(out[row:row + 1, keep], alone)


@pytest.mark.parametrize("method", ["prompt", "p-lstm", "prefix-proj"])
def test_prompt_output_is_the_model_on_prepended_embeddings(method):
    m = fused("llama-tiny")
    pm = METHODS[method](m)
    ids, _ = batch()
    labels = ids.clone()
    labels[:, :2] = -100
    out = pm(ids, labels=labels)
    if method == "prefix-proj":  # per layer (k, v) from the table viewed (P, 2L, Hkv, D)
        flat = pm.prompt_encoder()
        kv = flat.view(P, 4, 2, 16).permute(1, 2, 0, 3)[:, None].expand(4, 3, 2, P, 16)
        ref = m(ids, labels=labels, cache=m.new_cache(3, ids.shape[1], prefix_kv=[(kv[0], kv[1]), (kv[2], kv[3])]))
        assert_close(out.logits, ref.logits)
    else:
        x = torch.cat([pm.prompt_encoder()[None].expand(3, P, 64), m.embed(ids)], dim=1)
        ext = torch.cat([torch.full((3, P), -100), labels], dim=1)
        ref = m(inputs_embeds=x, labels=ext)
        assert_close(out.logits, ref.logits[:, P:])
    assert_close(out.loss, ref.loss)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny"])
def test_gradients_reach_exactly_the_prompt_encoder(method, name):
    pm = METHODS[method](fused(name))
    pm.train()
    ids, mask = batch()
    run(pm, ids, mask).pow(2).mean().backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert with_grad == trainable == {n for n, _ in pm.named_parameters() if n.startswith("prompt_encoder.")}
    assert peft.trainable_parameters(pm)[0] == sum(p.numel() for p in pm.prompt_encoder.parameters())


def _greedy(m, ids, mask, steps, seq2seq):
    """Cached greedy decoding, the generation contract: new_cache, then one token per call."""
    cache = m.new_cache(ids.shape[0], (1 if seq2seq else ids.shape[1]) + steps)
    if seq2seq:
        memory = m.encode(ids, mask)
        tok = torch.zeros(ids.shape[0], 1, dtype=torch.long)
        call = lambda t: m(decoder_input_ids=t, encoder_out=memory, attention_mask=mask, cache=cache, last_logits_only=True)  # noqa: E731
        out, seq = call(tok), [tok]
    else:
        out, seq = m(ids, attention_mask=mask, cache=cache, last_logits_only=True), [ids]
        call = lambda t: m(t, cache=cache, last_logits_only=True)  # noqa: E731
    for _ in range(steps):
        seq.append(out.logits[:, -1].argmax(-1, keepdim=True))
        out = call(seq[-1])
    return torch.cat(seq, dim=1), out.logits[:, -1]


@pytest.mark.parametrize("method", ["prompt", "prefix", "p-mlp"])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "t5-tiny"])
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward(method, name):
    pm = METHODS[method](fused(name))
    seq2seq = pm.config.arch == "encoder-decoder"
    ids, mask = batch(n=6)
    seq, last = _greedy(pm, ids, mask, 4, seq2seq)
    if seq2seq:
        full = pm(ids, attention_mask=mask, decoder_input_ids=seq).logits[:, -1]
    else:
        full = pm(seq, attention_mask=torch.cat([mask, torch.ones(3, 4, dtype=torch.bool)], 1)).logits[:, -1]
    assert_close(last, full)


def test_generation_runs_on_the_wrapper():
    generation = pytest.importorskip("fusedlm.generation")
    pm = METHODS["prefix"](fused("llama-tiny"))
    ids, mask = batch(n=6)
    out = generation.generate(pm, ids, attention_mask=mask, max_new_tokens=4)
    seq, _ = _greedy(pm, ids, mask, 4, False)
    assert torch.equal(out, seq)


def test_token_init_repeats_and_truncates():
    m = fused("llama-tiny")
    pm = peft.apply_prompt_tuning(m, n_virtual_tokens=5, init_token_ids=[7, 9])
    assert torch.equal(pm.prompt_encoder(), m.embed(torch.tensor([7, 9, 7, 9, 7])))
    pm = peft.apply_prompt_tuning(fused("llama-tiny"), n_virtual_tokens=2, init_token_ids=[4, 5, 6])
    assert torch.equal(pm.prompt_encoder(), pm.model.embed(torch.tensor([4, 5])))


def test_seq2seq_tables_have_peft_shapes():
    m = fused("t5-tiny")
    assert peft.apply_prompt_tuning(m, n_virtual_tokens=P).prompt_encoder.embedding.weight.shape == (2 * P, 64)
    pm = peft.apply_prefix_tuning(fused("t5-tiny"), n_virtual_tokens=P)
    assert pm.prompt_encoder.embedding.weight.shape == (P, 2 * 2 * 4 * 16)  # (P, L·2·Hkv·D)
    kv = pm.prefix_kv(2, torch.float32, decoder=True)  # decoder layer i reads slot 2i mod L
    assert torch.equal(kv[1][0], kv[0][0]) and kv[0][0].shape == (2, 4, P, 16)


@pytest.mark.parametrize("make, match", [
    (lambda: peft.apply_prompt_tuning(fused("llama-tiny"), n_virtual_tokens=0), "n_virtual_tokens must be > 0"),
    (lambda: peft.apply_p_tuning(fused("llama-tiny"), encoder="GRU"), "MLP' or 'LSTM"),
    (lambda: peft.apply_prompt_tuning(fused("llama-tiny"), init_token_ids=[]), "at least one"),
    (lambda: peft.apply_prefix_tuning(fused("t5-tiny", n_decoder_layers=3)), "n_decoder_layers"),
    (lambda: peft.apply_prefix_tuning(torch.nn.Linear(2, 2)), "DecoderLM"),
])
def test_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
