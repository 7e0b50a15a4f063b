"""Pretraining objectives: masking statistics, a hand-checked span-corruption example, seeds, the
collator parity of MLM, and bad input."""
import types

import pytest
import torch

from fusedlm.training import objectives as obj


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- CLM / prefix-LM
def test_clm_labels_are_inputs_with_padding_ignored():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = ids != 0
    inputs, labels = obj.clm(ids, attention_mask=mask)
    assert inputs is ids
    assert labels.tolist() == [[5, 6, 7, -100], [8, 9, -100, -100]]
    assert obj.clm(ids, pad_token_id=0)[1].tolist() == labels.tolist()


def test_prefix_lm_takes_the_loss_on_the_continuation_only():
    ids = torch.arange(12).view(2, 6)
    _, labels, prefix = obj.prefix_lm(ids, prefix_len=torch.tensor([2, 4]))
    assert labels.tolist() == [[-100, -100, 2, 3, 4, 5], [-100, -100, -100, -100, 10, 11]]
    assert prefix.tolist() == [2, 4]
    _, labels, prefix = obj.prefix_lm(torch.zeros(500, 10, dtype=torch.long), generator=_gen())
    assert int(prefix.min()) == 1 and int(prefix.max()) == 9
    assert ((labels == -100).sum(1) == prefix).all()


# --------------------------------------------------------------------------------------------- MLM
def test_mlm_statistics_15_percent_then_80_10_10():
    vocab, mask_id = 1000, 3
    ids = torch.randint(10, vocab, (400, 256), generator=_gen(1))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    inputs, labels = obj.mlm(ids, mask_token_id=mask_id, vocab_size=vocab, special_tokens_mask=special, generator=_gen(2))
    selected = labels != -100
    assert not selected[special].any()
    assert (labels[selected] == ids[selected]).all()
    assert (inputs[~selected] == ids[~selected]).all()
    rate = selected.float().sum() / (~special).sum()
    assert abs(rate - 0.15) < 0.005  # ~100k tokens: the std of the rate is ~0.001
    n = selected.sum()
    masked = (inputs == mask_id) & selected
    unchanged = (inputs == ids) & selected
    randomised = selected & ~masked & ~unchanged
    assert abs(masked.sum() / n - 0.8) < 0.01
    # a random token equals the original 1/1000 of the time: it counts as unchanged then
    assert abs(unchanged.sum() / n - 0.1) < 0.01 and abs(randomised.sum() / n - 0.1) < 0.01


def test_mlm_equals_transformers_collator_on_the_same_generator():
    from transformers.data.data_collator import DataCollatorForLanguageModeling

    vocab, mask_id = 50, 4
    # the collator's method, called on a stand-in holding only what it reads (no tokenizer files)
    tokenizer = type("Tok", (), {"mask_token": "[MASK]", "__len__": lambda self: vocab,
                                 "convert_tokens_to_ids": lambda self, t: mask_id})()
    collator = types.SimpleNamespace(mlm_probability=0.15, whole_word_mask=False, mask_replace_prob=0.8,
                                     random_replace_prob=0.1, generator=_gen(7), tokenizer=tokenizer)
    ids = torch.randint(5, vocab, (8, 33), generator=_gen(3))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    ref_inputs, ref_labels = DataCollatorForLanguageModeling.torch_mask_tokens(collator, ids.clone(), special)
    inputs, labels = obj.mlm(ids, mask_token_id=mask_id, vocab_size=vocab, special_tokens_mask=special, generator=_gen(7))
    assert torch.equal(inputs, ref_inputs) and torch.equal(labels, ref_labels)


