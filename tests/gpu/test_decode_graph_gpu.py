"""One decode step on a CUDA device — the model over one new token per row with its KV cache,
then ``ops.sample`` — without a host sync, and captured once in a CUDA graph whose replays walk
the cache as eager steps do (issue 23, Deliver 4).

The decode loop without per-token host syncs (ids min/max, ``key_mask.all()``, sampling checks,
``seed.item()``) is being written under issue 21 (generation/). Until it lands these tests are
expected to fail, and are marked so (strict=False: they pass once it is in, and then the mark goes).
Skipped without CUDA (tests/gpu/conftest.py).
"""
import pytest
import torch

from fusedlm import ops
from fusedlm.generation.step import ModelStep
from fusedlm.models import build, get_config

PENDING = pytest.mark.xfail(strict=False, reason="decode step without host syncs: issue 21 (generation/), "
                                                 "not on main when this test was written")


def _step(backend_seed=0, batch=2, prompt=8, new=16):
    torch.manual_seed(backend_seed)
    model = build(get_config("llama-tiny")).to("cuda").eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(3, 100, (batch, prompt), device="cuda", generator=g)
    step = ModelStep(model, ids, torch.ones_like(ids), new, {})
    logits, _ = step.prefill()
    return step, logits


def _sample(logits, generator):
    return ops.sample(logits, temperature=0.8, top_k=20, top_p=0.9, generator=generator)[:, None]


@PENDING
def test_decode_step_makes_no_host_sync():
    step, logits = _step()
    g = torch.Generator(device="cuda").manual_seed(2)
    tokens = _sample(logits, g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for _ in range(3):
            logits, _ = step(tokens)
            tokens = _sample(logits, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert tokens.shape == (2, 1)


@PENDING
def test_decode_step_replays_from_a_cuda_graph():
    eager, logits = _step()
    graphed, _ = _step()
    tokens = logits.argmax(-1, keepdim=True)
    static_tokens = tokens.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (compiles the kernels)
        graphed(static_tokens)
    torch.cuda.current_stream().wait_stream(side)
    graphed, _ = _step()  # a fresh cache: the warm-up step advanced the first one
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits, _ = graphed(static_tokens)
    for _ in range(4):
        want, _ = eager(tokens)
        static_tokens.copy_(tokens)
        graph.replay()
        torch.testing.assert_close(static_logits, want, rtol=1e-4, atol=1e-4)
        tokens = want.argmax(-1, keepdim=True)
