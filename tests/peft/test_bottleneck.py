"""Pfeiffer and Houlsby bottleneck adapters, placed as the `adapters` library places them."""

import pytest
import torch

from tiny_models import assert_close, batch, fused, randomize, run

from fusedlm import peft
from fusedlm.peft.bottleneck import BottleneckAdapter

PRESETS = ("llama-tiny", "gpt2-tiny", "t5-tiny", "bert-tiny")
ALL = PRESETS + ("bart-tiny",)  # pre-norm: llama, gpt2, t5; post-norm: bert, bart


@pytest.mark.parametrize("kind", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("name", PRESETS)
def test_identity_at_init_and_gradients(kind, name):
    m = fused(name)
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
    randomize(m, "adapter.up")  # up starts at zero: without this down would get no gradient
    run(m, ids, mask).pow(2).mean().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {n for n, p in m.named_parameters() if p.requires_grad} == {n for n, _ in m.named_parameters() if ".adapter." in n}


def _library_sublayer(h, x, norm, adapter, ln_before):
    """The `adapters` library's Adapter.pre_forward / forward / post_forward with residual_before_ln=True,
    adapter_residual_before_ln=False, original_ln_after=True, no adapter norms, scaling 1; `norm` is the
    model's norm of the sublayer for a post-norm model (BERT passes its LayerNorm) and None pre-norm."""
    residual = h
    if ln_before:  # original_ln_before: the adapter reads the added (and normed) stream
        h = h + x
        h = norm(h) if norm is not None else h
    out = adapter.up(adapter.act(adapter.down(h))) + residual
    return norm(out + x) if norm is not None else out + x


def _library_block(block, kind, x, *, memory=None, memory_padding_mask=None, **self_args):
    """One block as the library computes it: Houlsby adapts attention and FFN, Pfeiffer the FFN."""
    subs = [("attn", block.attn_norm, lambda y: block.attn(y, **self_args))]
    if memory is not None:
        subs.append(("cross_attn", block.cross_norm, lambda y: block.cross_attn(
            y, attn_mode="bidirectional", key_padding_mask=memory_padding_mask, cache=self_args["cache"], memory=memory)))
    subs.append(("mlp", block.mlp_norm, block.mlp))
    for name, norm, f in subs:
        h = f(norm(x)) if block.pre_norm else f(x)
        if name == "mlp" or (kind == "houlsby" and name == "attn"):
            x = _library_sublayer(h, x, None if block.pre_norm else norm, getattr(block, name).adapter, kind == "pfeiffer")
        else:
            x = x + h if block.pre_norm else norm(x + h)
    return x


@pytest.mark.parametrize("kind", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_every_block_computes_what_the_adapters_library_computes(kind, name):
    m = fused(name)
    peft.apply_adapters(m, kind=kind)
    randomize(m, ".adapter.", std=0.2)
    blocks = [mod for path, mod in m.named_modules() if path.rsplit(".", 2)[-2:-1] == ["blocks"]]
    seen = []  # (block, its inputs, its output) of the adapted forward
    hooks = [b.register_forward_hook(lambda mod, args, kwargs, out: seen.append((mod, args, kwargs, out)), with_kwargs=True)
             for b in blocks]
    ids, mask = batch()
    adapted = run(m, ids, mask)
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks)
    with peft.disable(m):  # the model's own sublayers, no hook acting: the library's formula by hand
        assert not torch.allclose(run(m, ids, mask), adapted, atol=1e-3)
        for block, args, kwargs, out in seen:
            assert_close(_library_block(block, kind, *args, **kwargs), out)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        peft.apply_adapters(fused("llama-tiny"), kind="lora")
    with pytest.raises(ValueError, match="reduction"):
        peft.apply_adapters(fused("llama-tiny"), reduction=0)
    with pytest.raises(ValueError, match="activation"):
        peft.apply_adapters(fused("llama-tiny"), activation="softplus")
    m = peft.apply_adapters(fused("llama-tiny"))
    with pytest.raises(ValueError, match="already"):
        peft.apply_adapters(m, kind="houlsby")
    with pytest.raises(ValueError, match="no transformer blocks"):
        peft.apply_adapters(torch.nn.Linear(2, 2))
