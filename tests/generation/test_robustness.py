"""generate() under bad input: every argument range-checked with its name before any work (no
allocator error from a huge KV cache, no IndexError from inside a processor), transformers-only
arguments supported or refused by name."""
import pytest
import torch
from tiny_models import fused

from fusedlm import peft
from fusedlm.generation import GenerateOutput, generate

V = 128  # llama-tiny's vocabulary; max_seq_len 64


@pytest.fixture(scope="module")
def model():
    return fused("llama-tiny")


def _ids(b=2, n=5):
    return torch.randint(3, V, (b, n), generator=torch.Generator().manual_seed(0))


BAD = [  # (keyword arguments, error, message naming the argument)
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens=-3), ValueError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=2**40), ValueError, r"max_new_tokens=1099511627776 after the prompt's 5 tokens makes .* more than the "
                                             r"model's max_seq_len=64: lower max_new_tokens \(or max_length\) to at most 59"),
    (dict(max_new_tokens=60), ValueError, "more than the model's max_seq_len=64"),
    (dict(min_new_tokens=-1), ValueError, "min_new_tokens must be >= 0"),
    (dict(max_length=5), ValueError, "max_length=5 leaves no room for a new token after the prompt's 5 tokens"),
    (dict(max_length=0), ValueError, "max_length must be >= 1"),
    (dict(max_length=100), ValueError, "max_new_tokens=95 after the prompt's 5 tokens makes 100 positions"),
    (dict(do_sample=True, temperature=-1.0), ValueError, "temperature must be finite and >= 0"),
    (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature must be finite and >= 0"),
    (dict(do_sample=True, temperature=float("inf")), ValueError, "temperature must be finite and >= 0"),
    (dict(do_sample=True, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_k=-1), ValueError, "top_k must be an integer >= 0"),
    (dict(do_sample=True, top_k=2.5), TypeError, "top_k must be an int"),
    (dict(do_sample=True, temperature=torch.tensor([1.0])), ValueError, r"temperature must be a scalar or a tensor of shape \[2\]"),
    (dict(do_sample="yes"), TypeError, "do_sample must be a bool"),
    (dict(num_beams=0), ValueError, "num_beams must be >= 1"),
    (dict(num_beams=3, length_penalty=float("nan")), ValueError, "length_penalty must be a finite number, got nan"),
    (dict(num_beams=3, length_penalty=float("inf")), ValueError, "length_penalty must be a finite number, got inf"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, r"num_return_sequences \(3\) must be <= num_beams \(2\)"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences must be >= 1"),
    (dict(num_return_sequences=2), ValueError, "num_return_sequences=2 needs do_sample=True"),
    (dict(num_beams=2, do_sample=True), ValueError, "beam sampling"),
    (dict(num_beams=2, early_stopping="sometimes"), ValueError, "early_stopping must be one of"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0"),
    (dict(repetition_penalty=float("nan")), ValueError, "repetition_penalty must be a finite number"),
    (dict(no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size must be >= 0"),
    (dict(penalty_alpha=-0.1, top_k=4), ValueError, r"penalty_alpha must be in \[0, 1\]"),
    (dict(penalty_alpha=float("nan"), top_k=4), ValueError, "penalty_alpha must be a finite number"),
    (dict(penalty_alpha=0.6, top_k=V + 5), ValueError, r"contrastive search .* needs an int top_k of candidates in \[2, 128\]"),
    (dict(penalty_alpha=0.6, top_k=1), ValueError, r"top_k of candidates in \[2, 128\] \(the vocabulary\), got 1"),
    (dict(penalty_alpha=0.6, top_k=torch.tensor([4, 4])), ValueError, "needs an int top_k"),
    (dict(eos_token_id=10**6, min_new_tokens=2), ValueError, r"eos_token_id must be ids of the vocabulary, in \[0, 128\), got 1000000"),
    (dict(eos_token_id=[2, V]), ValueError, "eos_token_id must be ids of the vocabulary"),
    (dict(eos_token_id=-1), ValueError, "eos_token_id must be a token id"),
    (dict(eos_token_id="2"), ValueError, "eos_token_id must be a token id"),
    (dict(pad_token_id=10**6), ValueError, r"pad_token_id must be an id of the vocabulary, in \[0, 128\), got 1000000"),
    (dict(pad_token_id=-1), ValueError, "pad_token_id must be a token id"),
    (dict(generator=3), TypeError, "generator must be a torch.Generator or None"),
    (dict(use_cache="no"), TypeError, "use_cache must be a bool"),
    (dict(output_scores=1), TypeError, "output_scores must be a bool"),
    (dict(typical_p=0.9), TypeError, r"does not support transformers' argument\(s\) \['typical_p'\]"),
    (dict(num_beam_groups=2, diversity_penalty=1.0), TypeError, r"\['diversity_penalty', 'num_beam_groups'\]"),
    (dict(output_attentions=True), TypeError, r"\['output_attentions'\]"),
    (dict(min_length=3), TypeError, r"\['min_length'\]"),
    (dict(bad_words_ids=[[5]]), TypeError, r"\['bad_words_ids'\]"),
    (dict(stopping_criteria=[]), TypeError, r"\['stopping_criteria'\]"),
    (dict(past_key_values=None), TypeError, r"\['past_key_values'\]"),
    (dict(nosuch=1), TypeError, r"unexpected keyword argument\(s\) \['nosuch'\]: neither generate's nor DecoderLM\.forward's"),
    (dict(cache=None), TypeError, r"generate\(\) sets \['cache'\] on every model call itself"),
    (dict(labels=torch.zeros(2, 5, dtype=torch.long)), TypeError, r"sets \['labels'\]"),
    (dict(position_ids=torch.zeros(2, 5, dtype=torch.long)), TypeError, r"sets \['position_ids'\]"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD, ids=[f"{i}-{'-'.join(k)}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_arguments_fail_before_any_work(model, kwargs, error, match, monkeypatch):
    from fusedlm.generation import step

    monkeypatch.setattr(step.ModelStep, "__init__", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(error, match=match):
        generate(model, _ids(), **kwargs)


@pytest.mark.parametrize("ids, error, match", [
    (torch.zeros(2, 5), TypeError, "input_ids must be an int64 tensor"),
    (torch.zeros(5, dtype=torch.long), ValueError, r"input_ids must have shape \[B, N\]"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, r"input_ids must have shape \[B, N\] with B, N >= 1"),
    (torch.full((2, 5), V), ValueError, r"input_ids must be ids of the vocabulary, in \[0, 128\), got values in \[128, 128\]"),
    (torch.full((2, 5), -1), ValueError, "input_ids must be ids of the vocabulary"),
    (torch.zeros(1, 70, dtype=torch.long), ValueError, "the prompt's 70 tokens makes 90 positions"),
], ids=["float", "1d", "empty", "past-vocab", "negative", "too-long"])
def test_bad_prompts(model, ids, error, match):
    with pytest.raises(error, match=match):
        generate(model, ids)


def test_bad_attention_mask(model):
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \[2, 5\], got \[2, 4\]"):
        generate(model, _ids(), attention_mask=torch.ones(2, 4))


def test_learned_positions_are_checked_before_the_first_token():
    gpt2 = fused("gpt2-tiny")  # learned positions: the model itself stops at 64 positions
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(gpt2, _ids(1, 60), max_new_tokens=10)
    assert generate(gpt2, _ids(1, 60), max_new_tokens=4).shape == (1, 64)


def test_virtual_tokens_count_against_max_seq_len():
    pm = peft.apply_prompt_tuning(fused("llama-tiny"), n_virtual_tokens=10)
    with pytest.raises(ValueError, match="the prompt's 5 tokens and 10 virtual tokens makes 69 positions"):
        generate(pm, _ids(), max_new_tokens=54)
    assert generate(pm, _ids(), max_new_tokens=49).shape[1] <= 54


def test_seq2seq_lengths():
    t5 = fused("t5-tiny")
    with pytest.raises(ValueError, match="after the decoder start token makes 65 positions"):
        generate(t5, _ids(), max_new_tokens=64)
    assert generate(t5, _ids(), max_length=4).shape == (2, 4)  # max_length counts the start token, as transformers


# ---- transformers' arguments, supported ----------------------------------------------------------
def test_max_length_is_prompt_plus_new_tokens(model):
    assert torch.equal(generate(model, _ids(), max_length=12), generate(model, _ids(), max_new_tokens=7))


def test_max_new_tokens_wins_over_max_length_with_a_warning(model):
    with pytest.warns(UserWarning, match="max_new_tokens takes precedence"):
        out = generate(model, _ids(), max_new_tokens=3, max_length=30)
    assert out.shape == (2, 8)


@pytest.mark.parametrize("use_cache", [True, False])
def test_use_cache_is_accepted_and_changes_nothing(model, use_cache):
    assert torch.equal(generate(model, _ids(), max_new_tokens=4, use_cache=use_cache), generate(model, _ids(), max_new_tokens=4))


def test_return_dict_in_generate(model):
    out = generate(model, _ids(), max_new_tokens=4, return_dict_in_generate=True)
    assert isinstance(out, GenerateOutput) and out.scores is None
    assert torch.equal(out.sequences, generate(model, _ids(), max_new_tokens=4))
    beams = generate(model, _ids(), max_new_tokens=4, num_beams=2, return_dict_in_generate=True, output_scores=True)
    assert beams.scores is not None and beams.sequence_scores.shape == (2,)


def test_config_ids_outside_the_vocabulary():
    # a config whose eos is outside a shrunk vocabulary: that eos can never be generated, so it stops nothing
    small = fused("qwen2-tiny", vocab_size=64)  # the preset's eos is 127
    assert small.config.eos_token_id == 127
    assert generate(small, _ids() % 64, max_new_tokens=3).shape == (2, 8)


def test_model_kwargs_still_reach_the_model():
    m = fused("llama-tiny")
    peft.apply_lora(m, name="a")
    peft.apply_lora(m, name="b")
    out = generate(m, _ids(), max_new_tokens=2, adapter_ids=torch.tensor([0, 1]))
    assert out.shape == (2, 7)
