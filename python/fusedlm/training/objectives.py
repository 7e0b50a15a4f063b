"""Pretraining objectives as batch transforms: token ids in, model inputs + labels out (-100 where
no loss is taken). Every random choice draws from the ``generator`` passed in (a
``torch.Generator``; None: torch's global one), so a seed gives the same batch.

    clm(ids, pad_token_id=0)                              -> (ids, labels)        GPT
    prefix_lm(ids, prefix_len=8)                          -> (ids, labels, prefix_len)
    mlm(ids, mask_token_id=103, vocab_size=30522)         -> (inputs, labels)     BERT
    span_corruption(ids, vocab_size=32100, eos_token_id=1) -> (inputs, targets)   T5
    text_infilling / sentence_permutation / bart_denoising -> (inputs, labels)    BART

Shapes: B rows, N tokens.
"""
from __future__ import annotations

import math

import torch

from .. import _validate as check
from ..models.inputs import check_ids
from ..models.logprobs import IGNORE_INDEX as IGNORE



# ---------------------------------------------------------------------------------------------
# Decoder objectives
# ---------------------------------------------------------------------------------------------
def clm(input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction: labels = input_ids, with padding (attention_mask == 0, or tokens
    equal to pad_token_id) set to -100. The model shifts (position i predicts label i + 1)."""
    check_ids("input_ids", input_ids)
    labels = input_ids.clone()
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have shape {list(input_ids.shape)}, got {list(attention_mask.shape)}")
        labels[~attention_mask.bool()] = IGNORE
    if pad_token_id is not None:
        labels[input_ids == pad_token_id] = IGNORE
    return input_ids, labels


def prefix_lm(input_ids: torch.Tensor, *, prefix_len: int | torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix-LM (T5's prefix objective, UniLM): the first prefix_len tokens of a row are a
    bidirectional prefix without loss; the loss is on the continuation only. prefix_len: an int,
    a LongTensor [B], or None (drawn uniformly from [1, N-1] per row). Returns (input_ids, labels,
    prefix_len [B]) for ``model(ids, prefix_len=prefix_len, labels=labels)``."""
    check_ids("input_ids", input_ids)
    b, n = input_ids.shape
    if n < 2:
        raise ValueError(f"prefix_lm needs rows of at least 2 tokens, got N={n}")
    if prefix_len is None:
        prefix_len = torch.randint(1, n, (b,), generator=generator)
    prefix_len = torch.as_tensor(prefix_len, dtype=torch.long).expand(b).clone()
    if int(prefix_len.min()) < 1 or int(prefix_len.max()) > n - 1:
        raise ValueError(f"prefix_len must be in [1, N-1] = [1, {n - 1}], got values in "
                         f"[{int(prefix_len.min())}, {int(prefix_len.max())}]")
    labels = input_ids.masked_fill(torch.arange(n)[None, :] < prefix_len[:, None], IGNORE)
    return input_ids, labels, prefix_len.to(input_ids.device)


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------
def mlm(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, special_tokens_mask: torch.Tensor | None = None,
        probability: float = 0.15, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked LM, as transformers' DataCollatorForLanguageModeling: each token that is not
    special is selected with `probability`; labels keep the selected tokens (-100 elsewhere); of
    the selected, 80% become mask_token_id, 10% a uniform random id in [0, vocab_size), 10% stay.

    special_tokens_mask (B, N) bool: tokens never selected ([CLS], [SEP], padding: pass them
    here). The random draws are made in the collator's order, so the same generator state gives
    the collator's exact output."""
    check_ids("input_ids", input_ids)
    check.probability("probability", probability)
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must be in [0, vocab_size={vocab_size}), got {mask_token_id}")
    labels, inputs = input_ids.clone(), input_ids.clone()
    select_p = torch.full(labels.shape, probability)
    if special_tokens_mask is not None:
        if tuple(special_tokens_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"special_tokens_mask must have shape {list(input_ids.shape)}, got {list(special_tokens_mask.shape)}")
        select_p.masked_fill_(special_tokens_mask.bool().cpu(), 0.0)
    selected = torch.bernoulli(select_p, generator=generator).bool().to(input_ids.device)
    labels[~selected] = IGNORE
    to_mask = torch.bernoulli(torch.full(labels.shape, 0.8), generator=generator).bool().to(input_ids.device) & selected
    inputs[to_mask] = mask_token_id
    # half of the remaining 20%: a random token
    to_random = torch.bernoulli(torch.full(labels.shape, 0.5), generator=generator).bool().to(input_ids.device)
    to_random &= selected & ~to_mask
    random_ids = torch.randint(vocab_size, labels.shape, dtype=torch.long, generator=generator).to(input_ids.device)
    inputs[to_random] = random_ids[to_random].to(inputs.dtype)
    return inputs, labels


# ---------------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------------
def _random_segmentation(n_items: int, n_segments: int, generator) -> torch.Tensor:
    """Lengths (n_segments,) >= 1 summing to n_items, uniformly over such compositions (t5's
    _random_segmentation: n_segments - 1 cut points among the n_items - 1 gaps)."""
    first_in_segment = torch.zeros(n_items, dtype=torch.bool)
    cuts = torch.randperm(n_items - 1, generator=generator)[: n_segments - 1] + 1
    first_in_segment[cuts] = True
    segment_id = first_in_segment.long().cumsum(0)  # (n_items,) in [0, n_segments)
    return torch.bincount(segment_id, minlength=n_segments)


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of `length` tokens, as t5's random_spans_noise_mask counts them."""
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(round(n_noise / mean_span_length), 1)
    return n_noise, n_spans


def random_spans_noise_mask(length: int, *, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """(length,) bool, True = noise: spans alternating non-noise, noise, non-noise, ... (the row
    starts with kept tokens), span lengths a random composition of each total (t5.data.preprocessors)."""
    n_noise, n_spans = span_counts(length, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(n_noise, n_spans, generator)
    keep_lengths = _random_segmentation(length - n_noise, n_spans, generator)
    interleaved = torch.stack([keep_lengths, noise_lengths], dim=1).reshape(-1)  # keep, noise, keep, noise, ...
    span_id = torch.repeat_interleave(torch.arange(2 * n_spans), interleaved)  # (length,)
    return span_id % 2 == 1


def _sentinel_fill(ids: torch.Tensor, drop: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids (N,) with each run of dropped tokens replaced by one sentinel; the k-th run (0-based)
    gets vocab_size - 1 - k, i.e. <extra_id_k> as t5's vocabulary lays the sentinels out."""
    starts = drop & ~torch.cat([drop.new_zeros(1), drop[:-1]])  # first token of each dropped run
    sentinel = vocab_size - starts.long().cumsum(0)  # vocab_size - (k + 1) within the k-th run
    out = torch.where(starts, sentinel.to(ids.dtype), ids)
    return out[~drop | starts]


def span_corruption(input_ids: torch.Tensor, *, vocab_size: int, eos_token_id: int, noise_density: float = 0.15,
                    mean_span_length: float = 3.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's span corruption over rows of N real tokens (packed text, no padding): a noise mask of
    round(N · noise_density) tokens in spans of mean length mean_span_length (per row);
    inputs = kept tokens with one sentinel per dropped span + EOS, targets = each sentinel followed
    by its dropped span + EOS. Sentinels descend from the top of the vocabulary:
    <extra_id_0> = vocab_size - 1, <extra_id_1> = vocab_size - 2, ... (vocab_size: the
    tokenizer's, sentinels included). Every row has the same counts, so the outputs are dense:
    inputs (B, N - noise + spans + 1), targets (B, noise + spans + 1)."""
    check_ids("input_ids", input_ids)
    check.probability("noise_density", noise_density, low_open=True, high_open=True)
    check.number("mean_span_length", mean_span_length, low=1)
    b, n = input_ids.shape
    if n < 2:
        raise ValueError(f"span_corruption needs rows of at least 2 tokens, got N={n}")
    if not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id must be in [0, vocab_size={vocab_size}), got {eos_token_id}")
    _, n_spans = span_counts(n, noise_density, mean_span_length)
    if n_spans >= vocab_size:
        raise ValueError(f"{n_spans} sentinels do not fit a vocabulary of {vocab_size}")
    eos = input_ids.new_full((1,), eos_token_id)
    inputs, targets = [], []
    for row in input_ids:
        noise = random_spans_noise_mask(n, noise_density=noise_density, mean_span_length=mean_span_length,
                                        generator=generator).to(row.device)
        inputs.append(torch.cat([_sentinel_fill(row, noise, vocab_size), eos]))
        targets.append(torch.cat([_sentinel_fill(row, ~noise, vocab_size), eos]))
    return torch.stack(inputs), torch.stack(targets)


# ---------------------------------------------------------------------------------------------
# BART (fairseq's DenoisingDataset)
# ---------------------------------------------------------------------------------------------
def _poisson_span_lengths(n_to_mask: int, lam: float, generator) -> torch.Tensor:
    """Span lengths drawn from Poisson(lam) until they cover n_to_mask tokens, the last one cut
    to the budget (fairseq); zero lengths are kept (each is an inserted mask)."""
    lengths = torch.zeros(0, dtype=torch.long)
    while int(lengths.sum()) < n_to_mask:
        draw = torch.poisson(torch.full((n_to_mask,), float(lam)), generator=generator).long()
        lengths = torch.cat([lengths, draw])
    cum = lengths.cumsum(0)
    last = int(torch.nonzero(cum >= n_to_mask)[0])
    lengths = lengths[: last + 1].clone()
    lengths[last] = n_to_mask - (int(cum[last - 1]) if last > 0 else 0)
    return lengths


def _infill_row(row: torch.Tensor, mask_token_id: int, mask_ratio: float, lam: float, generator) -> torch.Tensor:
    """One row of real tokens (BOS ... EOS; the first and last are never masked) -> its noised form."""
    n = row.shape[0]
    inner = n - 2
    n_to_mask = math.ceil(inner * mask_ratio)
    if inner <= 0 or n_to_mask == 0:
        return row.clone()
    lengths = _poisson_span_lengths(n_to_mask, lam, generator)
    n_inserts = int((lengths == 0).sum())
    lengths = lengths[lengths > 0]
    keep = torch.ones(n, dtype=torch.bool)
    out = row.clone()
    if lengths.numel():
        starts = torch.randperm(inner, generator=generator)[: lengths.numel()] + 1  # positions in [1, n-2]
        lengths = lengths[: starts.numel()]
        out[starts] = mask_token_id  # each span becomes the one mask token at its start...
        for start, length in zip(starts.tolist(), lengths.tolist()):
            keep[start + 1 : min(start + length, n - 1)] = False  # ... and its other tokens go (never the EOS)
    out = out[keep]
    if n_inserts:
        out = _insert_masks(out, n_inserts, mask_token_id, generator)
    return out


def _insert_masks(row: torch.Tensor, n_inserts: int, mask_token_id: int, generator) -> torch.Tensor:
    """row with n_inserts mask tokens inserted at random places strictly between its first and last token."""
    total = row.shape[0] + n_inserts
    where = torch.randperm(total - 2, generator=generator)[:n_inserts] + 1
    is_mask = torch.zeros(total, dtype=torch.bool)
    is_mask[where] = True
    out = row.new_full((total,), mask_token_id)
    out[~is_mask] = row
    return out


def _split_rows(input_ids: torch.Tensor, pad_token_id: int) -> list[torch.Tensor]:
    """The real tokens of each right-padded row."""
    lengths = (input_ids != pad_token_id).long().sum(1).tolist()
    return [row[:length] for row, length in zip(input_ids, lengths)]


def _pad_rows(rows: list[torch.Tensor], pad_token_id: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_token_id)


def text_infilling(input_ids: torch.Tensor, *, mask_token_id: int, pad_token_id: int, mask_ratio: float = 0.3,
                   poisson_lambda: float = 3.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BART's text infilling on right-padded rows "BOS ... EOS": ceil(mask_ratio · inner tokens)
    tokens are covered by spans of Poisson(poisson_lambda) lengths at random starts; each span
    becomes ONE mask token, a 0-length span inserts a mask. Returns (inputs right-padded with
    pad_token_id, labels = the original rows with padding -100) for a Seq2SeqLM."""
    check_ids("input_ids", input_ids)
    check.probability("mask_ratio", mask_ratio)
    check.number("poisson_lambda", poisson_lambda, low=0, low_open=True)
    rows = [_infill_row(r, mask_token_id, mask_ratio, poisson_lambda, generator) for r in _split_rows(input_ids, pad_token_id)]
    return _pad_rows(rows, pad_token_id), input_ids.masked_fill(input_ids == pad_token_id, IGNORE)


def _permute_row(row: torch.Tensor, full_stop_id: int, generator) -> torch.Tensor:
    """Sentences of "BOS s1 . s2 . ... EOS" (a sentence ends after each full stop; the last one at EOS) shuffled."""
    body = row[1:-1]
    ends = (torch.nonzero(body == full_stop_id).flatten() + 1).tolist()
    if not ends or ends[-1] != body.shape[0]:
        ends.append(body.shape[0])
    starts = [0] + ends[:-1]
    order = torch.randperm(len(ends), generator=generator).tolist()
    return torch.cat([row[:1]] + [body[starts[i] : ends[i]] for i in order] + [row[-1:]])


def sentence_permutation(input_ids: torch.Tensor, *, full_stop_id: int, pad_token_id: int,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BART's sentence permutation: the sentences of each right-padded row "BOS ... EOS" (split
    after each full_stop_id) in a random order. Returns (inputs, labels = the original rows)."""
    check_ids("input_ids", input_ids)
    rows = [_permute_row(r, full_stop_id, generator) if r.shape[0] > 2 else r for r in _split_rows(input_ids, pad_token_id)]
    return _pad_rows(rows, pad_token_id), input_ids.masked_fill(input_ids == pad_token_id, IGNORE)


def bart_denoising(input_ids: torch.Tensor, *, mask_token_id: int, pad_token_id: int, full_stop_id: int | None = None,
                   mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BART's pretraining noise (the paper's best: sentence permutation, when full_stop_id is
    given, then text infilling), as fairseq's DenoisingDataset orders them."""
    inputs, labels = input_ids, input_ids.masked_fill(input_ids == pad_token_id, IGNORE)
    if full_stop_id is not None:
        inputs, _ = sentence_permutation(inputs, full_stop_id=full_stop_id, pad_token_id=pad_token_id, generator=generator)
    inputs, _ = text_infilling(inputs, mask_token_id=mask_token_id, pad_token_id=pad_token_id, mask_ratio=mask_ratio,
                               poisson_lambda=poisson_lambda, generator=generator)
    return inputs, labels
