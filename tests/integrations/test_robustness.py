"""fusedlm.integrations under misuse: apply / undo survive copy.deepcopy (undo acts on the object it
is given), a model whose attention cannot be switched is reported as not patched, bad calls name
the problem."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")
from tiny_models import hf, hf_batch  # noqa: E402

from fusedlm.integrations import apply, undo  # noqa: E402


def _lora_model():
    base = hf("llama")
    torch.manual_seed(0)
    config = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return hf_peft.get_peft_model(base, config).eval()


def _patched_forward(layer) -> bool:
    return "forward" in vars(layer)


def test_undo_of_a_deep_copy_restores_the_copy_not_the_original(op_calls):
    # trl deep-copies the policy for its reference model: undoing the copy must leave the original patched
    model = _lora_model()
    apply(model)
    clone = copy.deepcopy(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    clone_layer = clone.base_model.model.model.layers[0].self_attn.q_proj
    assert _patched_forward(clone_layer) and vars(clone_layer)["forward"].__self__ is clone_layer  # bound to the copy
    undo(clone)
    assert not _patched_forward(clone_layer) and clone.config._attn_implementation == "sdpa"
    assert _patched_forward(layer) and model.config._attn_implementation == "fusedlm"
    ids, mask = hf_batch()
    n = len(op_calls["lora_linear"])
    model(input_ids=ids, attention_mask=mask)
    assert len(op_calls["lora_linear"]) > n  # the original still runs on fusedlm
    n = len(op_calls["lora_linear"])
    clone(input_ids=ids, attention_mask=mask)
    assert len(op_calls["lora_linear"]) == n  # the copy runs peft's own forward again
    undo(model)
    assert not _patched_forward(layer) and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="not patched"):
        undo(clone)


def test_a_deep_copy_of_a_patched_model_computes_like_it(op_calls):
    model = _lora_model()
    apply(model)
    clone = copy.deepcopy(model)
    ids, mask = hf_batch()
    torch.testing.assert_close(clone(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)


def test_undo_through_the_report_of_a_copy(op_calls):
    model = hf("llama")
    report = apply(model)
    clone = copy.deepcopy(model)
    clone._fusedlm_report.undo()
    assert clone.config._attn_implementation == "sdpa" and model.config._attn_implementation == "fusedlm"
    report.undo()
    report.undo()  # a second call does nothing
    assert model.config._attn_implementation == "sdpa"


def test_an_architecture_the_attention_interface_cannot_switch_is_not_reported_patched(op_calls):
    config = transformers.XLNetConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, d_inner=64)
    model = transformers.XLNetLMHeadModel(config).eval()
    report = apply(model)
    assert "attention" not in [name for name, _ in report.patched]
    why = dict(report.left_alone)["attention"]
    assert "XLNetLMHeadModel does not compute attention through transformers' attention interface" in why
    model(torch.randint(0, 50, (1, 6)))
    assert op_calls["attention"] == []  # and indeed ops.attention never runs
    undo(model)


@pytest.mark.parametrize("call, error, match", [
    (lambda: apply("model"), TypeError, "model must be a torch.nn.Module, got str"),
    (lambda: apply(apply_twice()), ValueError, "already patched"),
    (lambda: undo(torch.nn.Linear(2, 2)), ValueError, "not patched by fusedlm.integrations.apply"),
], ids=["not-a-module", "twice", "undo-unpatched"])
def test_bad_calls(call, error, match):
    with pytest.raises(error, match=match):
        call()


def apply_twice():
    model = hf("llama")
    apply(model)
    return model


def test_a_plain_torch_module_is_reported_left_alone():
    report = apply(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert report.patched == [] and "is not a transformers model" in dict(report.left_alone)["attention, sampling"]
