"""fusedlm.training under bad input and bad numbers: every hyper-parameter range-checked with its name;
a non-finite loss or gradient never reaches the weights or a checkpoint; a batch with nothing to
learn is reported, not counted as loss 0; a checkpoint is checked whole before anything changes;
the command line refuses bad values with argparse errors before any work."""
import os
import shutil

import pytest
import torch

import _tiny
from fusedlm.training import TrainConfig, Trainer, checkpoint, lm_loss, ppo
from fusedlm.training.__main__ import main as cli


def _trainer(out_dir=None, loss_fn=lm_loss, data=None, **kw):
    kw = {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "progress": False, "schedule": "constant", **kw}
    return Trainer(_tiny.model(), loss_fn, data if data is not None else _tiny.clm_rows(32), out_dir=out_dir, **kw)


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CONFIG = [  # (field, value, error, message)
    ("lr", 0, ValueError, r"TrainConfig\.lr must be > 0"),
    ("lr", -1e-3, ValueError, r"TrainConfig\.lr must be > 0"),
    ("lr", float("inf"), ValueError, r"TrainConfig\.lr must be a finite number, got inf"),
    ("lr", float("nan"), ValueError, r"TrainConfig\.lr must be a finite number, got nan"),
    ("lr", "1e-3", TypeError, r"TrainConfig\.lr must be a number"),
    ("max_grad_norm", -1, ValueError, r"TrainConfig\.max_grad_norm must be >= 0, got -1"),
    ("max_grad_norm", float("nan"), ValueError, r"TrainConfig\.max_grad_norm must be a finite number"),
    ("max_grad_norm", float("inf"), ValueError, r"TrainConfig\.max_grad_norm must be a finite number"),
    ("min_lr_ratio", -1, ValueError, r"TrainConfig\.min_lr_ratio must be in \[0, 1\], got -1"),
    ("min_lr_ratio", 1.5, ValueError, r"TrainConfig\.min_lr_ratio must be in \[0, 1\]"),
    ("batch_size", 0, ValueError, r"TrainConfig\.batch_size must be >= 1"),
    ("batch_size", 2.0, TypeError, r"TrainConfig\.batch_size must be an int"),
    ("grad_accum", 0, ValueError, r"TrainConfig\.grad_accum must be >= 1"),
    ("max_steps", 0, ValueError, r"TrainConfig\.max_steps must be >= 1"),
    ("log_every", 0, ValueError, r"TrainConfig\.log_every must be >= 1"),
    ("warmup_steps", 100, ValueError, r"TrainConfig\.warmup_steps must be in \[0, 3\]"),
    ("warmup_steps", -1, ValueError, r"TrainConfig\.warmup_steps must be in"),
    ("weight_decay", -0.1, ValueError, r"TrainConfig\.weight_decay must be >= 0"),
    ("weight_decay", float("nan"), ValueError, r"TrainConfig\.weight_decay must be a finite number"),
    ("betas", (1.0, 0.999), ValueError, r"TrainConfig\.betas\[0\] must be in \[0, 1\)"),
    ("betas", (0.9, -0.1), ValueError, r"TrainConfig\.betas\[1\] must be in \[0, 1\)"),
    ("betas", 0.9, TypeError, r"TrainConfig\.betas must be a pair"),
    ("eps", 0, ValueError, r"TrainConfig\.eps must be > 0"),
    ("eval_every", -1, ValueError, r"TrainConfig\.eval_every must be >= 0"),
    ("save_every", -1, ValueError, r"TrainConfig\.save_every must be >= 0"),
    ("eval_batch_size", 0, ValueError, r"TrainConfig\.eval_batch_size must be >= 1"),
    ("eval_max_batches", 0, ValueError, r"TrainConfig\.eval_max_batches must be >= 1"),
    ("seed", -1, ValueError, r"TrainConfig\.seed must be >= 0"),
    ("schedule", "step", ValueError, r"TrainConfig\.schedule must be one of"),
    ("strategy", "zero3", ValueError, r"TrainConfig\.strategy must be one of"),
    ("on_nonfinite", "ignore", ValueError, r"TrainConfig\.on_nonfinite must be one of \('stop', 'skip'\)"),
    ("out_dir", 3, TypeError, r"TrainConfig\.out_dir must be a path"),
]


