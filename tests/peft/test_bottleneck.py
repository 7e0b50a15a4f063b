"""Pfeiffer and Houlsby bottleneck adapters."""
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _util import PRESETS, assert_close, batch, model, randomize, run  # noqa: E402

from fusedlm import peft  # noqa: E402
from fusedlm.peft.bottleneck import BottleneckAdapter  # noqa: E402


@pytest.mark.parametrize("kind", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("name", PRESETS)
def test_identity_at_init_and_gradients(kind, name):
    m = model(name)
    ids, mask = batch()
    with torch.no_grad():
        base = run(m, ids, mask)
    peft.apply_adapters(m, kind=kind)
    with torch.no_grad():
        assert torch.equal(run(m, ids, mask), base)
    adapters = [mod for mod in m.modules() if isinstance(mod, BottleneckAdapter)]
    n_blocks = m.config.n_layers + (m.config.n_decoder_layers if m.config.arch == "encoder-decoder" else 0)
    assert len(adapters) == n_blocks * (2 if kind == "houlsby" else 1)
    d = m.config.d_model
    assert peft.trainable_parameters(m)[0] == len(adapters) * (2 * d * (d // 16) + d // 16 + d)  # reduction 16
    m.train()
    run(m, ids, mask).pow(2).mean().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in m.named_parameters() if p.requires_grad} == {n for n, _ in m.named_parameters() if ".adapter." in n}


@torch.no_grad()
def test_adapter_acts_on_the_sublayer_output_before_the_residual():
    m = model("llama-tiny")
    peft.apply_adapters(m, kind="houlsby")
    randomize(m, ".adapter.", std=0.2)
    mlp = m.decoder.blocks[0].mlp
    x = torch.randn(2, 5, 64)
    h = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    a = mlp.adapter
    assert_close(mlp(x), h + a.up(torch.nn.functional.silu(a.down(h))))


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        peft.apply_adapters(model("llama-tiny"), kind="lora")
    with pytest.raises(ValueError, match="reduction"):
        peft.apply_adapters(model("llama-tiny"), reduction=0)
    m = peft.apply_adapters(model("llama-tiny"))
    with pytest.raises(ValueError, match="already"):
        peft.apply_adapters(m)
