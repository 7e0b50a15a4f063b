import pytest
import torch

from tiny_models import batch, fused

from fusedlm.models import DecoderLM, EncoderLM, Seq2SeqLM, get_config


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen2-tiny"])
def test_incremental_decoding_equals_full_forward(name):
    model = fused(name)
    ids, mask = batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache(3, ids.shape[1])
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
        for i in range(5, ids.shape[1]):
            steps.append(model(ids[:, i : i + 1], cache=cache).logits)
    inc = torch.cat(steps, dim=1)
    torch.testing.assert_close(inc[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_prefix_lm_per_row_prompt_lengths():
    model = fused("llama-tiny", attn_mode="prefix")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    prefix = torch.tensor([3, 6])
    with torch.no_grad():
        out = model(ids, prefix_len=prefix).logits
        # a token inside the prefix sees later prefix tokens: changing token 2 changes position 0
        ids2 = ids.clone()
        ids2[:, 2] = (ids2[:, 2] + 1) % 128
        out2 = model(ids2, prefix_len=prefix).logits
        assert (out2[:, 0] - out[:, 0]).abs().max() > 1e-4
        # ... but not tokens after the prefix: changing token 6 leaves positions < 6 alone in row 1
        ids3 = ids.clone()
        ids3[:, 6] = (ids3[:, 6] + 1) % 128
        out3 = model(ids3, prefix_len=prefix).logits
        torch.testing.assert_close(out3[1, :6], out[1, :6])
        assert (out3[0, 4] - out[0, 4]).abs().max() == 0  # row 0: causal after 3, token 4 < 6
        # causal rows equal the causal model when prefix_len is 0 or 1
        causal = model(ids, prefix_len=torch.tensor([1, 0])).logits
        model.config.attn_mode = "causal"
        torch.testing.assert_close(causal, model(ids).logits)
        model.config.attn_mode = "prefix"
        # decoding after the prefix with the cache equals the full forward
        cache = model.new_cache(2, 8)
        steps = [model(ids[:, :6], prefix_len=prefix, cache=cache).logits]
        steps += [model(ids[:, i : i + 1], prefix_len=prefix, cache=cache).logits for i in (6, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix_len"):
        model(ids)


def test_generate_uses_the_cache_consistently():
    model = fused("llama-tiny")
    ids, mask = batch(n=5)
    out = model.generate(ids, 6, attention_mask=mask, eos_token_id=[])  # no eos: six new tokens in every row
    assert out.shape == (3, 11)
    # greedy without a cache: re-run the whole sequence each step
    seq = ids
    full_mask = mask
    for _ in range(6):
        with torch.no_grad():
            nxt = model(seq, attention_mask=full_mask).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        full_mask = torch.cat([full_mask, torch.ones(3, 1, dtype=torch.bool)], 1)
    torch.testing.assert_close(out, seq)


def test_loss_ignores_minus_100():
    model = fused("gpt2-tiny")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, 2:-1].reshape(-1, 128)
    expected = torch.nn.functional.cross_entropy(logits, ids[:, 3:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()  # the attention op is differentiable
    assert model.tok_embed.weight.grad is not None


def test_hidden_states():
    model = fused("llama-tiny")
    ids, _ = batch()
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


def test_bad_inputs():
    model = fused("gpt2-tiny")  # vocab 128, 64 positions
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    cache = model.new_cache(1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="arch"):
        DecoderLM(get_config("bert-tiny"))
    with pytest.raises(ValueError, match="arch"):
        EncoderLM(get_config("gpt2-tiny"))
    with pytest.raises(ValueError, match="arch"):
        Seq2SeqLM(get_config("gpt2-tiny"))


def test_sinusoidal_positions_and_bf16():
    model = fused("llama-tiny", positions="sinusoidal").to(torch.bfloat16)
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        want = fused("llama-tiny", positions="sinusoidal")(ids, attention_mask=mask).logits  # the same weights in fp32
    torch.testing.assert_close(out[mask].float(), want[mask], atol=0.05 * float(want.abs().max()), rtol=0.02)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3, num_return_sequences=2, length_penalty=0.6)])
def test_generate_matches_transformers(tmp_path, name, mode):
    """model.generate equals transformers' generate of the same checkpoint, token for token (left padding, eos hits)."""
    transformers = pytest.importorskip("transformers")
    from fusedlm.interop import hf

    model = fused(name)
    hf.save_pretrained(model, str(tmp_path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = batch(n=6)
    free = model.generate(ids, 8, attention_mask=mask, eos_token_id=[])
    eos = [int(free[0, 8]), int(free[2, 10])]  # tokens rows 0 and 2 emit: both stop early
    got = model.generate(ids, 8, attention_mask=mask, eos_token_id=eos, pad_token_id=0, **mode)
    want = ref.generate(ids, attention_mask=mask.long(), max_new_tokens=8, do_sample=False, eos_token_id=eos,
                        pad_token_id=0, **mode)
    assert got.tolist() == want.tolist()
    assert torch.isin(got[:, 6:], torch.tensor(eos)).any()


def test_last_logits_only():
    model = fused("qwen2-tiny")
    ids, mask = batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        last = model(ids, attention_mask=mask, last_logits_only=True).logits
    assert last.shape == (3, 1, 128)
    torch.testing.assert_close(last, full[:, -1:])
    with pytest.raises(ValueError, match="last_logits_only"):
        model(ids, labels=ids, last_logits_only=True)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])  # tied embedding head / separate lm_head
def test_labels_without_logits_take_the_fused_loss(name):
    """forward(labels=, return_logits=False): the loss of the logits path and its gradients, with no logits."""
    ids, mask = batch()
    labels = ids.masked_fill(~mask, -100)
    labels[0, 2] = -100
    runs = []
    for return_logits in (True, False):
        model = fused(name)
        out = model(ids, attention_mask=mask, labels=labels, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_ref, grads_ref), (loss, grads) = runs
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_labels_without_logits_edges():
    model = fused("llama-tiny")
    ids, _ = batch()
    out = model(ids, labels=torch.full_like(ids, -100), return_logits=False)
    assert out.loss.item() == 0.0  # nothing labelled: 0, not NaN
    with pytest.raises(ValueError, match="labels must have shape"):
        model(ids, labels=ids[:, :-1], return_logits=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_decode_on_the_inference_fast_paths_equals_the_autograd_forward(dtype, quantized):
    # under inference_mode a decode step runs the dense GEMV (ops._gemv), the NF4 GEMV and the
    # attention kernel without their custom ops; with autograd on it runs F.linear and the ops
    from fusedlm.peft import qlora

    model = fused("llama-tiny").to(dtype)
    if quantized:
        qlora.quantize(model, blocksize=32, compute_dtype=None)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits.detach()  # the embedding wants gradients: every op takes its autograd path
    with torch.inference_mode():
        cache = model.new_cache(1, ids.shape[1])
        model(ids[:, :6], cache=cache)
        steps = [model(ids[:, i : i + 1], cache=cache).logits for i in range(6, ids.shape[1])]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], atol=tol, rtol=tol)