@pytest.mark.parametrize("field, value, error, match", CONFIG, ids=[f"{f}={v!r}" for f, v, _, _ in CONFIG])
def test_every_hyper_parameter_is_range_checked(field, value, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**{"max_steps": 3, field: value})


def test_max_grad_norm_0_means_no_clipping_as_in_transformers():
    runs = {}
    for norm in (None, 0, 1e-6):
        t = _trainer(max_grad_norm=norm)
        t.fit()
        runs[norm] = _weights(t.model)
    assert _same(runs[None], runs[0])  # 0: no clipping (it used to zero every gradient)
    assert not _same(runs[None], runs[1e-6])  # a real clip clips


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_finite_loss_with_nan_gradients_never_reaches_the_weights(tmp_path, mode):
    # the loss is finite; one parameter's gradient is NaN at step 5 (a hook); save_every=1: the step
    # is not applied, and no checkpoint is written with what it would have made
    t = _trainer(str(tmp_path), save_every=1, on_nonfinite=mode)
    t.fit()  # steps 1-3, checkpoints 1-3
    p = next(p for p in t.model.parameters() if p.requires_grad)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    p.register_hook(poison)
    t.config.max_steps = 6
    if mode == "stop":
        with pytest.raises(FloatingPointError, match=r"the gradient norm is nan at step 5: training stopped before the optimizer step"):
            t.fit()
        assert t.step == 4 and checkpoint.latest(str(tmp_path)) == str(tmp_path / "checkpoint-4")
        assert not (tmp_path / "checkpoint-5").exists()
    else:
        with pytest.warns(UserWarning, match="step 5 skipped: the gradient norm is nan"):
            history = t.fit()[3:]  # steps 4-6
        assert [r.get("skipped") for r in history] == [None, "the gradient norm is nan", None]
        assert history[1]["loss"] is not None  # the loss itself was finite
        weights = {}
        for step in (4, 5):  # step 5 changed nothing: its checkpoint holds step 4's weights
            c = _trainer(max_steps=6)
            checkpoint.load(str(tmp_path / f"checkpoint-{step}"), c.model, c.optimizer, c.scheduler)
            weights[step] = _weights(c.model)
        assert _same(weights[4], weights[5])
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values())


def test_rows_of_one_token_teach_a_causal_lm_nothing_and_say_so():
    # a causal LM predicts the next token: rows of 1 token have none (they once "trained" to loss 0)
    rows = [{"input_ids": r["input_ids"][:1], "labels": r["input_ids"][:1]} for r in _tiny.clm_rows(8)]
    t = _trainer(data=rows, max_steps=1)
    with pytest.warns(UserWarning, match="no labelled tokens"):
        assert t.fit()[0]["loss"] is None


def test_nan_loss_skipped_on_request():
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, m = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 2 else loss), m

    t = _trainer(loss_fn=loss_fn, on_nonfinite="skip")
    with pytest.warns(UserWarning, match="step 2 skipped: the loss is nan"):
        history = t.fit()
    assert [r.get("skipped") for r in history] == [None, "the loss is nan", None]
    assert history[1]["loss"] is None and all(torch.isfinite(v).all() for v in t.model.state_dict().values())


def test_a_checkpoint_is_never_written_with_nonfinite_weights(tmp_path):
    t = _trainer(str(tmp_path))
    t.train_step()
    with torch.no_grad():
        next(t.model.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not writing checkpoint .*weights hold NaN or inf \(tok_embed\.weight\)"):
        t.save()
    assert os.listdir(tmp_path) == [] or not any(n.startswith("checkpoint") for n in os.listdir(tmp_path))


def _ignored(rows):
    return [{"input_ids": r["input_ids"], "labels": torch.full_like(r["input_ids"], -100)} for r in rows]


def test_an_all_ignored_batch_is_reported_not_counted_as_loss_0():
    t = _trainer(data=_ignored(_tiny.clm_rows(32)))
    before = _weights(t.model)
    with pytest.warns(UserWarning, match="step 1 skipped: no labelled tokens"):
        record = t.train_step()
    assert record["loss"] is None and "every label is -100" in record["skipped"]
    assert _same(_weights(t.model), before)  # AdamW did not move the weights on a zero gradient
    with pytest.raises(ValueError, match="no evaluation batch has a labelled token"):
        Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(8), eval_data=_ignored(_tiny.clm_rows(8)), batch_size=4,
                progress=False).evaluate()


