"""adapter_ids / task_ids: the forward pre-hook PEFT methods install publishes them to the layers."""

import pytest
import torch

from tiny_models import fused

from fusedlm.peft import routing


def _ids(b=3, n=7, seed=0):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def test_routing_is_visible_inside_the_forward_only():
    model = routing.install(fused("llama-tiny"))
    seen = []
    model.decoder.blocks[0].attn.q_proj.register_forward_hook(lambda *_: seen.append(routing.current_routing()))
    ids = _ids()
    with torch.no_grad():
        model(ids, adapter_ids=torch.tensor([0, -1, 1]), task_ids=torch.tensor([1, 1, 0]))
        model(ids)
    assert seen[0].adapter_ids.tolist() == [0, -1, 1] and seen[0].task_ids.tolist() == [1, 1, 0]
    assert seen[1].adapter_ids is None and seen[1].task_ids is None
    assert routing.current_routing().adapter_ids is None
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \[B\] = \[3\]"):
        model(ids, adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="task_ids must be >= -1"):
        model(ids, task_ids=torch.tensor([0, -2, 0]))
    with pytest.raises(TypeError, match="adapter_ids must be an integer tensor"):
        model(ids, adapter_ids=torch.zeros(3))
