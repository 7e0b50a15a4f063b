"""Losses and log-probs of labelled tokens: the language-modelling stage (CLM, prefix-LM, MLM, span
corruption, denoising, SFT) and sequence log-probs (DPO's, a teacher-forced answer's).

    loss, metrics = lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    logps, counts = sequence_logprobs(model, ids, mask, labels)     # (B,) each

Both run the model for its hidden states only and put the positions that have a label through
the vocabulary projection and the loss in one fused op, :func:`fusedlm.ops.linear_cross_entropy`:
the logits of all labelled tokens never exist at once (one chunk of them does), SFT's prompt
tokens and padding cost no projection, and the loss's gradient is computed while its chunk is in
cache. Labels of ``IGNORE_INDEX`` (-100) take no loss (``fusedlm.models.logprobs``). Models
without a ``vocab_head`` (a classifier) are not language models here.
"""
from __future__ import annotations

import torch

from .. import ops
from ..models.logprobs import IGNORE_INDEX
from . import distributed


def labelled_rows(model, inputs: dict, labels: torch.Tensor) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """((input (M, d'), weight (V, d'), bias), targets (M,), keep) at the M labelled positions: the
    vocabulary projection's operands (the model's ``vocab_head``) of those positions only. keep is
    (B, N - 1) for a decoder (position i predicts label i + 1), (B, N) for an encoder or an
    encoder-decoder's decoder, True where the label is not IGNORE_INDEX. inputs: the model's
    keyword arguments."""
    inner = distributed.unwrap(model)
    arch = inner.config.arch
    shift = arch == "decoder"
    targets = labels[:, 1:] if shift else labels
    keep = targets != IGNORE_INDEX
    if arch == "encoder-decoder" and inputs.get("decoder_input_ids") is None and inputs.get("decoder_inputs_embeds") is None:
        inputs = dict(inputs, decoder_input_ids=inner.shift_right(labels))  # teacher forcing, as forward(labels=...) does
    h = model(**inputs, return_logits=False).last_hidden_state  # (B, N, d)
    rows = (h[:, :-1] if shift else h)[keep]  # (M, d): only the labelled positions
    return inner.vocab_head(rows), targets[keep], keep


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over labels != IGNORE_INDEX (a decoder's shifted: position i predicts label
    i + 1), the accuracy of the argmax on those tokens and their count ("labelled_tokens": a batch
    with none has no loss to report, and the Trainer does not count it as 0). batch: the model's
    keyword arguments plus "labels" (B, N)."""
    if "labels" not in batch:
        raise ValueError("lm_loss needs batch['labels'] (-100 where no loss is taken)")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if (distributed.unwrap(model).config.arch != "encoder-decoder" and isinstance(ids, torch.Tensor)
            and tuple(labels.shape) != tuple(ids.shape[:2])):
        raise ValueError(f"labels must have the shape of input_ids {list(ids.shape[:2])}, got {list(labels.shape)}")
    (x, weight, bias), targets, _ = labelled_rows(model, inputs, labels)
    if targets.numel() == 0:  # nothing to learn here: a zero that keeps DDP's reducer in step, and a count
        zero = x.sum() * 0.0 + weight.sum() * 0.0 + (0.0 if bias is None else bias.sum() * 0.0)
        return zero, {"accuracy": 0.0, "labelled_tokens": 0}  # the Trainer does not average in
    loss, argmax = ops.linear_cross_entropy(x, weight, targets, bias=bias, return_argmax=True)
    accuracy = (argmax == targets).float().mean().item()
    return loss, {"accuracy": accuracy, "labelled_tokens": targets.numel()}


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each row (a decoder: label i + 1 given the
    tokens up to i) and their counts, (B,) each, float32. model_kwargs: more of the model's
    keyword arguments (``task_ids``, ...)."""
    (x, weight, bias), targets, keep = labelled_rows(
        model, dict(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs), labels)
    token_lp = -ops.linear_cross_entropy(x, weight, targets, bias=bias, reduction="none")  # (M,)
    rows = keep.nonzero()[:, 0]
    seq = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_lp)
    return seq, keep.sum(1)
