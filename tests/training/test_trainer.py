"""The Trainer: CLM and MLM learn, full and LoRA fine-tuning, schedules, accumulation, bf16,
checkpoints and exact resume, metrics, NaN and bad input."""
import json
import math
import os

import pytest
import torch

import _tiny
from fusedlm import peft
from fusedlm.training import TrainConfig, Trainer, lm_loss, lr_factor, objectives
from fusedlm.training.data import Loader, pad_collate


def _fit(model, data, **kw):
    kw = {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "progress": False, **kw}
    trainer = Trainer(model, lm_loss, data, **kw)
    return trainer, trainer.fit()


def test_clm_loss_falls():
    model = _tiny.model()
    data, held_out = _tiny.clm_rows(256), _tiny.clm_rows(32, seed=1)
    trainer, hist = _fit(model, data, max_steps=60, eval_data=held_out, eval_every=60)
    before = Trainer(_tiny.model(), lm_loss, data, eval_data=held_out, progress=False).evaluate()["eval/loss"]
    assert hist[-1]["eval/loss"] < 0.5 * before
    assert before == pytest.approx(math.log(_tiny.V), rel=0.15)  # an untrained model is near uniform
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in hist)


def test_mlm_accuracy_rises():
    model = _tiny.model("bert-tiny")
    mask_id = 1

    def collate(examples):
        ids = torch.stack([e["input_ids"] for e in examples])
        inputs, labels = objectives.mlm(ids, mask_token_id=mask_id, vocab_size=_tiny.V, generator=gen)
        return {"input_ids": inputs, "labels": labels}

    gen = torch.Generator().manual_seed(0)
    trainer = Trainer(model, lm_loss, _tiny.periodic(1024), collate=collate, eval_data=_tiny.periodic(64, seed=1),
                      max_steps=150, batch_size=32, lr=3e-3, warmup_steps=10, progress=False)
    before = trainer.evaluate()["eval/accuracy"]
    trainer.fit()
    after = trainer.evaluate()["eval/accuracy"]
    assert before < 0.1 and after > 0.6


@pytest.mark.parametrize("objective", ["span_corruption", "bart_denoising"])
def test_seq2seq_objectives_train(objective):
    preset = "t5-tiny" if objective == "span_corruption" else "bart-tiny"
    model = _tiny.model(preset)
    gen = torch.Generator().manual_seed(0)

    def collate(examples):
        ids = torch.stack([e["input_ids"] for e in examples])
        if objective == "span_corruption":
            inputs, targets = objectives.span_corruption(ids, vocab_size=_tiny.V, eos_token_id=1, generator=gen)
            return {"input_ids": inputs, "labels": targets}
        ids = torch.cat([torch.zeros_like(ids[:, :1]), ids, torch.full_like(ids[:, :1], 2)], dim=1)  # BOS ... EOS
        inputs, labels = objectives.bart_denoising(ids, mask_token_id=3, pad_token_id=1, generator=gen)
        return {"input_ids": inputs, "attention_mask": inputs != 1, "labels": labels}

    # periodic rows: a dropped span is a copy of the tokens one period away (ids below the sentinels)
    data = _tiny.periodic(1024, length=24, low=5, vocab=_tiny.V - 8)
    trainer = Trainer(model, lm_loss, data, collate=collate, max_steps=80, batch_size=16, lr=1e-2 if objective == "span_corruption" else 3e-3,
                      warmup_steps=5, progress=False)
    hist = trainer.fit()
    first, last = sum(r["loss"] for r in hist[:5]) / 5, sum(r["loss"] for r in hist[-5:]) / 5
    assert last < 0.85 * first


