"""generate(do_sample=True) on a patched model draws through ops.sample: the warpers are replaced,
the kept set is transformers' own, draws repeat under a seed, and what is not fused is left alone."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tiny_models import V, hf, hf_batch  # noqa: E402
from transformers.generation import (  # noqa: E402
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fusedlm import ops  # noqa: E402
from fusedlm.integrations import apply, undo  # noqa: E402
from fusedlm.integrations.sampling import FusedSampler, fuse_warpers  # noqa: E402


@pytest.fixture
def samples(op_calls):
    """The keyword arguments of every ops.sample call."""
    return op_calls["sample"]


def test_fuse_warpers_replaces_the_tail():
    penalty = RepetitionPenaltyLogitsProcessor(1.2)
    chain = LogitsProcessorList([penalty, TemperatureLogitsWarper(0.7), TopKLogitsWarper(5), TopPLogitsWarper(0.9)])
    fused = fuse_warpers(chain)
    assert fused[0] is penalty and len(fused) == 2 and isinstance(fused[1], FusedSampler)
    assert (fused[1].temperature, fused[1].top_k, fused[1].top_p) == (0.7, 5, 0.9)
    assert isinstance(fuse_warpers(LogitsProcessorList([penalty]))[-1], FusedSampler)  # plain sampling
    assert "MinPLogitsWarper" in fuse_warpers(LogitsProcessorList([TopKLogitsWarper(5), MinPLogitsWarper(0.1)]))
    assert "order" in fuse_warpers(LogitsProcessorList([TopKLogitsWarper(5), TemperatureLogitsWarper(0.7)]))
    assert "min_tokens_to_keep" in fuse_warpers(LogitsProcessorList([TopKLogitsWarper(5, min_tokens_to_keep=2)]))


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)])
def test_kept_set_equals_transformers_warpers(temperature, top_k, top_p):
    """Each draw lands in the set transformers' warpers keep; the fused scores keep only the draw."""
    torch.manual_seed(0)
    logits = torch.randn(64, V)
    logits[:, :4] = logits[:, 4:8]  # ties at the cut-offs
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    kept = torch.isfinite(warpers(None, logits.clone()))
    out = FusedSampler(temperature, top_k, top_p)(None, logits.clone())
    drawn = out.argmax(-1)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(64, dtype=torch.long))
    assert kept.gather(1, drawn[:, None]).all()
    filtered = ops.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isfinite(filtered), kept)


def test_generate_samples_through_ops(samples):
    model = hf("llama")
    ids, mask = hf_batch(seed=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=10, top_p=0.9,
                  pad_token_id=0)
    apply(model)
    torch.manual_seed(1)
    first = model.generate(ids, **kwargs)
    assert len(samples) == 6 and samples[0] == dict(temperature=0.8, top_k=10, top_p=0.9)
    torch.manual_seed(1)
    assert torch.equal(model.generate(ids, **kwargs), first)  # the same seed, the same tokens
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len(samples) == 12  # greedy search does not sample
    assert torch.equal(model.generate(ids, **{**kwargs, "top_k": 1}), greedy)  # top_k=1 is the argmax
    undo(model)
    samples.clear()
    model.generate(ids, **kwargs)
    assert samples == []


def test_each_step_draws_from_the_kept_set():
    """One new token, many seeds: always inside transformers' kept set for the prompt, and not always the same."""
    model = hf("llama")
    ids, mask = hf_batch(seed=6)
    logits = model(ids, attention_mask=mask).logits[:, -1].detach()
    kept = torch.isfinite(LogitsProcessorList([TemperatureLogitsWarper(1.5), TopKLogitsWarper(6)])(None, logits))
    apply(model)
    drawn = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=True, temperature=1.5, top_k=6,
                             top_p=1.0, pad_token_id=0)
        drawn.append(out[:, -1])
    drawn = torch.stack(drawn, 1)  # [B, 20]
    assert kept.gather(1, drawn).all()
    assert all(len(set(row.tolist())) > 1 for row in drawn)


def test_left_to_transformers(samples):
    model = hf("llama")
    ids, mask = hf_batch()
    apply(model)
    with pytest.warns(RuntimeWarning, match="output_scores"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=True, pad_token_id=0,
                       return_dict_in_generate=True, output_scores=True)
    with pytest.warns(RuntimeWarning, match="MinPLogitsWarper"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=True, min_p=0.1, pad_token_id=0)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=True, num_beams=2, pad_token_id=0)
    assert samples == []
