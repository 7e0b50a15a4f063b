"""generate() itself: bad inputs, model_kwargs that follow the rows, prefix K/V, the models' methods."""
import pytest
import torch

from fusedlm.generation import generate
from fusedlm.generation.processors import no_repeat_ngram, repetition_penalty
from tiny_models import fused

from fusedlm.models import DecoderLM
from fusedlm.peft import routing


@pytest.fixture(scope="module")
def llama():
    return fused("llama-tiny", perturb=())


@pytest.fixture(scope="module")
def t5():
    return fused("t5-tiny", perturb=())


def _ids(b=2, n=5, seed=0):
    return torch.randint(3, 120, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_p=torch.tensor([0.5, 0.0])), "top_p"),
    (dict(do_sample=True, temperature=-0.5), "temperature"),
    (dict(do_sample=True, temperature=torch.tensor([1.0])), "temperature"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha"),
    (dict(penalty_alpha=-0.1, top_k=4), "penalty_alpha"),
    (dict(penalty_alpha=0.5, top_k=1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(num_beams=0), "num_beams"),
    (dict(attention_mask=torch.ones(2, 4)), "attention_mask"),
    (dict(early_stopping="sometimes", num_beams=2), "early_stopping"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(eos_token_id=-3), "eos_token_id"),
    (dict(pad_token_id=1.5), "pad_token_id"),
    (dict(do_sample=True, num_beams=2), "beam sampling"),
])
def test_bad_inputs_name_the_argument(llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(llama, _ids(), **kwargs)


def test_bad_types(llama):
    with pytest.raises(TypeError, match="input_ids"):
        generate(llama, _ids().float())
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate(llama, _ids(), max_new_tokens=2.0)
    with pytest.raises(TypeError, match="top_k"):
        generate(llama, _ids(), do_sample=True, top_k=2.5)
    with pytest.raises(TypeError, match="DecoderLM or Seq2SeqLM"):
        generate(torch.nn.Linear(2, 2), _ids())
    with pytest.raises(ValueError, match="input_ids"):
        generate(llama, _ids()[0])


def _record_routing(model, seen):
    def hook(module, args):
        r = routing.current_routing()
        seen.append(None if r.adapter_ids is None else r.adapter_ids.tolist())
    return model.decoder.blocks[0].attn.q_proj.register_forward_pre_hook(hook)  # inside the model's forward, routed


@pytest.mark.parametrize("mode,rows", [
    (dict(), [5, 7]),
    (dict(num_beams=2), [5, 5, 7, 7]),
    (dict(do_sample=True, num_return_sequences=3), [5, 5, 5, 7, 7, 7]),
    (dict(penalty_alpha=0.5, top_k=3), [5, 5, 5, 7, 7, 7]),  # the candidates' step
])
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_per_row_model_kwargs_follow_the_rows(arch, mode, rows):
    """adapter_ids of a mixed PEFT batch reach every model call, repeated for beams / samples / candidates."""
    model = routing.install(fused("llama-tiny", perturb=()) if arch == "llama" else fused("t5-tiny", perturb=()))
    seen = []
    handle = _record_routing(model, seen)
    try:
        generate(model, _ids(), max_new_tokens=3, eos_token_id=[], adapter_ids=torch.tensor([5, 7]), **mode)
    finally:
        handle.remove()
    assert seen[0] == [5, 7]  # the prompt, before any expansion
    assert rows in seen[1:]
    assert all(s in ([5, 7], rows) for s in seen)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3)])
def test_prefix_kv_equals_the_prefix_tokens_in_the_prompt(llama, mode, monkeypatch):
    """prefix_kv computed from P tokens stands for them: the continuation equals the one of prefix + prompt.
    (Not so in contrastive search, whose context holds the hidden states of the prompt's tokens only.)"""
    prefix, prompt = _ids(2, 3, seed=1), _ids(2, 4, seed=2)
    cache = llama.new_cache(2, 3)
    with torch.no_grad():
        llama(prefix, cache=cache)
    kv = [(cache.k[i], cache.v[i]) for i in range(llama.config.n_layers)]  # each (B, Hkv, 3, D)
    want = generate(llama, torch.cat([prefix, prompt], 1), max_new_tokens=5, eos_token_id=[], **mode)
    # the model's caches hold the prefix (as a prefix-tuned model's do): generate runs on them unchanged
    monkeypatch.setattr(llama, "new_cache", lambda b, n: DecoderLM.new_cache(llama, b, n, prefix_kv=kv))
    got = generate(llama, prompt, max_new_tokens=5, eos_token_id=[], **mode)
    assert got.tolist() == want[:, 3:].tolist()