def test_mlm_is_reproducible_for_a_seed():
    ids = torch.randint(0, 100, (4, 64), generator=_gen())
    a = obj.mlm(ids, mask_token_id=1, vocab_size=100, generator=_gen(5))
    b = obj.mlm(ids, mask_token_id=1, vocab_size=100, generator=_gen(5))
    c = obj.mlm(ids, mask_token_id=1, vocab_size=100, generator=_gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


# --------------------------------------------------------------------------------------------- T5 span corruption
def test_span_corruption_hand_checked_example():
    # N=10, density 0.15: round(1.5) = 2 noise tokens in max(round(2/3), 1) = 1 span, after 8 kept
    # tokens (spans alternate starting from non-noise): no choice is random here.
    ids = torch.arange(10, 20)[None]
    inputs, targets = obj.span_corruption(ids, vocab_size=100, eos_token_id=1, generator=_gen())
    assert inputs.tolist() == [[10, 11, 12, 13, 14, 15, 16, 17, 99, 1]]
    assert targets.tolist() == [[99, 18, 19, 1]]


def test_span_corruption_sentinels_on_a_given_mask():
    ids = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    noise = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    # runs of noise: (11, 12) -> <extra_id_0> = 99, (15) -> 98, (18, 19) -> 97
    assert obj._sentinel_fill(ids, noise, 100).tolist() == [10, 99, 13, 14, 98, 16, 17, 97]
    assert obj._sentinel_fill(ids, ~noise, 100).tolist() == [99, 11, 12, 98, 15, 97, 18, 19]


def test_span_corruption_statistics_and_seed():
    n, rows = 512, 64
    ids = torch.randint(2, 30000, (rows, n), generator=_gen())
    inputs, targets = obj.span_corruption(ids, vocab_size=32100, eos_token_id=1, generator=_gen(1))
    n_noise, n_spans = obj.span_counts(n, 0.15, 3.0)
    assert (n_noise, n_spans) == (77, 26)
    assert inputs.shape == (rows, n - n_noise + n_spans + 1) and targets.shape == (rows, n_noise + n_spans + 1)
    sentinels = list(range(32099, 32099 - n_spans, -1))
    for row, inp, tgt in zip(ids, inputs, targets):
        assert [t for t in inp.tolist() if t >= 32099 - n_spans] == sentinels
        assert [t for t in tgt.tolist() if t >= 32099 - n_spans] == sentinels
        assert inp[-1] == 1 and tgt[-1] == 1
        # undo the corruption: splice the targets' spans back into the inputs' sentinels
        spans, current = {}, None
        for t in tgt[:-1].tolist():
            if t >= 32099 - n_spans:
                current = t
                spans[t] = []
            else:
                spans[current].append(t)
        rebuilt = [x for t in inp[:-1].tolist() for x in (spans[t] if t in spans else [t])]
        assert rebuilt == row.tolist()
        assert inp[0] == row[0]  # the first span is kept (spans alternate from non-noise)
    masks = torch.stack([obj.random_spans_noise_mask(n, generator=_gen(s)) for s in range(50)])
    assert masks.float().mean().item() == pytest.approx(n_noise / n)
    starts = (masks[:, 1:] & ~masks[:, :-1]).sum()
    assert masks.sum() / starts == pytest.approx(3.0, abs=0.1)  # mean span length
    again = obj.span_corruption(ids, vocab_size=32100, eos_token_id=1, generator=_gen(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)


# --------------------------------------------------------------------------------------------- BART
def test_text_infilling_masks_30_percent_in_poisson_spans():
    n, rows, mask_id, pad = 202, 200, 3, 1
    ids = torch.arange(10, 10 + n).repeat(rows, 1)
    ids[:, 0], ids[:, -1] = 0, 2  # BOS, EOS
    inputs, labels = obj.text_infilling(ids, mask_token_id=mask_id, pad_token_id=pad, generator=_gen(4))
    assert torch.equal(labels, ids)
    removed, n_masks, span_lengths = 0, 0, []
    for row in inputs:
        row = row[row != pad].tolist()
        assert row[0] == 0 and row[-1] == 2
        kept = [t for t in row if t >= 10]
        assert kept == sorted(kept)  # the surviving tokens keep their order
        removed += (n - 2) - len(kept)
        n_masks += row.count(mask_id)
        gaps = [b - a - 1 for a, b in zip([9] + kept, kept + [10 + n - 1]) if b - a > 1]
        span_lengths += gaps
    frac = removed / (rows * (n - 2))
    # 30% of the tokens are covered by spans; overlapping spans cover some twice, so a bit fewer go
    assert 0.24 < frac <= 0.3
    mean_span = sum(span_lengths) / len(span_lengths)
    assert 2.8 < mean_span < 4.5  # Poisson(3) lengths, conditioned >= 1 (zero-length spans are inserts)
    assert n_masks > 0.9 * len(span_lengths)


def test_text_infilling_zero_length_spans_insert_a_mask():
    # an inserted mask (a 0-length span) goes strictly between BOS and EOS and removes nothing
    row = torch.tensor([0, 10, 11, 12, 2])
    out = obj._insert_masks(row, 2, 3, _gen()).tolist()
    assert len(out) == 7 and out[0] == 0 and out[-1] == 2 and out.count(3) == 2
    assert [t for t in out if t != 3] == row.tolist()
    # small lambda: many spans have length 0, so there are more masks than removed runs
    ids = torch.tensor([[0] + list(range(10, 110)) + [2]] * 20)
    inputs, _ = obj.text_infilling(ids, mask_token_id=3, pad_token_id=1, poisson_lambda=0.5, generator=_gen())
    for row in inputs.tolist():
        kept = [t for t in row if t >= 10]
        runs = sum(1 for a, b in zip([9] + kept, kept + [110]) if b - a > 1)
        assert row.count(3) > runs


def test_sentence_permutation_shuffles_whole_sentences():
    bos, eos, stop, pad = 0, 2, 4, 1
    ids = torch.tensor([[bos, 10, 11, stop, 20, stop, 30, 31, 32, stop, eos, pad]])
    seen = set()
    for seed in range(20):
        inputs, labels = obj.sentence_permutation(ids, full_stop_id=stop, pad_token_id=pad, generator=_gen(seed))
        row = inputs[0].tolist()
        assert row[0] == bos and row[-1] == eos and sorted(row) == sorted(ids[0, :-1].tolist())  # padding dropped
        sentences = tuple(tuple(s) for s in _sentences(row[1:-1], stop))
        assert sorted(sentences) == sorted([(10, 11, stop), (20, stop), (30, 31, 32, stop)])
        seen.add(sentences)
    assert len(seen) == 6  # all 3! orders show up
    assert labels[0, -1] == -100


def _sentences(tokens, stop):
    out, cur = [], []
    for t in tokens:
        cur.append(t)
        if t == stop:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_bart_denoising_is_reproducible():
    ids = torch.tensor([[0, 10, 11, 4, 12, 13, 14, 4, 15, 16, 2]] * 3)
    a = obj.bart_denoising(ids, mask_token_id=3, pad_token_id=1, full_stop_id=4, generator=_gen(9))
    b = obj.bart_denoising(ids, mask_token_id=3, pad_token_id=1, full_stop_id=4, generator=_gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], ids)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, match", [
    (lambda: obj.clm([[1, 2]]), "input_ids must be a torch.Tensor"),
    (lambda: obj.clm(torch.ones(3, dtype=torch.long)), r"shape \[B, N\]"),
    (lambda: obj.clm(torch.ones(2, 3)), "integer"),
    (lambda: obj.clm(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), "attention_mask"),
    (lambda: obj.prefix_lm(torch.ones(2, 3, dtype=torch.long), prefix_len=3), r"prefix_len must be in \[1, N-1\]"),
    (lambda: obj.mlm(torch.ones(2, 3, dtype=torch.long), mask_token_id=5, vocab_size=5), "mask_token_id"),
    (lambda: obj.mlm(torch.ones(2, 3, dtype=torch.long), mask_token_id=1, vocab_size=5, probability=1.5), "probability"),
    (lambda: obj.span_corruption(torch.ones(2, 3, dtype=torch.long), vocab_size=10, eos_token_id=1, noise_density=0.0), "noise_density"),
    (lambda: obj.span_corruption(torch.ones(2, 1, dtype=torch.long), vocab_size=10, eos_token_id=1), "at least 2"),
    (lambda: obj.span_corruption(torch.ones(2, 3, dtype=torch.long), vocab_size=10, eos_token_id=1, mean_span_length=0.5), "mean_span_length"),
    (lambda: obj.text_infilling(torch.ones(2, 3, dtype=torch.long), mask_token_id=3, pad_token_id=0, poisson_lambda=0), "poisson_lambda"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
