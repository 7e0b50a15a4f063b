"""DESIGN.md rule 8 under fire: a process killed while it saves a model, an adapter or a trainer
checkpoint never destroys the previous one, and ``training.checkpoint.latest`` skips what it left.

Each case runs the save in a child process that dies (``os._exit``, no clean-up) at a chosen point:
after N bytes of one of the files it writes (the state a kill leaves: the file cut there), between
two files, or inside the final swap of the folders. A second kind kills a child with SIGKILL at
random moments while it saves over and over. Then the folder must load, whole, as the previous
save (or, once the swap is done, as the new one), and a run resumes from ``latest()``.
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from fusedlm import _io, peft
from fusedlm.interop import hf
from fusedlm.interop import peft as peft_files
from fusedlm.training import checkpoint

TESTS = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(TESTS, "training"))  # _tiny, which crash_children imports
import crash_children  # noqa: E402

# The child: builds what the parent built, with seed 1 instead of 0, and saves it into FOLDER with
# the file writers of the save path (safetensors.save_file, torch.save, fusedlm._io.write_text)
# wrapped so that the process dies at the chosen point.
CHILD = textwrap.dedent(r'''
    import io, os, sys
    sys.path[:0] = [TESTS, os.path.join(TESTS, "training")]
    import torch
    import safetensors.torch as st
    from fusedlm import _io
    mode, crash, folder = sys.argv[1:4]
    kind, _, arg = crash.partition(":")
    writes = [0]

    def gate(path, data):
        k = writes[0]
        writes[0] += 1
        if kind == "between" and k == int(arg):
            os._exit(9)
        if kind == "bytes" and k == int(arg.split("@")[0]):
            blob = data()
            cut = float(arg.split("@")[1])
            n = int(cut) if cut >= 1 or cut == 0 else int(len(blob) * cut)
            with open(path, "wb") as f:
                f.write(blob[:min(n, len(blob) - 1)])
            os._exit(9)

    real_save_file, real_torch_save, real_write_text = st.save_file, torch.save, _io.write_text

    def save_file(tensors, path, metadata=None):
        gate(path, lambda: st.save(tensors, metadata=metadata))
        real_save_file(tensors, path, metadata=metadata)

    def torch_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            def data():
                b = io.BytesIO()
                real_torch_save(obj, b)
                return b.getvalue()
            gate(f, data)
        real_torch_save(obj, f, *args, **kwargs)

    def write_text(path, text):
        gate(path, lambda: text.encode())
        real_write_text(path, text)

    st.save_file, torch.save, _io.write_text = save_file, torch_save, write_text
    if kind == "swap":  # inside commit_folder: before the exchange, or after it (old folder not yet removed)
        real_exchange = _io._exchange
        def exchange(a, b):
            if arg == "before":
                os._exit(9)
            real_exchange(a, b)
            os._exit(9)
        _io._exchange = exchange
    if kind == "fallback":  # the two-rename swap, killed between its renames
        _io._exchange = lambda a, b: False
        real_rename = os.rename
        def rename(a, b):
            real_rename(a, b)
            if b.endswith(".replaced"):
                os._exit(9)
        os.rename = rename
    if kind == "rename":  # a new folder's one rename into place: killed just before it, or just after
        real_rename = os.rename
        def rename(a, b):
            if a.endswith(".partial") and arg == "before":
                os._exit(9)
            real_rename(a, b)
            if a.endswith(".partial"):
                os._exit(9)
        os.rename = rename
    import crash_children
    getattr(crash_children, mode)(folder)
    print("saved", flush=True)
''').replace("TESTS", repr(TESTS))


def _child(tmp_path, mode: str, crash: str, folder) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, str(script), mode, crash, str(folder)], capture_output=True, text=True,
                          env=env, timeout=300)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- models --------------------------------------------------------------------------------------
# the files of a model folder in the order they are written: config.json, model.safetensors; byte
# offsets: 0, the 8-byte header length, a fraction of the file
MODEL_CRASHES = ["between:0", "bytes:0@0.5", "between:1", "bytes:1@0", "bytes:1@8", "bytes:1@0.5", "bytes:1@0.999",
                 "swap:before", "fallback:mid", "swap:after"]


@pytest.mark.parametrize("crash", MODEL_CRASHES)
def test_model_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, crash):
    folder = tmp_path / "model"
    hf.save_pretrained(crash_children.model(0), str(folder))
    (folder / "tokenizer.json").write_text("{}")  # a file of the user's: kept whatever happens
    previous, new = _state(crash_children.model(0)), _state(crash_children.model(1))
    result = _child(tmp_path, "save_model", crash, folder)
    assert result.returncode == 9, result.stderr[-3000:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = _state(hf.from_pretrained(str(folder)))
    done = crash == "swap:after"  # the new folder is in place; only the old one's removal was cut
    assert _same(loaded, new if done else previous)
    # killed between the two renames of the fallback swap: the old folder is beside the name, and is read from there
    where = tmp_path / ".model.replaced" if crash == "fallback:mid" else folder
    assert (where / "tokenizer.json").read_text() == "{}"
    assert bool(caught) == (crash == "fallback:mid")
    hf.save_pretrained(crash_children.model(1), str(folder))  # the next save clears what the crash left
    assert _same(_state(hf.from_pretrained(str(folder))), new) and sorted(os.listdir(tmp_path)) == ["child.py", "model"]
    assert (folder / "tokenizer.json").read_text() == "{}"


# ---- adapters ------------------------------------------------------------------------------------
ADAPTER_CRASHES = ["bytes:0@0.5", "between:1", "bytes:1@0.5", "swap:before", "fallback:mid"]


@pytest.mark.parametrize("crash", ADAPTER_CRASHES)
def test_adapter_save_killed_midway_leaves_the_previous_adapter(tmp_path, crash):
    # the config (lora_alpha 16 before, 32 after) and the weights of one save stay together
    folder = tmp_path / "adapter"
    peft_files.save_adapter(crash_children.adapted(0), str(folder))
    result = _child(tmp_path, "save_adapter", crash, folder)
    assert result.returncode == 9, result.stderr[-3000:]
    ids = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft_files.load_adapter(crash_children.base(), str(folder))
    assert bool(caught) == (crash == "fallback:mid")  # read from .adapter.replaced, with a warning
    torch.testing.assert_close(loaded(ids).logits, crash_children.adapted(0)(ids).logits, rtol=0, atol=0)


# ---- trainer checkpoints -------------------------------------------------------------------------
# the files of a checkpoint in the order they are written: model.safetensors, optimizer.pt,
# trainer_state.pt, rng-0.pt, then the completion marker
TRAINER_CRASHES = ["bytes:0@8", "bytes:0@0.5", "bytes:1@0.5", "between:2", "bytes:2@0.9", "between:3", "between:4",
                   "rename:before", "rename:after"]


@pytest.mark.parametrize("crash", TRAINER_CRASHES)
def test_trainer_checkpoint_killed_midway_is_skipped_and_the_run_resumes(tmp_path, crash):
    out = tmp_path / "run"
    clean = crash_children.trainer(str(tmp_path / "clean"), max_steps=4).fit()  # the uninterrupted run
    crash_children.trainer(str(out), max_steps=2).fit()
    assert checkpoint.latest(str(out)) == str(out / "checkpoint-2")
    result = _child(tmp_path, "train_to_3", crash, out)  # resumes from checkpoint-2; dies saving checkpoint-3
    assert result.returncode == 9, result.stderr[-3000:]
    if crash == "rename:after":  # checkpoint-3 was in place before the kill: it is the newest
        assert checkpoint.latest(str(out)) == str(out / "checkpoint-3")
        assert crash_children.trainer(str(out), max_steps=4).fit(resume_from=str(out / "checkpoint-3"))[0]["loss"] == clean[3]["loss"]
        return
    assert checkpoint.latest(str(out)) == str(out / "checkpoint-2")
    assert not (out / "checkpoint-3").exists()  # no incomplete folder under a checkpoint's name
    partial = out / ".checkpoint-3.partial"
    if partial.exists() and not _io.is_complete(str(partial)):  # (killed just before its rename, it is whole)
        with pytest.raises((ValueError, FileNotFoundError), match="incomplete|truncated|missing|corrupted|not a fusedlm"):
            crash_children.trainer(str(out), max_steps=4).fit(resume_from=str(partial))
    resumed = crash_children.trainer(str(out), max_steps=4)
    history = resumed.fit(resume_from=checkpoint.latest(str(out)))
    assert [r["loss"] for r in history] == [r["loss"] for r in clean[2:]]  # exactly the uninterrupted losses
    assert checkpoint.latest(str(out)) == str(out / "checkpoint-4")


@pytest.mark.parametrize("crash", ["bytes:0@0.5", "swap:before", "fallback:mid"])
def test_resaving_a_checkpoint_in_place_killed_midway_keeps_it(tmp_path, crash):
    # trainer.save() over an existing checkpoint (the same step): the old one survives a crash
    out = tmp_path / "run"
    crash_children.trainer(str(out), max_steps=2).fit()
    before = _checkpoint_weights(out / "checkpoint-2")
    result = _child(tmp_path, "resave_2", crash, out)
    assert result.returncode == 9, result.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # killed mid fallback swap: read from .checkpoint-2.replaced, with a warning
        assert checkpoint.latest(str(out)) in (str(out / "checkpoint-2"), str(out / ".checkpoint-2.replaced"))
        assert _same(_checkpoint_weights(out / "checkpoint-2"), before)


def _checkpoint_weights(path) -> dict:
    t = crash_children.trainer(str(path.parent), max_steps=2)
    assert t.fit(resume_from=str(path)) == []  # nothing left to train, and nothing written again
    return _state(t.model)


# ---- SIGKILL at random moments -------------------------------------------------------------------
LOOP = textwrap.dedent(r'''
    import os, sys
    sys.path[:0] = [TESTS, os.path.join(TESTS, "training")]
    import crash_children
    getattr(crash_children, sys.argv[1])(sys.argv[2])
''').replace("TESTS", repr(TESTS))


def _kill_at_random(tmp_path, mode: str, folder, seed: int) -> None:
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, str(script), mode, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(random.Random(seed).uniform(0.05, 1.5))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_while_saving_a_model_over_and_over(tmp_path, seed):
    # the child saves models 1, 2, 1, 2, ... into the folder of model 0: whenever it dies, the folder
    # is one of them, whole
    folder = tmp_path / "model"
    hf.save_pretrained(crash_children.big_model(0), str(folder))
    _kill_at_random(tmp_path, "save_models_forever", folder, seed)
    loaded = _state(hf.from_pretrained(str(folder)))
    assert any(_same(loaded, _state(crash_children.big_model(s))) for s in (0, 1, 2))


@pytest.mark.parametrize("seed", range(2))
def test_sigkill_while_training_and_checkpointing(tmp_path, seed):
    out = tmp_path / "run"
    _kill_at_random(tmp_path, "train_forever", out, seed)
    newest = checkpoint.latest(str(out))
    if newest is None:  # killed before the first checkpoint was complete
        return
    t = crash_children.trainer(str(out), max_steps=int(newest.rsplit("-", 1)[1]) + 1)
    history = t.fit(resume_from=newest)
    assert len(history) == 1 and history[0]["loss"] is not None


def test_the_children_build_what_the_parent_checks():
    # the saves the children make differ from the parent's (else the tests above prove nothing)
    assert not _same(_state(crash_children.model(0)), _state(crash_children.model(1)))
    a, b = crash_children.adapted(0), crash_children.adapted(1)
    ids = torch.randint(3, 120, (2, 7))
    assert not torch.equal(a(ids).logits, b(ids).logits)
    assert peft.adapter_names(a) == ["default"]
