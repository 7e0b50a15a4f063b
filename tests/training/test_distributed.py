"""torch.distributed with 2 gloo processes under torchrun (see _dist_worker.py): DDP gives the
parameters of one process on the same global batch, FSDP2 trains, shards, checkpoints and
resumes, tensor-parallel generation gives the single-process tokens (also when each rank loads
only its shards from a file)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import _tiny
from _dist_worker import TRAIN
from fusedlm.training import Trainer, lm_loss

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


MODES = ("ddp", "fsdp", "tp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun of 2 processes for every mode (starting processes is most of the time)."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, ",".join(MODES), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, {m: [json.load(open(out / f"{m}-rank{r}.json")) for r in range(2)] for m in MODES}




def _saved(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def reference():
    """The same run in this process: batch_size doubled, so each micro-batch is the same global batch."""
    trainer = Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(64), **{**TRAIN, "batch_size": 2 * TRAIN["batch_size"]})
    return trainer, trainer.fit()


def test_ddp_equals_one_process_on_the_same_global_batch(runs, reference):
    out, results = runs
    ranks = results["ddp"]
    assert [r["strategy"] for r in ranks] == ["ddp", "ddp"]
    trainer, hist = reference
    assert ranks[0]["losses"] == pytest.approx([r["loss"] for r in hist], abs=1e-5)
    weights = _saved(out / "ddp" / "checkpoint-6")
    for name, p in trainer.model.state_dict().items():
        torch.testing.assert_close(weights[name], p, atol=1e-5, rtol=0, msg=name)


def test_fsdp2_shards_trains_checkpoints_and_resumes(runs, reference):
    out, results = runs
    r0 = results["fsdp"][0]
    assert r0["strategy"] == "fsdp" and r0["sharded"] and r0["local_fraction"] == pytest.approx(0.5, abs=0.02)
    assert r0["losses"][-1] < r0["losses"][0]
    checkpoint = out / "fsdp" / "checkpoint-6"
    assert {"model.safetensors", "trainer_state.pt", "dcp", "rng-0.pt", "rng-1.pt"} <= set(os.listdir(checkpoint))
    assert any(f.endswith(".distcp") for f in os.listdir(checkpoint / "dcp"))
    # the gathered weights are those of one process (FSDP averages gradients as DDP does)
    trainer, hist = reference
    assert r0["losses"] == pytest.approx([r["loss"] for r in hist], abs=1e-5)
    weights = _saved(checkpoint)
    for name, p in trainer.model.state_dict().items():
        torch.testing.assert_close(weights[name], p, atol=1e-5, rtol=0, msg=name)
    assert r0["resumed_losses"] == r0["losses"][3:]  # resumed from checkpoint-3's distributed checkpoint


def test_tensor_parallel_generation_gives_the_single_process_tokens(runs):
    ranks = runs[1]["tp"]
    for preset in ("llama-tiny", "gpt2-tiny"):
        for r in ranks:
            res = r[preset]
            assert res["greedy_equal"] and res["sampled_equal"] and res["loaded_equal"], (preset, r["rank"])
            assert res["max_logit_diff"] < 1e-5
            assert res["q_proj_local_rows"] == 64 // 2  # each rank holds half the query heads
        assert ranks[0][preset]["tokens"] == ranks[1][preset]["tokens"]