def test_empty_micro_batches_are_left_out_of_the_step_mean():
    # grad_accum 2, the second micro-batch of every step has no labels: the step is the first one's
    # alone, exactly as a run without the empty micro-batches
    rows = _tiny.clm_rows(32)
    mixed = [r for pair in zip(rows[:16], _ignored(rows[16:])) for r in pair]
    a = _trainer(data=mixed, grad_accum=2, batch_size=1, shuffle=False, max_steps=4)
    b = _trainer(data=rows[:16], grad_accum=1, batch_size=1, shuffle=False, max_steps=4)
    ha, hb = a.fit(), b.fit()
    assert [r["loss"] for r in ha] == pytest.approx([r["loss"] for r in hb], rel=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("returns, error, match", [
    (lambda loss: (loss, None), None, None),
    (lambda loss: (loss, "acc"), TypeError, "metrics loss_fn returns must be a dict"),
    (lambda loss: (loss, {"acc": "high"}), TypeError, "loss_fn metric 'acc' must be a number"),
    (lambda loss: (loss, {}, 1), TypeError, "a tuple of 3"),
    (lambda loss: loss.item(), TypeError, "loss_fn must return a scalar float tensor .* got float"),
    (lambda loss: loss.expand(2), TypeError, r"got a tensor of shape \[2\]"),
    (lambda loss: loss.long(), TypeError, "scalar float tensor"),
], ids=["none-metrics", "str-metrics", "str-metric", "3-tuple", "float", "vector", "int"])
def test_what_a_loss_fn_returns(returns, error, match):
    t = _trainer(loss_fn=lambda m, b: returns(lm_loss(m, b)[0]))
    if error is None:
        assert t.train_step()["loss"] is not None
    else:
        with pytest.raises(error, match=match):
            t.train_step()


# ---- checkpoints: checked whole before anything changes --------------------------------------
def _damaged(tmp_path, damage):
    t = _trainer(str(tmp_path / "run"))
    t.fit()
    path = tmp_path / "run" / "checkpoint-3"
    damage(path)
    fresh = _trainer(str(tmp_path / "other"), max_steps=5)
    fresh.train_step()  # some optimizer state of its own to lose
    return path, fresh


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x55
    path.write_bytes(bytes(data))


CHECKPOINT_DAMAGE = [
    (lambda p: os.remove(p / "fusedlm_complete.json"), ValueError, "incomplete: it has no fusedlm_complete.json"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:1000]), ValueError,
     r"model\.safetensors is truncated: 1000 bytes"),
    (lambda p: _flip(p / "model.safetensors"), ValueError, r"model\.safetensors is corrupted: .*SHA-256"),  # finite garbage
    (lambda p: _flip(p / "optimizer.pt"), ValueError, r"optimizer\.pt is corrupted"),
    (lambda p: os.remove(p / "trainer_state.pt"), ValueError, r"trainer_state\.pt is missing"),
    (lambda p: (p / "rng-0.pt").write_bytes(b""), ValueError, r"rng-0\.pt is truncated: 0 bytes"),
    (lambda p: shutil.rmtree(p), FileNotFoundError, "does not exist"),
]


@pytest.mark.parametrize("damage, error, match", CHECKPOINT_DAMAGE,
                         ids=["no-marker", "truncated", "garbage", "optimizer-garbage", "no-state", "empty-rng", "missing"])
def test_a_broken_checkpoint_changes_nothing(tmp_path, damage, error, match):
    path, fresh = _damaged(tmp_path, damage)
    weights, optim = _weights(fresh.model), fresh.optimizer.state_dict()
    with pytest.raises(error, match=match):
        fresh.fit(resume_from=str(path))
    assert _same(_weights(fresh.model), weights) and fresh.step == 1
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(optim["state"].values(),
                                                                      fresh.optimizer.state_dict()["state"].values()))


