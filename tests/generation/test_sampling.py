"""Sampling through ops.sample: the per-step distribution (chi-square against transformers' warpers on
the same logits), seeded reproducibility, per-row parameters, rows independent of the batch."""
import pytest
import torch

from tiny_models import prompts
from fusedlm.generation import generate
from fusedlm.generation.processors import repetition_penalty

lp = pytest.importorskip("transformers.generation.logits_process")
stats = pytest.importorskip("scipy.stats")


def _expected(logits, temperature, top_k, top_p):
    """transformers' Temperature -> TopK -> TopP warpers, then softmax."""
    warpers = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(temperature), lp.TopKLogitsWarper(top_k),
                                      lp.TopPLogitsWarper(top_p)])
    return warpers(None, logits).softmax(-1)


def _chi_square_p(tokens, probs):
    counts = torch.bincount(tokens, minlength=probs.shape[-1]).double()
    kept = probs > 0
    assert kept.sum() >= 3, "a degenerate distribution tests nothing"
    assert counts[~kept].sum() == 0  # never a token outside the kept set
    expected = probs[kept].double() / probs[kept].double().sum() * tokens.numel()
    return stats.chisquare(counts[kept].numpy(), expected.numpy()).pvalue


@torch.no_grad()
def test_each_step_follows_the_filtered_softmax(load_pair):
    _, ours = load_pair("llama")
    ids, _ = prompts("llama", padded=False, b=1)
    t, k, p, rep, rows = 2.5, 12, 0.95, 1.3, 6000  # a high temperature: several tokens kept at each step
    out = generate(ours, ids, max_new_tokens=2, do_sample=True, temperature=t, top_k=k, top_p=p, repetition_penalty=rep,
                   num_return_sequences=rows, eos_token_id=[], generator=torch.Generator().manual_seed(0))
    n = ids.shape[1]
    logits = ours(ids).logits[:, -1].float()
    first = _expected(repetition_penalty(logits, ids, rep), t, k, p)[0]
    assert _chi_square_p(out[:, n], first) > 1e-3
    # step 2, given the most frequent first token
    tok = int(torch.bincount(out[:, n]).argmax())
    ctx = torch.cat([ids, torch.tensor([[tok]])], 1)
    second = _expected(repetition_penalty(ours(ctx).logits[:, -1].float(), ctx, rep), t, k, p)[0]
    assert _chi_square_p(out[out[:, n] == tok, n + 1], second) > 1e-3


def _sample(model, ids, mask, seed, **kw):
    return generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20,
                    generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("name", ["gpt2", "bart"])
def test_seeded_runs_reproduce(load_pair, name):
    _, ours = load_pair(name)
    ids, mask = prompts(name, padded=True)
    a, b, c = _sample(ours, ids, mask, 1), _sample(ours, ids, mask, 1), _sample(ours, ids, mask, 2)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_a_rows_tokens_do_not_depend_on_the_other_rows(load_pair, name):
    _, ours = load_pair(name)
    ids, mask = prompts(name, padded=True)
    other = ids.clone()
    other[1] = (other[1] + 7) % 90 + 3  # another prompt in row 1 (same padding)
    other = other.masked_fill(mask == 0, 0)
    a, b = _sample(ours, ids, mask, 3, eos_token_id=[]), _sample(ours, other, mask, 3, eos_token_id=[])
    assert a[[0, 2]].tolist() == b[[0, 2]].tolist()
    assert a[1].tolist() != b[1].tolist()


@pytest.mark.parametrize("name", ["llama", "bart"])
def test_per_row_parameters(load_pair, name):
    """Row 0 temperature 0 and row 2 top_k 1 are greedy; row 1 samples (top_p .9, T 1.5)."""
    _, ours = load_pair(name)
    ids, mask = prompts(name, padded=True)
    greedy = generate(ours, ids, attention_mask=mask, max_new_tokens=8)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=torch.tensor([0.0, 1.5, 1.0]),
              top_k=torch.tensor([0, 0, 1]), top_p=torch.tensor([1.0, 0.9, 1.0]))
    runs = [generate(ours, ids, generator=torch.Generator().manual_seed(s), **kw) for s in range(4)]
    for run in runs:
        assert run.shape == greedy.shape  # (config eos off the paths here; otherwise lengths could differ)
        assert run[[0, 2]].tolist() == greedy[[0, 2]].tolist()
    assert len({tuple(r[1].tolist()) for r in runs}) > 1


def test_return_sequences_and_scores(load_pair):
    _, ours = load_pair("gpt2")
    ids, mask = prompts("gpt2", padded=True)
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5,
                   num_return_sequences=4, eos_token_id=[], output_scores=True, generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape == (12, ids.shape[1] + 6)
    assert out.sequences[:, : ids.shape[1]].tolist() == ids.repeat_interleave(4, 0).tolist()
    assert len({tuple(r) for r in out.sequences[:4].tolist()}) > 1  # the 4 samples of a prompt differ
    for t, s in enumerate(out.scores):  # the filtered scores each token was drawn from: 5 kept, the token among them
        assert ((s > float("-inf")).sum(-1) == 5).all()
        assert torch.isfinite(s.gather(1, out.sequences[:, ids.shape[1] + t, None])).all()
