"""One Trainer for every stage: it orders micro-batches, a stage's loss, backward, clipping and
AdamW steps; the stage (a function ``loss_fn(model, batch) -> loss | (loss, metrics)``) says
what is learned. nanoGPT's train.py, as a class.

    trainer = Trainer(model, sft_loss, examples, collate=pad_collate, max_steps=200, lr=1e-4,
                      batch_size=8, grad_accum=2, schedule="cosine", warmup_steps=20, out_dir="run")
    history = trainer.fit()                  # list of per-step records (also run/metrics.jsonl)
    trainer.fit(resume_from="run/checkpoint-100")   # the same losses as an uninterrupted run

Per optimizer step: grad_accum micro-batches of batch_size examples per rank, each loss divided
by grad_accum (the gradient of the mean of the micro-batch means); the gradient norm clipped to
max_grad_norm; AdamW (weight decay on matrices only) over the trainable parameters; the LR
schedule stepped. Under torchrun the model is wrapped for DDP or sharded with FSDP2
(``strategy``) and each rank reads its own slice of every global batch (see data.Loader).

Guards (DESIGN.md rule 8): a NaN / inf loss or gradient never reaches the weights (on_nonfinite
"stop" raises FloatingPointError before the optimizer step, "skip" skips the step and records why);
a step whose batches hold no labelled token (a stage reporting ``labelled_tokens``, as lm_loss
does) is skipped and logged with loss None, not 0; checkpoints are written atomically and never
with non-finite weights (training.checkpoint).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .. import _validate as check
from . import checkpoint, distributed
from .data import Loader, eval_batches, pad_collate

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # examples per rank in one micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    weight_decay: float = 0.0  # AdamW's, on parameters with 2+ dimensions only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0  # linear from 0 to lr, as transformers' get_*_schedule_with_warmup
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float | None = 1.0  # >= 0; None or 0: no clipping (transformers' 0)
    # autocast the forward and the loss to bfloat16 (fp32 master weights, gradients and AdamW state):
    # True, False, or "auto" = where bf16 is native (CUDA with bf16 support; a CPU whose fusedlm kernels
    # run bf16 dot products, avx512_bf16). False by default: on AVX2 CPUs bf16 is emulated and slower
    bf16: bool | str = False
    eval_every: int = 0  # steps between evaluations (0: only when evaluate() is called)
    eval_batch_size: int | None = None  # default: batch_size
    eval_max_batches: int | None = None
    save_every: int = 0  # steps between checkpoints in out_dir (0: only at the end, if out_dir)
    out_dir: str | None = None  # checkpoints and metrics.jsonl
    log_every: int = 1  # steps between metrics.jsonl lines
    seed: int = 0  # data order and torch's RNG (dropout)
    shuffle: bool = True
    progress: bool = True  # a tqdm bar on rank 0
    strategy: str = "auto"  # none | ddp | fsdp; auto: ddp when torch.distributed runs on 2+ ranks
    on_nonfinite: str = "stop"  # a NaN / inf loss or gradient: "stop" (FloatingPointError) or "skip" the step

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            check.integer(f"TrainConfig.{name}", getattr(self, name), low=1)
        for name in ("eval_every", "save_every", "seed"):
            check.integer(f"TrainConfig.{name}", getattr(self, name), low=0)
        for name in ("eval_batch_size", "eval_max_batches"):
            if getattr(self, name) is not None:
                check.integer(f"TrainConfig.{name}", getattr(self, name), low=1)
        check.choice("TrainConfig.schedule", self.schedule, SCHEDULES)
        check.number("TrainConfig.lr", self.lr, low=0, low_open=True)
        check.number("TrainConfig.weight_decay", self.weight_decay, low=0)
        check.number("TrainConfig.eps", self.eps, low=0, low_open=True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TypeError(f"TrainConfig.betas must be a pair of numbers, got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check.number(f"TrainConfig.betas[{i}]", beta, low=0, high=1, high_open=True)
        check.probability("TrainConfig.min_lr_ratio", self.min_lr_ratio)
        if self.max_grad_norm is not None:
            check.number("TrainConfig.max_grad_norm", self.max_grad_norm, low=0)
        check.integer("TrainConfig.warmup_steps", self.warmup_steps, low=0, high=self.max_steps)
        check.choice("TrainConfig.strategy", self.strategy, ("auto", *distributed.STRATEGIES))
        check.choice("TrainConfig.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        if self.bf16 not in (True, False, "auto") or not isinstance(self.bf16, (bool, str)):
            raise ValueError(f"TrainConfig.bf16 must be True, False or 'auto', got {self.bf16!r}")
        if self.out_dir is not None and not isinstance(self.out_dir, (str, os.PathLike)):
            raise TypeError(f"TrainConfig.out_dir must be a path or None, got {type(self.out_dir).__name__}")


def lr_factor(step: int, config: TrainConfig) -> float:
    """The LR multiplier at optimizer step `step` (0-based): warmup step/warmup, then the schedule
    from 1 down to min_lr_ratio over the remaining steps (transformers' formulas + a floor)."""
    if step < config.warmup_steps:
        return step / max(1, config.warmup_steps)
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    decay = max(0.0, 1.0 - progress) if config.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is native on `device` (TrainConfig.bf16 = "auto"): a CUDA device with bf16
    support, or a CPU whose fusedlm kernels run bf16 dot products (avx512_bf16; fusedlm._C built)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        from ..ops import _gemm

        return _gemm.native_bf16()
    except (ImportError, RuntimeError):  # no fusedlm._C: the reference path, where bf16 is emulated
        return False


def count_tokens(batch: Any) -> int:
    """Real tokens in a batch: the sum of its "...attention_mask" entries, else the size of its
    "...input_ids" entries (0 for anything else)."""
    if not isinstance(batch, dict):
        return 0
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and isinstance(v, torch.Tensor)]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor))


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with its tensors (in dicts, lists, tuples) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _split(out) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) of what a loss_fn returned: a scalar tensor, or (scalar tensor, dict or None)."""
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"loss_fn must return a scalar tensor or (loss, metrics), got a tuple of {len(out)}")
        loss, metrics = out
    else:
        loss, metrics = out, None
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        what = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return a scalar float tensor (or (loss, metrics)), got {what}")
    metrics = {} if metrics is None else metrics
    if not isinstance(metrics, dict):
        raise TypeError(f"the metrics loss_fn returns must be a dict of numbers (or None), got {type(metrics).__name__}")
    for k, v in metrics.items():
        if not isinstance(k, str) or not (isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)):
            raise TypeError(f"loss_fn metric {k!r} must be a number (or a one-element tensor), got {type(v).__name__}")
    return loss, metrics


# The metric a stage reports for the labelled tokens of a micro-batch (lm_loss does): a step whose
# micro-batches have none on any rank has nothing to learn and is skipped, not logged as loss 0.
LABELLED = "labelled_tokens"


class Trainer:
    """See the module docstring. train_data: a sequence of examples (batched by data.Loader with
    `collate`, default pad_collate) or an iterator of ready batches with state_dict /
    load_state_dict (PPO's rollouts). Config fields may be given as keyword arguments."""

    def __init__(self, model: nn.Module, loss_fn: Callable, train_data: Sequence | Any, *, config: TrainConfig | None = None,
                 eval_data: Sequence | None = None, collate: Callable[[list], Any] | None = None, **overrides):
        self.config = cfg = dataclasses.replace(config or TrainConfig(), **overrides)
        self.rank, self.world_size = distributed.rank_and_world()
        self.strategy = cfg.strategy if cfg.strategy != "auto" else ("ddp" if self.world_size > 1 else "none")
        self.loss_fn, self.collate, self.eval_data = loss_fn, collate or pad_collate, eval_data
        self.model = distributed.wrap(model, self.strategy)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (everything has requires_grad=False)")
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        # the fused AdamW kernel (transformers' default optimizer) is ~7x faster than the per-tensor
        # loop on the CPU; FSDP's DTensor parameters keep the loop
        fused = self.strategy != "fsdp" and all(p.device.type in ("cpu", "cuda") for p in self.params)
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                           fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, cfg))
        if hasattr(train_data, "__next__") and hasattr(train_data, "state_dict"):
            self.loader = train_data
        else:
            self.loader = Loader(train_data, cfg.batch_size, self.collate, seed=cfg.seed, shuffle=cfg.shuffle,
                                 rank=self.rank, world_size=self.world_size)
        self.step = 0
        self.history: list[dict] = []
        self.device = next(self.model.parameters()).device
        self._device_type = self.device.type
        self.bf16 = native_bf16(self.device) if cfg.bf16 == "auto" else cfg.bf16  # what the autocast uses

    # -----------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=self.bf16)

    def _no_sync(self, last_micro: bool):
        """Skips the gradient all-reduce on all but the last micro-batch of an optimizer step."""
        if last_micro or self.strategy == "none":
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return self.model.no_sync()
        self.model.set_requires_gradient_sync(False)
        return _Resync(self.model)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.config.out_dir and self.rank == 0 and (record["step"] % self.config.log_every == 0 or "eval/loss" in record):
            os.makedirs(self.config.out_dir, exist_ok=True)
            with open(os.path.join(self.config.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its record.

        The step is not applied when it has nothing to learn (no micro-batch on any rank has a
        labelled token: the record says "skipped" and its loss is None) or when the loss or the
        gradient is not finite: then config.on_nonfinite="stop" raises FloatingPointError before
        the optimizer step (the weights stay those of the previous step), "skip" drops the step's
        gradient and records why. Skipped steps count as steps (the schedule moves on)."""
        cfg = self.config
        start, tokens, sums, counted = time.perf_counter(), 0, {}, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(cfg.grad_accum):
            batch = to_device(next(self.loader), self.device)
            tokens += count_tokens(batch)
            with self._no_sync(micro == cfg.grad_accum - 1):
                with self._autocast():
                    loss, metrics = _split(self.loss_fn(self.model, batch))
                (loss / cfg.grad_accum).backward()
            if LABELLED in metrics and float(metrics[LABELLED]) == 0:
                continue  # nothing labelled: its loss is not a measurement
            counted += 1
            loss_sum = loss_sum + loss.detach().double()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        totals = torch.stack([loss_sum, torch.tensor(float(counted), dtype=torch.float64, device=self.device)])
        if self.world_size > 1:
            totals = totals.to(distributed._device_type())
            torch.distributed.all_reduce(totals)
        n_counted = int(totals[1].item())
        lr = self.scheduler.get_last_lr()[0]
        record = {"step": self.step + 1, "loss": None, "lr": lr}
        skip, nonfinite = None, False
        if n_counted == 0:
            skip = "no labelled tokens in the step's batches (every label is -100)"
        else:
            loss_mean = float(totals[0].item()) / n_counted
            record["loss"] = loss_mean if math.isfinite(loss_mean) else None
            if not math.isfinite(loss_mean):
                skip, nonfinite = f"the loss is {loss_mean}", True
        if skip is None:
            if n_counted < cfg.grad_accum * self.world_size:  # the mean over the micro-batches with labels
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(cfg.grad_accum * self.world_size / n_counted)
            clip = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")  # None or 0: no clipping
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            record["grad_norm"] = grad_norm
            if not math.isfinite(grad_norm):
                skip, nonfinite = f"the gradient norm is {grad_norm}", True
        if nonfinite and cfg.on_nonfinite == "stop":
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"{skip} at step {self.step + 1}: training stopped before the optimizer step (no checkpoint was "
                f"written for this step; the weights are those after step {self.step}; on_nonfinite='skip' skips such steps)")
        if skip is None:
            self.optimizer.step()
        else:
            record["skipped"] = skip
            if self.rank == 0:
                warnings.warn(f"step {self.step + 1} skipped: {skip}", stacklevel=3)
        with warnings.catch_warnings():  # a skipped step moves the schedule on without an optimizer step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - start
        record["tokens_per_s"] = tokens * self.world_size / elapsed
        record.update({k: v / max(counted, 1) for k, v in sums.items()})
        return record

    def fit(self, resume_from: str | None = None) -> list[dict]:
        """Trains to config.max_steps (from a checkpoint folder if resume_from); returns the history."""
        cfg = self.config
        saved_at = None
        if resume_from is not None:
            state = checkpoint.load(resume_from, self.model, self.optimizer, self.scheduler)
            self.step = state["step"]
            self.loader.load_state_dict(state["loader"])
            if cfg.out_dir and os.path.realpath(resume_from) == os.path.realpath(self._checkpoint_path()):
                saved_at = self.step  # that checkpoint is this step's: nothing to write again
        elif self.step == 0:
            torch.manual_seed(cfg.seed + self.rank)
        bar = None
        if cfg.progress and self.rank == 0:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
            except ImportError:
                pass
        self.model.train()
        try:
            while self.step < cfg.max_steps:
                record = self.train_step()
                if cfg.eval_every and self.eval_data is not None and self.step % cfg.eval_every == 0:
                    record.update(self.evaluate())
                self._log(record)
                if bar is not None:
                    bar.update(1)
                    loss = "skipped" if record["loss"] is None else f"{record['loss']:.4f}"
                    bar.set_postfix(loss=loss, tok_s=f"{record['tokens_per_s']:.0f}")
                if cfg.out_dir and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved_at = self.step
        finally:
            if bar is not None:
                bar.close()
        if cfg.out_dir and saved_at != self.step:
            self.save()
        return self.history

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The stage's loss and metrics averaged over eval_data (every rank a share), as "eval/..." entries."""
        if self.eval_data is None:
            raise ValueError("evaluate() needs eval_data")
        if len(self.eval_data) == 0:
            raise ValueError("eval_data is empty")
        cfg = self.config
        was_training = self.model.training
        self.model.eval()
        totals: dict[str, float] = {}
        n = 0
        for batch in eval_batches(self.eval_data, cfg.eval_batch_size or cfg.batch_size, self.collate, rank=self.rank,
                                  world_size=self.world_size, max_batches=cfg.eval_max_batches):
            batch = to_device(batch, self.device)
            with self._autocast():
                loss, metrics = _split(self.loss_fn(self.model, batch))
            if LABELLED in metrics and float(metrics[LABELLED]) == 0:
                continue  # nothing labelled: no loss to average in
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1
        self.model.train(was_training)
        keys = sorted(totals) if n else ["loss"]
        packed = torch.tensor([totals.get(k, 0.0) for k in keys] + [float(n)], dtype=torch.float64)
        if self.world_size > 1:
            torch.distributed.all_reduce(packed)
        if packed[-1] == 0:
            raise ValueError("no evaluation batch has a labelled token (every label is -100): nothing to evaluate")
        return {f"eval/{k}": (packed[i] / packed[-1]).item() for i, k in enumerate(keys)}

    def _checkpoint_path(self) -> str:
        return os.path.join(self.config.out_dir, f"checkpoint-{self.step}")

    def save(self, path: str | None = None) -> str:
        """Writes checkpoint-<step> in out_dir (or `path`) atomically (training.checkpoint); every
        rank must call it. Raises FloatingPointError, writing nothing, if a weight holds NaN or inf."""
        if path is None and not self.config.out_dir:
            raise ValueError("save() needs a path, or config.out_dir")
        path = path or self._checkpoint_path()
        checkpoint.save(path, self.model, self.optimizer, self.scheduler, step=self.step,
                        loader_state=self.loader.state_dict())
        return path


class _Resync(contextlib.AbstractContextManager):
    """Turns FSDP2's gradient sync back on when the micro-batch is done."""

    def __init__(self, model):
        self.model = model

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False