def test_model_methods_delegate(llama, t5):
    ids = _ids()
    assert llama.generate(ids, 4, num_beams=2).tolist() == generate(llama, ids, max_new_tokens=4, num_beams=2).tolist()
    assert t5.generate(ids, max_new_tokens=4).tolist() == generate(t5, ids, max_new_tokens=4).tolist()
    assert t5.generate(ids, 4)[:, 0].tolist() == [t5.config.decoder_start_token_id] * 2


def test_output_length_when_every_row_stops_early(llama):
    ids = _ids()
    free = generate(llama, ids, max_new_tokens=8, eos_token_id=[])
    eos = sorted({int(free[0, 6]), int(free[1, 6])})  # both rows emit one by their 2nd new token
    out = generate(llama, ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    first = [min(j for j in range(5, 13) if int(free[r, j]) in eos) for r in range(2)]
    assert out.shape[1] == max(first) + 1  # stops at the step the last row finishes
    for r in range(2):
        assert out[r, : first[r] + 1].tolist() == free[r, : first[r] + 1].tolist()
        assert out[r, first[r] + 1:].tolist() == [0] * (out.shape[1] - first[r] - 1)


def test_processors_by_hand():
    scores = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    ids = torch.tensor([[0, 1, 1, 3]])
    got = repetition_penalty(scores, ids, 2.0)
    assert got.tolist() == [[0.5, -2.0, 2.0, 0.25]]
    assert repetition_penalty(scores, ids, 2.0, skip=torch.tensor([2])).tolist() == [[1.0, -2.0, 2.0, 0.25]]
    # 2-grams seen: (0,1), (1,1), (1,3); the last token is 3 -> nothing starts with 3: nothing banned
    assert no_repeat_ngram(scores, ids, 2).tolist() == scores.tolist()
    ids = torch.tensor([[0, 1, 2, 1]])  # last token 1: (1, 2) was seen -> 2 banned
    assert no_repeat_ngram(scores, ids, 2).tolist() == [[1.0, -1.0, float("-inf"), 0.5]]


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=2), dict(penalty_alpha=0.6, top_k=3),
                                  dict(do_sample=True, top_k=20, num_return_sequences=2)])
def test_mixed_lora_batch_equals_each_adapter_alone(mode):
    """Row i of a mixed batch (adapter_ids) generates what the model with only adapter i generates."""
    from fusedlm import peft

    model = fused("llama-tiny", perturb=())
    peft.apply_lora(model, r=4, targets="all", name="a")
    peft.apply_lora(model, r=2, targets=("q", "v"), name="b")
    with torch.no_grad():  # B starts at zero (peft's init): give the adapters an effect
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn_like(p))
    ids = _ids(3, 5, seed=3)
    kw = dict(max_new_tokens=5, eos_token_id=[], **mode)
    mixed = generate(model, ids, adapter_ids=torch.tensor([0, 1, -1]), generator=torch.Generator().manual_seed(0), **kw)
    alone = [generate(model, ids, adapter_ids=torch.tensor([a] * 3), generator=torch.Generator().manual_seed(0), **kw)
             for a in (0, 1, -1)]
    per = mixed.shape[0] // 3  # rows per prompt
    for r in range(3):
        assert mixed[r * per:(r + 1) * per].tolist() == alone[r][r * per:(r + 1) * per].tolist()
    assert alone[0].tolist() != alone[2].tolist()  # the adapters do change the output


def test_prompt_tuned_model_generates_with_the_cache():
    """A PromptModel (virtual tokens on the first call) generates what re-running it without a cache gives."""
    from fusedlm import peft

    pm = peft.apply_prompt_tuning(fused("llama-tiny", perturb=()), n_virtual_tokens=4)
    ids = _ids(2, 5)
    out = generate(pm, ids, max_new_tokens=4, eos_token_id=[])
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, pm(seq).logits[:, -1:].argmax(-1)], 1)
    assert out.tolist() == seq.tolist()
