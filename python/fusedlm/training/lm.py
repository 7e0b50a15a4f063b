"""Losses and log-probs of labelled tokens: the language-modelling stage (CLM, prefix-LM, MLM, span
corruption, denoising, SFT) and sequence log-probs (DPO's, a teacher-forced answer's).

    loss, metrics = lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    logps, counts = sequence_logprobs(model, ids, mask, labels)     # (B,) each

Both read the logits at the positions that have a label (:func:`labelled_logits`); for a
DecoderLM only those positions are projected onto the vocabulary (its forward returns hidden
states, ``model.head`` projects the labelled rows), so SFT's prompt tokens and padding cost no
vocabulary projection. Labels of ``IGNORE_INDEX`` (-100) take no loss (``fusedlm.models.logprobs``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.logprobs import IGNORE_INDEX
from . import distributed


def labelled_logits(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (M, V), targets (M,), keep) at the M labelled positions: keep (B, N - 1) for a
    decoder (position i predicts label i + 1), (B, N) for an encoder or an encoder-decoder's
    decoder, True where the label is not IGNORE_INDEX. inputs: the model's keyword arguments."""
    inner = distributed.unwrap(model)
    shift = inner.config.arch == "decoder"
    targets = labels[:, 1:] if shift else labels
    keep = targets != IGNORE_INDEX
    if shift and hasattr(inner, "head"):
        h = model(**inputs, return_logits=False).last_hidden_state  # (B, N, d)
        logits = inner.head(h[:, :-1][keep])  # (M, V): only the labelled positions
    else:  # the model's own logits (a seq2seq takes its decoder inputs from the labels)
        logits = model(**inputs, labels=labels).logits
        logits = (logits[:, :-1] if shift else logits)[keep]
    return logits, targets[keep], keep


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
    logits, targets, _ = labelled_logits(model, inputs, labels)
    if targets.numel() == 0:  # nothing to learn here: a zero that keeps DDP's reducer in step, and a count
        return logits.sum() * 0.0, {"accuracy": 0.0, "labelled_tokens": 0}  # the Trainer does not average in
    loss = F.cross_entropy(logits.float(), targets)
    accuracy = (logits.detach().argmax(-1) == targets).float().mean().item()
    return loss, {"accuracy": accuracy, "labelled_tokens": targets.numel()}


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each row (a decoder: label i + 1 given the
    tokens up to i) and their counts, (B,) each, float32. model_kwargs: more of the model's
    keyword arguments (``task_ids``, ...)."""
    logits, targets, keep = labelled_logits(model, dict(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs),
                                            labels)
    token_lp = -F.cross_entropy(logits.float(), targets, reduction="none")  # (M,)
    rows = keep.nonzero()[:, 0]
    seq = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_lp)
    return seq, keep.sum(1)
