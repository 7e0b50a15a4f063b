"""fusedlm.peft under bad input: every hyper-parameter range-checked with its name, and the state of
a model with several adapters or methods stays consistent (no adapter runs that should not)."""
import warnings

import pytest
import torch
from tiny_models import fused, randomize

from fusedlm import peft

V = 128


def _ids():
    return torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(0))


BAD = [  # (call on a fresh llama-tiny, error, message naming the argument)
    (lambda m: peft.apply_lora(m, alpha=float("nan")), ValueError, "alpha must be a finite number, got nan"),
    (lambda m: peft.apply_lora(m, alpha=float("inf")), ValueError, "alpha must be a finite number, got inf"),
    (lambda m: peft.apply_lora(m, alpha=0), ValueError, "alpha must be > 0"),
    (lambda m: peft.apply_lora(m, alpha=-2), ValueError, "alpha must be > 0"),
    (lambda m: peft.apply_lora(m, alpha="16"), TypeError, "alpha must be a number"),
    (lambda m: peft.apply_lora(m, r=0), ValueError, "r must be > 0"),
    (lambda m: peft.apply_lora(m, r=-3), ValueError, "r must be > 0"),
    (lambda m: peft.apply_lora(m, r=2.5), TypeError, "r must be an int"),
    (lambda m: peft.apply_lora(m, r=True), TypeError, "r must be an int"),
    (lambda m: peft.apply_lora(m, dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
    (lambda m: peft.apply_lora(m, dropout=-0.1), ValueError, r"dropout must be in \[0, 1\)"),
    (lambda m: peft.apply_lora(m, dropout=float("nan")), ValueError, "dropout must be a finite number"),
    (lambda m: peft.apply_lora(m, name="a.b"), ValueError, "name must be a non-empty string without dots"),
    (lambda m: peft.apply_lora(m, name=""), ValueError, "name must be a non-empty string"),
    (lambda m: peft.apply_lora(m, targets=("q", "nope")), ValueError, r"unknown target name\(s\) \['nope'\]"),
    (lambda m: peft.apply_lora(m, targets=()), ValueError, "targets must name at least one"),
    (lambda m: peft.apply_lora(m, targets=3), TypeError, "targets must be 'all' or names"),
    (lambda m: peft.apply_lora(peft.apply_lora(m), name="default"), ValueError, "an adapter named 'default' already exists"),
    (lambda m: peft.apply_qlora(m, blocksize=0), ValueError, "blocksize"),
    (lambda m: peft.apply_prompt_tuning(m, n_virtual_tokens=0), ValueError, "n_virtual_tokens must be > 0"),
    (lambda m: peft.apply_prompt_tuning(m, n_virtual_tokens=2, init_token_ids=[10**6]), ValueError,
     r"init_token_ids must be ids of the vocabulary, in \[0, 128\), got 1000000"),
    (lambda m: peft.apply_prompt_tuning(m, n_virtual_tokens=2, init_token_ids=[-1]), ValueError,
     "init_token_ids must be a list of token ids"),
    (lambda m: peft.apply_prompt_tuning(m, n_virtual_tokens=2, init_token_ids=[1.5]), ValueError,
     "init_token_ids must be a list of token ids"),
    (lambda m: peft.apply_prompt_tuning(m, n_virtual_tokens=2, init_token_ids=[]), ValueError, "at least one token id"),
    (lambda m: peft.apply_prompt_tuning(m, n_virtual_tokens=2, init_token_ids=torch.tensor([V])), ValueError,
     r"init_token_ids must be ids of the vocabulary"),
    (lambda m: peft.apply_p_tuning(m, n_virtual_tokens=2, encoder="GRU"), ValueError, "encoder must be 'MLP' or 'LSTM'"),
    (lambda m: peft.apply_p_tuning(m, n_virtual_tokens=2, hidden_size=0), ValueError, "hidden_size must be > 0"),
    (lambda m: peft.apply_prefix_tuning(m, n_virtual_tokens=-1), ValueError, "n_virtual_tokens must be > 0"),
    (lambda m: peft.apply_prefix_tuning(m, n_virtual_tokens=2, hidden_size=0), ValueError, "hidden_size must be > 0"),
    (lambda m: peft.apply_adapters(m, reduction=0), ValueError, "reduction must be > 0"),
    (lambda m: peft.apply_adapters(m, kind="lora"), ValueError, "kind must be one of"),
    (lambda m: peft.apply_adapters(m, activation="softmax"), ValueError, "activation must be one of"),
    (lambda m: peft.apply_adaptplora(m, n_tasks=0), ValueError, "n_tasks"),
    (lambda m: peft.set_adapter(peft.apply_lora(m), "nope"), ValueError, r"no adapter named 'nope'; adapters: \['default'\]"),
    (lambda m: peft.merge(peft.apply_lora(m), "nope"), ValueError, "no adapter named 'nope'"),
    (lambda m: peft.merge(m), ValueError, "has no LoRA adapter"),
    (lambda m: peft.merge(peft.apply_qlora(m)), ValueError, "cannot merge a LoRA adapter into a 4-bit"),
    (lambda m: peft.disable(m).__enter__(), ValueError, "has no PEFT method applied"),
    (lambda m: peft.apply_lora(m)(_ids(), adapter_ids=torch.tensor([0, 3])), ValueError, r"adapter_ids must lie in \[-1, 1\)"),
    (lambda m: peft.apply_lora(m)(_ids(), adapter_ids=torch.tensor([0.0, 1.0])), TypeError, "adapter_ids must be an integer tensor"),
    (lambda m: peft.apply_lora(m)(_ids(), adapter_ids=torch.tensor([0])), ValueError, r"adapter_ids must have shape \[B\] = \[2\]"),
]


@pytest.mark.parametrize("call, error, match", BAD, ids=[f"{i}-{m[:20]}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_arguments_name_themselves(call, error, match):
    with pytest.raises(error, match=match):
        call(fused("llama-tiny"))


def test_a_failed_apply_changes_nothing():
    m = fused("llama-tiny")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError):
        peft.apply_lora(m, alpha=float("nan"))
    assert peft.methods(m) == [] and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_set_adapter_on_a_merged_model_unmerges_first():
    # peft's rule ("Adapter cannot be set when the model is merged. Unmerging the model first."): merge
    # "a", switch to "b", and the model runs base + b, not base + a + b
    m = fused("llama-tiny")
    peft.apply_lora(m, name="a", targets="all")
    peft.apply_lora(m, name="b", targets="all")
    randomize(m)
    peft.set_adapter(m, "b")
    want = m(_ids()).logits  # base + b
    peft.set_adapter(m, "a")
    peft.merge(m)
    with pytest.warns(UserWarning, match=r"adapter\(s\) \['a'\] are merged into the base weights: unmerging them"):
        peft.set_adapter(m, "b")
    assert not any(layer.merged for _, layer in peft.lora.lora_layers(m))
    torch.testing.assert_close(m(_ids()).logits, want, atol=1e-5, rtol=1e-5)


def test_set_adapter_without_merged_adapters_does_not_warn():
    m = fused("llama-tiny")
    peft.apply_lora(m, name="a")
    peft.apply_lora(m, name="b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.set_adapter(m, "b")


def test_a_lora_scale_from_a_file_must_be_finite():
    m = fused("llama-tiny")
    peft.apply_lora(m)
    layer = m.decoder.blocks[0].attn.q_proj
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        layer.set_weights("x", torch.zeros(2, 64), torch.zeros(64, 2), float("inf"))


def test_methods_and_active_methods():
    m = fused("llama-tiny")
    assert peft.methods(m) == [] and peft.active_methods(m) == []
    peft.apply_lora(m)
    assert peft.active_methods(m) == ["lora"]
    peft.merge(m)
    assert peft.methods(m) == ["lora"] and peft.active_methods(m) == []
    peft.unmerge(m)
    pm = peft.apply_prefix_tuning(m, n_virtual_tokens=2)
    assert peft.methods(pm) == ["prefix_tuning", "lora"] == peft.active_methods(pm)
    with peft.disable(pm):
        assert peft.active_methods(pm) == []
    mb = peft.apply_adapters(fused("llama-tiny"))
    assert peft.methods(mb) == ["bottleneck"]
    assert peft.methods(peft.apply_adaptplora(fused("llama-tiny"), n_tasks=2)) == ["adaptplora"]
