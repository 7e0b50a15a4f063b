"""How the tour calls fusedlm.training: one Trainer per stage with the tour's settings (seeded,
cosine schedule with warmup, a progress bar), and teacher-forced answer checks that need no
generation."""
from __future__ import annotations

import torch

from ..models.logprobs import IGNORE_INDEX
from .context import Context
from .data import right_pad


def fit(ctx: Context, model, loss_fn, data, *, steps: int, lr: float, salt: int, batch_size: int | None = None,
        collate=None, eval_data=None, **config):
    """Trains `model` with fusedlm.training.Trainer for `steps` optimizer steps; returns the
    Trainer, whose .history has one record per step (loss, lr, tokens_per_s, the stage's metrics)."""
    from ..training import Trainer

    trainer = Trainer(model, loss_fn, data, collate=collate, eval_data=eval_data, max_steps=steps, lr=lr,
                      batch_size=batch_size or ctx.sizes.batch, schedule="cosine", warmup_steps=max(1, steps // 20),
                      seed=ctx.seed * 1000 + salt, **config)
    trainer.fit()
    model.eval()
    return trainer


def mean_loss(history: list[dict], first: bool, n: int = 10) -> float:
    """Mean training loss over the first (or last) n steps."""
    part = history[:n] if first else history[-n:]
    return sum(r["loss"] for r in part) / len(part)


def _forced(prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """prompt + answer rows, right-padded: ids, mask (B, N) and labels on the answer only."""
    ids, mask = right_pad([p + a for p, a in zip(prompts, answers)], pad_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
    return ids, mask, labels


@torch.no_grad()
def exact_match(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, **model_kwargs) -> torch.Tensor:
    """(B,) bool: the decoder's argmax, fed the prompt and the true answer so far, gives every
    answer token (what greedy decoding produces, up to the answer's end). model_kwargs: e.g. task_ids."""
    model.eval()
    ids, mask, labels = _forced(prompts, answers, pad_id)
    pred, target = model(ids, attention_mask=mask, **model_kwargs).logits[:, :-1].argmax(-1), labels[:, 1:]  # (B, N-1)
    return ((pred == target) | (target == IGNORE_INDEX)).all(1)


@torch.no_grad()
def sequence_logprob(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, **model_kwargs) -> torch.Tensor:
    """(B,) float32: log p(answer | prompt), summed over the answer's tokens."""
    from ..training.lm import sequence_logprobs

    model.eval()
    ids, mask, labels = _forced(prompts, answers, pad_id)
    return sequence_logprobs(model, ids, mask, labels, **model_kwargs)[0]
