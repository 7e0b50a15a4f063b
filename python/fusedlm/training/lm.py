"""The language-modelling stage: cross-entropy on the labelled tokens of a batch (CLM, prefix-LM,
MLM, span corruption, denoising, SFT), with token accuracy as its metric.

    loss, metrics = lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})

For a DecoderLM the logits are computed only at the positions that have a label (its forward
returns hidden states, ``model.head`` projects the labelled rows): SFT's prompt tokens and
padding cost no vocabulary projection. Other models return their own loss and logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed

IGNORE = -100


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over labels != -100 (a decoder's shifted: position i predicts label
    i + 1) and the accuracy of the argmax on those tokens. batch: the model's keyword arguments
    plus "labels" (B, N)."""
    if "labels" not in batch:
        raise ValueError("lm_loss needs batch['labels'] (-100 where no loss is taken)")
    inner = distributed.unwrap(model)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    arch = inner.config.arch
    ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if arch != "encoder-decoder" and isinstance(ids, torch.Tensor) and tuple(labels.shape) != tuple(ids.shape[:2]):
        raise ValueError(f"labels must have the shape of input_ids {list(ids.shape[:2])}, got {list(labels.shape)}")
    if arch == "decoder" and hasattr(inner, "head"):
        h = model(**inputs, return_logits=False).last_hidden_state  # (B, N, d)
        shifted = labels[:, 1:]
        keep = shifted != IGNORE  # (B, N-1)
        if not bool(keep.any()):
            return h.sum() * 0.0, {"accuracy": 0.0}  # nothing to learn here; keeps DDP's reducer in step
        logits = inner.head(h[:, :-1][keep])  # (M, V): only the labelled positions
        target = shifted[keep]
    else:
        out = model(**inputs, labels=labels)
        if arch in ("encoder", "encoder-decoder"):  # no shift: labels line up with the (decoder) positions
            keep = labels != IGNORE
            logits, target = out.logits[keep], labels[keep]
        else:
            keep = labels[:, 1:] != IGNORE
            logits, target = out.logits[:, :-1][keep], labels[:, 1:][keep]
        if target.numel() == 0:
            return out.logits.sum() * 0.0, {"accuracy": 0.0}
    loss = F.cross_entropy(logits.float(), target)
    accuracy = (logits.detach().argmax(-1) == target).float().mean().item()
    return loss, {"accuracy": accuracy}