def test_a_checkpoint_of_another_optimizer_changes_nothing(tmp_path):
    t = _trainer(str(tmp_path / "run"))
    t.fit()
    path = str(tmp_path / "run" / "checkpoint-3")
    fresh = _trainer(weight_decay=0.1)
    fresh.optimizer.param_groups[0]["params"] = fresh.optimizer.param_groups[0]["params"][:-1]  # the same model, another optimizer
    before = _weights(fresh.model)
    with pytest.raises(ValueError, match=r"optimizer\.pt is the optimizer of another model: parameter groups of sizes"):
        checkpoint.load(path, fresh.model, fresh.optimizer, fresh.scheduler)
    assert _same(_weights(fresh.model), before)


def test_latest_skips_incomplete_checkpoints(tmp_path):
    t = _trainer(str(tmp_path), save_every=1)
    t.fit()
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "checkpoint-3")
    os.remove(tmp_path / "checkpoint-3" / "fusedlm_complete.json")
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    os.makedirs(tmp_path / "checkpoint-9")
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    assert checkpoint.latest(str(tmp_path / "none")) is None


def test_resuming_with_nothing_left_to_train_writes_nothing(tmp_path):
    t = _trainer(str(tmp_path))
    t.fit()
    stamp = os.stat(tmp_path / "checkpoint-3" / "fusedlm_complete.json").st_mtime_ns
    again = _trainer(str(tmp_path))
    assert again.fit(resume_from=str(tmp_path / "checkpoint-3")) == []
    assert os.stat(tmp_path / "checkpoint-3" / "fusedlm_complete.json").st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "metrics.jsonl"]


def test_save_without_a_folder():
    with pytest.raises(ValueError, match="save.. needs a path, or config.out_dir"):
        _trainer().save()


PPO = [
    (dict(mini_batch_size=0), ValueError, r"PPOConfig\.mini_batch_size must be >= 1, got 0"),
    (dict(rollout_batch_size=0), ValueError, r"PPOConfig\.rollout_batch_size must be >= 1"),
    (dict(num_ppo_epochs=0), ValueError, r"PPOConfig\.num_ppo_epochs must be >= 1"),
    (dict(response_length=0), ValueError, r"PPOConfig\.response_length must be >= 1"),
    (dict(rollout_batch_size=10, mini_batch_size=4), ValueError, "must be a multiple of mini_batch_size"),
    (dict(temperature=0), ValueError, r"PPOConfig\.temperature must be > 0"),
    (dict(kl_coef=-1), ValueError, r"PPOConfig\.kl_coef must be >= 0"),
    (dict(cliprange=float("nan")), ValueError, r"PPOConfig\.cliprange must be a finite number"),
    (dict(gamma=1.5), ValueError, r"PPOConfig\.gamma must be in \[0, 1\]"),
    (dict(lam=-0.1), ValueError, r"PPOConfig\.lam must be in \[0, 1\]"),
    (dict(kl_estimator="k2"), ValueError, r"PPOConfig\.kl_estimator must be one of"),
    (dict(pad_token_id=-1), ValueError, r"PPOConfig\.pad_token_id must be a token id"),
    (dict(stop_token_id=1.5), ValueError, r"PPOConfig\.stop_token_id must be a token id"),
]


@pytest.mark.parametrize("fields, error, match", PPO, ids=[str(f) for f, _, _ in PPO])
def test_ppo_sizes_and_coefficients(fields, error, match):
    with pytest.raises(error, match=match):
        ppo.PPOConfig(**fields)


