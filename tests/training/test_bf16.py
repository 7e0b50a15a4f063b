"""bf16 as a training mode: autocast with fp32 master weights and AdamW state tracks the fp32 loss
curve, step by step, at every SIMD level of the cpu kernels (full training and LoRA on all seven
targets, whose base + adapter GEMM takes bf16 operands under autocast); TrainConfig.bf16="auto"."""
import pytest
import torch

import _tiny
from fusedlm import peft
from fusedlm.ops import _gemm
from fusedlm.training import TrainConfig, Trainer, lm_loss

STEPS = 40


def _curve(make, lr, bf16):
    model = make()
    trainer = Trainer(model, lm_loss, _tiny.clm_rows(256), max_steps=STEPS, batch_size=8, lr=lr, warmup_steps=3,
                      bf16=bf16, progress=False, seed=0)
    hist = trainer.fit()
    return trainer, [r["loss"] for r in hist]


# kind -> (model, learning rate, the most the mean loss of the last 5 steps may be of the first 5's:
# a random-init base under LoRA (B = 0 at the start) learns slower than full training)
MODELS = {
    "full": (lambda: _tiny.model(seed=0), 3e-3, 0.7),
    "lora all 7": (lambda: peft.apply_lora(_tiny.model(seed=0), r=8, alpha=16, targets="all"), 1e-2, 0.9),
}
REL_BOUND = 0.01  # per step |loss_bf16 - loss_fp32| / loss_fp32 (measured: < 5e-4 at every SIMD level)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_bf16_loss_curve_tracks_fp32(cpu_isa, kind):
    make, lr, drop = MODELS[kind]
    _, fp32 = _curve(make, lr, False)
    trainer, bf16 = _curve(make, lr, True)
    assert len(fp32) == len(bf16) == STEPS
    rel = [abs(a - b) / a for a, b in zip(fp32, bf16)]
    assert max(rel) < REL_BOUND, (max(rel), rel.index(max(rel)))
    assert max(rel) > 0  # the bf16 run did round: autocast was on
    for curve in (fp32, bf16):  # both learn (first vs last 5 steps)
        assert sum(curve[-5:]) < drop * sum(curve[:5])
    # master weights, their gradients and the AdamW state stay float32
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert all(t.dtype == torch.float32 for st in trainer.optimizer.state.values() for k, t in st.items() if k != "step")



def test_bf16_auto_follows_the_cpu_kernels(cpu_isa):
    trainer = Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(8), max_steps=1, bf16="auto", progress=False)
    assert trainer.bf16 == (cpu_isa == "avx512_bf16") == _gemm.native_bf16()
    assert Trainer(_tiny.model(), lm_loss, _tiny.clm_rows(8), max_steps=1, progress=False).bf16 is False  # fp32 default


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bf16_rejects_other_values(bad):
    with pytest.raises(ValueError, match="TrainConfig.bf16"):
        TrainConfig(bf16=bad)