def test_lora_fine_tuning_trains_only_the_adapters():
    model = _tiny.model()
    peft.apply_lora(model, r=8, alpha=16, targets="all")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer, hist = _fit(model, _tiny.clm_rows(512), max_steps=60, batch_size=16, lr=1e-2)
    first, last = sum(r["loss"] for r in hist[:5]) / 5, sum(r["loss"] for r in hist[-5:]) / 5
    assert last < 0.88 * first  # a random-init base: LoRA (B = 0 at the start) learns slower than full training
    assert sum(p.numel() for p in trainer.params) == peft.trainable_parameters(model)[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_bf16_autocast_trains():
    trainer, hist = _fit(_tiny.model(), _tiny.clm_rows(256), bf16=True, max_steps=40)
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    assert trainer.model.tok_embed.weight.dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules(schedule):
    cfg = TrainConfig(max_steps=10, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(10)]
    assert factors[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    if schedule == "constant":
        assert factors[5:] == [1.0] * 5
    elif schedule == "linear":
        assert factors[7] == pytest.approx(0.1 + 0.9 * 0.5)
    else:
        assert factors[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    trainer = Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(64), config=cfg, lr=1e-3, batch_size=4, progress=False)
    hist = trainer.fit()
    assert [r["lr"] for r in hist] == pytest.approx([1e-3 * f for f in factors])


def test_gradient_accumulation_equals_the_big_batch():
    data = _tiny.clm_rows(64)
    a, _ = _fit(_tiny.model(), data, max_steps=3, batch_size=8, grad_accum=1, shuffle=False)
    b, _ = _fit(_tiny.model(), data, max_steps=3, batch_size=4, grad_accum=2, shuffle=False)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)


def test_resume_is_exact(tmp_path):
    data = _tiny.clm_rows(96)  # 12 batches: the data wraps into a second epoch
    kw = dict(lr=3e-3, max_steps=16, batch_size=8, warmup_steps=2, progress=False)
    # dropout on: the RNG states must resume too
    full = Trainer(_tiny.model(dropout=0.1), lm_loss, data, out_dir=str(tmp_path), save_every=7, **kw).fit()
    resumed = Trainer(_tiny.model(seed=123, dropout=0.1), lm_loss, data, **kw)  # a fresh process, other weights
    hist = resumed.fit(resume_from=str(tmp_path / "checkpoint-7"))
    assert [r["step"] for r in hist] == list(range(8, 17))
    assert [r["loss"] for r in hist] == [r["loss"] for r in full[7:]]  # bit for bit
    assert {"model.safetensors", "optimizer.pt", "trainer_state.pt", "rng-0.pt"} <= set(os.listdir(tmp_path / "checkpoint-7"))


def test_metrics_jsonl_and_checkpoints(tmp_path):
    trainer, hist = _fit(_tiny.model(), _tiny.clm_rows(64), max_steps=6, save_every=3, out_dir=str(tmp_path),
                         eval_data=_tiny.clm_rows(16, seed=2), eval_every=3)
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "accuracy"} <= set(lines[0]) and "eval/loss" in lines[2]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-6", "metrics.jsonl"]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(weights[name], p), name


def test_progress_bar_shows_loss_and_tokens_per_second(capsys):
    Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(32), max_steps=2, batch_size=4, progress=True).fit()
    err = capsys.readouterr().err
    assert "loss=" in err and "tok_s=" in err


# --------------------------------------------------------------------------------------------- failures
def test_nan_loss_stops_with_the_step_and_writes_no_checkpoint(tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, m = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 4 else loss), m

    trainer = Trainer(_tiny.model(), poisoned, _tiny.clm_rows(64), max_steps=10, batch_size=4, save_every=1,
                      out_dir=str(tmp_path), progress=False)
    with pytest.raises(FloatingPointError, match="at step 4"):
        trainer.fit()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "metrics.jsonl"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_checkpoint_from_another_model_is_refused(tmp_path):
    trainer, _ = _fit(_tiny.model(), _tiny.clm_rows(32), max_steps=1, warmup_steps=0, batch_size=4, out_dir=str(tmp_path))
    other = Trainer(_tiny.model(d_model=32, n_heads=2, n_kv_heads=1), lm_loss, _tiny.clm_rows(32), max_steps=2,
                    batch_size=4, progress=False)
    with pytest.raises(ValueError, match="from another model.*shapes differ"):
        other.fit(resume_from=str(tmp_path / "checkpoint-1"))
    with pytest.raises(FileNotFoundError, match="not a fusedlm training checkpoint"):
        other.fit(resume_from=str(tmp_path))


@pytest.mark.parametrize("make, match", [
    (lambda: Trainer(_tiny.model(), lm_loss, [], progress=False), "dataset is empty"),
    (lambda: Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(3), batch_size=4), "fewer than one global batch"),
    (lambda: Trainer(_tiny.model().requires_grad_(False), lm_loss, _tiny.clm_rows(8)), "no trainable parameters"),
    (lambda: Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(8), schedule="step"), "schedule"),
    (lambda: Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(8), grad_accum=0), "grad_accum"),
    (lambda: Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(8), strategy="ddp"), "needs torch.distributed"),
    (lambda: Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(8), batch_size=4).evaluate(), "needs eval_data"),
    (lambda: Loader(5, 2, pad_collate), "must be a sequence"),
])
def test_bad_configuration_is_a_clear_error(make, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        make()


def test_labels_of_the_wrong_shape_are_refused():
    model = _tiny.model()
    batch = {"input_ids": torch.randint(0, _tiny.V, (2, 8)), "labels": torch.randint(0, _tiny.V, (2, 7))}
    with pytest.raises(ValueError, match="labels must have the shape"):
        lm_loss(model, batch)


def test_command_line_trains_and_generates(tmp_path, capsys):
    import numpy as np

    from fusedlm.training.__main__ import main

    tokens = np.arange(4000) % 100
    np.save(tmp_path / "tokens.npy", tokens)
    assert main(["clm", "--data", str(tmp_path / "tokens.npy"), "--seq", "32", "--steps", "3", "--batch-size", "4",
                 "--out", str(tmp_path / "run"), "--warmup", "1"]) == 0
    assert "step 3: loss" in capsys.readouterr().out
    assert main(["generate", "--weights", str(tmp_path / "run" / "checkpoint-3" / "model.safetensors"),
                 "--max-new-tokens", "4", "--seq", "8"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and len(rows[0].split()) == 4 + 4
