"""Greedy and beam search token for token against transformers 5 `generate`, on tiny random LLaMA (GQA),
GPT-2, T5 and BART models loaded from the same checkpoints; beam sequence scores within 1e-4."""
import pytest
import torch

from tiny_models import GENERATION, SEQ2SEQ, prompts
from fusedlm.generation import generate

NAMES = list(GENERATION)
NEW = 10


def _eos_it_emits(ours, ids, mask, **kw):
    """Two token ids the model does emit (one early in row 0, one in row 1), so eos hits happen."""
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[], **kw)
    n = ids.shape[1] if ours.config.arch == "decoder" else 1
    return [int(out[0, n + 2]), int(out[1, n + 5])]


def _hf(ref, ids, mask, **kw):
    return ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kw)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["plain", "eos", "processors", "min_new_tokens"])
def test_greedy_matches_transformers(load_pair, name, case):
    ref, ours = load_pair(name)
    ids, mask = prompts(name, padded=True)
    kw = {}
    if case != "plain":
        kw["eos_token_id"] = _eos_it_emits(ours, ids, mask)
    if case == "processors":
        kw.update(repetition_penalty=1.4, no_repeat_ngram_size=2)
    if case == "min_new_tokens":
        kw.update(min_new_tokens=7)
    want = _hf(ref, ids, mask, **kw)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, **kw)
    assert got.tolist() == want.tolist()
    if case == "eos":  # the eos hits shaped the output: a row stopped early and was padded
        n = ids.shape[1] if name not in SEQ2SEQ else 1
        assert torch.isin(got[:, n:], torch.tensor(kw["eos_token_id"])).any()


def test_greedy_infers_the_mask_from_pad_tokens(load_pair):
    """No mask, pad tokens in the prompt (pad != eos): the pads are masked, as transformers infers."""
    name = "llama"
    ref, ours = load_pair(name)
    ids, mask = prompts(name, padded=True)  # pads are token 0 = llama's pad_token_id (eos is 2)
    want = ref.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert generate(ours, ids, max_new_tokens=NEW).tolist() == want.tolist()
    assert generate(ours, ids, attention_mask=mask, max_new_tokens=NEW).tolist() == want.tolist()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_search_matches_transformers(load_pair, name, length_penalty, early_stopping):
    ref, ours = load_pair(name)
    ids, mask = prompts(name, padded=True)
    kw = dict(num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=2,
              eos_token_id=_eos_it_emits(ours, ids, mask, num_beams=4))
    want = _hf(ref, ids, mask, output_scores=True, return_dict_in_generate=True, **kw)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, output_scores=True, **kw)
    assert got.sequences.tolist() == want.sequences.tolist()
    torch.testing.assert_close(got.sequence_scores, want.sequences_scores, atol=1e-4, rtol=0)
    assert len(got.scores) == len(want.scores)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_beam_search_hits_eos_and_pads_like_transformers(load_pair, name):
    """Hypotheses of different lengths: the shorter ones are filled as transformers fills them."""
    ref, ours = load_pair(name)
    ids, mask = prompts(name, padded=True)
    eos = _eos_it_emits(ours, ids, mask, num_beams=3)
    kw = dict(num_beams=3, num_return_sequences=3, eos_token_id=eos, length_penalty=-0.5)
    want = _hf(ref, ids, mask, **kw)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, **kw)
    assert got.tolist() == want.tolist()
    n = ids.shape[1] if name not in SEQ2SEQ else 1
    assert torch.isin(got[:, n:], torch.tensor(eos)).any()


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_beam_search_with_processors(load_pair, name):
    ref, ours = load_pair(name)
    ids, mask = prompts(name, padded=True)
    kw = dict(num_beams=4, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=6,
              eos_token_id=_eos_it_emits(ours, ids, mask, num_beams=4))
    assert generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, **kw).tolist() == _hf(ref, ids, mask, **kw).tolist()


def test_single_prompt_and_default_special_tokens(load_pair):
    """eos / pad default to the model config's, as transformers takes them from its generation config."""
    ref, ours = load_pair("gpt2")
    ids, _ = prompts("gpt2", padded=False, b=1)
    for kw in (dict(), dict(num_beams=2)):
        want = ref.generate(ids, max_new_tokens=NEW, do_sample=False, **kw)
        assert generate(ours, ids, max_new_tokens=NEW, **kw).tolist() == want.tolist()
