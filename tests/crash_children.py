"""What the child processes of tests/test_crash_safety.py save, and what the test builds to check
against: the same constructors on both sides of the process boundary."""
import os

from tiny_models import fused, randomize

import _tiny
from fusedlm import peft
from fusedlm.interop import hf
from fusedlm.interop import peft as peft_files
from fusedlm.training import Trainer, lm_loss


def model(seed: int):
    return fused("llama-tiny", seed=seed)


def big_model(seed: int):
    """~10 MB of weights: a save takes long enough for a SIGKILL to land inside it."""
    return fused("llama-tiny", seed=seed, d_model=256, n_layers=4, d_ff=512)


def base():
    return fused("llama-tiny", seed=0)


def adapted(seed: int):
    """The base with a LoRA adapter of its own weights and lora_alpha (16 for seed 0, 32 for seed 1)."""
    m = base()
    peft.apply_lora(m, r=4, alpha=16 * (1 + seed), targets="all")
    randomize(m, seed=5 + seed)
    return m


def trainer(out_dir: str, max_steps: int) -> Trainer:
    """A checkpoint every step; a constant schedule, so runs of different lengths train alike."""
    return Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(64), out_dir=out_dir, max_steps=max_steps, save_every=1,
                   batch_size=4, warmup_steps=0, schedule="constant", progress=False)


def save_model(folder: str) -> None:
    hf.save_pretrained(model(1), folder)


def save_adapter(folder: str) -> None:
    peft_files.save_adapter(adapted(1), folder)


def train_to_3(folder: str) -> None:
    trainer(folder, 3).fit(resume_from=os.path.join(folder, "checkpoint-2"))


def resave_2(folder: str) -> None:
    t = trainer(folder, 2)
    t.fit(resume_from=os.path.join(folder, "checkpoint-2"))
    t.save(os.path.join(folder, "checkpoint-2"))


def save_models_forever(folder: str) -> None:
    models = [big_model(1), big_model(2)]
    print("ready", flush=True)
    i = 0
    while True:
        hf.save_pretrained(models[i % 2], folder)
        i += 1


def train_forever(folder: str) -> None:
    t = trainer(folder, 2)
    t.fit()  # checkpoint-1 and checkpoint-2 exist before the kill can come
    print("ready", flush=True)
    t.config.max_steps = 10**6
    t.fit()