# ---- the command line -----------------------------------------------------------------------
CLI = [  # (arguments, what stderr says)
    (["clm", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["clm", "--steps", "ten"], "argument --steps: expected an integer, got 'ten'"),
    (["clm", "--preset", "nosuch"], "argument --preset: invalid choice: 'nosuch'"),
    (["clm", "--lr", "-1"], "argument --lr: must be > 0, got -1.0"),
    (["clm", "--lr", "0"], "argument --lr: must be > 0, got 0.0"),
    (["clm", "--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["clm", "--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["clm", "--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["clm", "--seq", "1"], "argument --seq: must be >= 2, got 1"),
    (["clm", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["clm", "--grad-accum", "0"], "argument --grad-accum: must be >= 1"),
    (["clm", "--warmup", "-1"], "argument --warmup: must be >= 0"),
    (["clm", "--save-every", "-2"], "argument --save-every: must be >= 0"),
    (["clm", "--seed", "-1"], "argument --seed: must be >= 0"),
    (["generate", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    (["clm", "--strategy", "fsdp"], "--strategy fsdp needs several processes: start it with torchrun"),
    (["clm", "--strategy", "ddp"], "--strategy ddp needs several processes"),
    (["clm", "--strategy", "zero"], "argument --strategy: invalid choice"),
    (["clm", "--hf", "NOWHERE"], "argument --hf: NOWHERE is not a folder"),
    (["clm", "--weights", "NOWHERE.safetensors"], "argument --weights: NOWHERE.safetensors is not a file"),
    (["clm", "--data", "NOWHERE.npy"], "argument --data: NOWHERE.npy is not a file"),
    (["clm", "--resume", "NOWHERE"], "argument --resume: NOWHERE is not a folder"),
    (["clm", "--save-every", "5"], "--save-every needs --out"),
    (["clm", "--tp"], "--tp is for the generate command"),
    (["generate", "--out", "x"], "--resume, --out and --save-every are for the clm command"),
    (["clm", "--seq", "100"], "--seq 100 is longer than the model's max_seq_len=64"),
    (["nosuch"], "argument command: invalid choice"),
]


@pytest.mark.parametrize("argv, message", CLI, ids=[" ".join(a) for a, _ in CLI])
def test_the_cli_refuses_bad_values_with_argparse_errors(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_cli_checks_files_and_folders_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    from fusedlm.interop import hf
    from tiny_models import fused

    hf.save_pretrained(fused("gpt2-tiny"), str(tmp_path / "gpt2"))
    torch.save(torch.rand(100), tmp_path / "floats.pt")
    torch.save(torch.arange(1000) % 500, tmp_path / "big_ids.pt")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    run = _trainer(str(tmp_path / "run"))
    run.fit()
    os.remove(tmp_path / "run" / "checkpoint-3" / "fusedlm_complete.json")
    from fusedlm.models import build, get_config

    run2 = Trainer(build(get_config("llama-tiny")), lm_loss, _tiny.clm_rows(8), max_steps=3, batch_size=4, progress=False,
                   out_dir=str(tmp_path / "run2"))
    run2.fit()
    weights = tmp_path / "run2" / "checkpoint-3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x11
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    cases = [
        (["clm", "--out", str(tmp_path / "file" / "sub")], "--out " + str(tmp_path / "file" / "sub") + " cannot be created"),
        (["clm", "--out", str(tmp_path / "file")], "exists and is not a folder"),
        # weights of another architecture: nothing matches, which strict=False used to accept silently
        (["generate", "--weights", str(tmp_path / "gpt2" / "model.safetensors")], "does not match the model: missing ["),
        (["clm", "--data", str(tmp_path / "floats.pt")], "must hold an integer tensor of token ids, got torch.float32"),
        (["clm", "--data", str(tmp_path / "big_ids.pt")], "outside the model's vocabulary [0, 128)"),
        (["clm", "--data", str(tmp_path / "bad.npy")], "is not a readable .npy array"),
        (["clm", "--data", str(tmp_path / "file")], "cannot be read (truncated, corrupted or not a torch.save file)"),
        (["clm", "--resume", str(tmp_path / "run" / "checkpoint-3")], "is not a complete fusedlm training checkpoint"),
        (["clm", "--resume", str(tmp_path / "run")], "is not a complete fusedlm training checkpoint"),
        # weights inside a checkpoint folder are checked against its completion marker
        (["generate", "--weights", str(tmp_path / "run2" / "checkpoint-3" / "model.safetensors")], "is corrupted"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def test_the_cli_runs_and_resumes(tmp_path, capsys):
    assert cli(["clm", "--steps", "2", "--batch-size", "2", "--seq", "8", "--out", str(tmp_path), "--save-every", "1"]) == 0
    assert cli(["clm", "--steps", "2", "--batch-size", "2", "--seq", "8", "--out", str(tmp_path),
                "--resume", str(tmp_path / "checkpoint-2")]) == 0
    assert "nothing left to train" in capsys.readouterr().out
    assert cli(["generate", "--weights", str(tmp_path / "checkpoint-2" / "model.safetensors"), "--seq", "8",
                "--max-new-tokens", "2"]) == 0
