"""fusedlm.integrations.apply on peft LoRA and bitsandbytes 4-bit transformers models: patched vs
unpatched outputs (<= 1e-4) and LoRA gradients, mixed adapter batches, the report, and undo."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tiny_models import hf, hf_batch  # noqa: E402

from fusedlm import ops  # noqa: E402
from fusedlm.integrations import apply, undo  # noqa: E402

ATOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(adapters=(("default", 4, 8),), dropout=0.0, base=None, seed=0):
    """A tiny llama (or `base`) with random (non-zero) LoRA adapters (name, r, alpha) on every linear."""
    base = hf("llama") if base is None else base
    torch.manual_seed(seed)
    model = None
    for name, r, alpha in adapters:
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=ALL, init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    for pname, p in model.named_parameters():  # every adapter trainable, not just the first
        p.requires_grad_("lora_" in pname)
    return model.eval()


def _outputs_and_lora_grads(model, ids, mask, **kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    return logits.detach(), grads


def _assert_close(got, want):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def _assert_grads_close(got: dict, want: dict):
    assert got.keys() == want.keys() and want
    for name in want:
        # A LoRA gradient is a sum over every token; an element near zero can be the difference of
        # terms as large as the tensor's largest element, so its float32 rounding (which depends on
        # the kernel's summation order, per SIMD level) scales with that, not with the element.
        atol = ATOL + 1e-5 * float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_lora_single_adapter(op_calls):
    model = _lora_model()
    ids, mask = hf_batch()
    want, want_grads = _outputs_and_lora_grads(model, ids, mask)
    report = apply(model)
    assert sum(what.startswith("peft LoRA") for _, what in report.patched) == 2 * len(ALL)
    got, got_grads = _outputs_and_lora_grads(model, ids, mask)
    _assert_close(got, want)
    _assert_grads_close(got_grads, want_grads)
    assert len(op_calls["lora_linear"]) == 2 * len(ALL) and len(op_calls["attention"]) == 2


def test_lora_mixed_adapter_names(op_calls):
    """Three samples: adapter "first" (r=4), the base model, adapter "second" (r=8, another scaling)."""
    model = _lora_model(adapters=(("first", 4, 8), ("second", 8, 4)))
    ids, mask = hf_batch()
    names = ["first", "__base__", "second"]
    want, want_grads = _outputs_and_lora_grads(model, ids, mask, adapter_names=names)
    apply(model)
    got, got_grads = _outputs_and_lora_grads(model, ids, mask, adapter_names=names)
    _assert_close(got, want)
    _assert_grads_close(got_grads, want_grads)
    assert len(op_calls["lora_linear"]) == 2 * len(ALL)
    for name, module in model.named_modules():  # each used adapter got a gradient, the unused rows none
        if name.endswith("q_proj.lora_A"):
            assert module["first"].weight.grad.abs().sum() > 0 and module["second"].weight.grad.abs().sum() > 0


def test_lora_mixed_generate(op_calls):
    model = _lora_model(adapters=(("first", 4, 8), ("second", 8, 4)))
    ids, mask = hf_batch(seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, adapter_names=["second", "first", "__base__"])
    want = model.generate(ids, **kwargs)
    apply(model)
    assert torch.equal(model.generate(ids, **kwargs), want)
    assert len(op_calls["lora_linear"]) > 0


def test_lora_training_with_dropout(op_calls):
    """Dropout on the adapter input runs inside ops.lora_linear in training; eval output unchanged."""
    model = _lora_model(dropout=0.3)
    ids, mask = hf_batch()
    want = model(ids, attention_mask=mask).logits
    apply(model)
    _assert_close(model(ids, attention_mask=mask).logits, want)
    model.train()
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad.abs().sum() > 0


def test_unsupported_lora_calls_run_peft_with_a_warning(op_calls):
    model = _lora_model(adapters=(("first", 4, 8), ("second", 4, 8)))
    ids, mask = hf_batch()
    model.base_model.set_adapter(["first", "second"])  # two adapters active at once
    want = model(ids, attention_mask=mask).logits
    apply(model)
    with pytest.warns(RuntimeWarning, match="2 active adapters"):
        got = model(ids, attention_mask=mask).logits
    _assert_close(got, want)
    assert not op_calls["lora_linear"]


def test_report_and_left_alone():
    model = hf("llama")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    report = apply(model)
    left = dict(report.left_alone)
    assert "Embedding" in left["base_model.model.model.embed_tokens"]
    assert ("attention", "attn_implementation 'fusedlm' (was 'sdpa')") in report.patched
    assert "2 x peft LoRA -> ops.lora_linear" in str(report) and "left alone" in str(report)
    gpt2 = peft.get_peft_model(hf("gpt2-padded"), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    report = apply(gpt2)
    assert all("fan_in_fan_out" in why for _, why in report.left_alone)
    with pytest.raises(ValueError, match="already patched"):
        apply(gpt2)
    undo(gpt2)
    with pytest.raises(ValueError, match="not patched"):
        undo(gpt2)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apply("model")


def test_apply_then_undo_restores_the_model():
    model = _lora_model()
    ids, mask = hf_batch()
    before = model(ids, attention_mask=mask).logits
    state = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    report = apply(model)
    patched = [name for name, what in report.patched if "LoRA" in what]
    modules = dict(model.named_modules())
    assert all("forward" in modules[name].__dict__ for name in patched)
    undo(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not hasattr(model, "_fusedlm_report")
    hf = model.get_base_model()
    assert "_get_logits_processor" not in hf.__dict__ and "generate" not in hf.__dict__
    assert model.get_base_model().config._attn_implementation == "sdpa"
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, (ptr, value) in state.items():
        assert after[k].data_ptr() == ptr and torch.equal(after[k], value), k
    assert torch.equal(model(ids, attention_mask=mask).logits, before)


# ---- bitsandbytes 4-bit --------------------------------------------------------------------------
bnb = pytest.importorskip("bitsandbytes")


def _bnb_model(tmp_path, double_quant: bool):
    """A tiny 4-bit llama. Its layers keep bitsandbytes' exact path: on an avx512_bf16 CPU bitsandbytes
    otherwise repacks a layer at its first inference forward, rounding the scales to bfloat16 and
    computing at about bfloat16 precision (5e-3 off on these layers), which is no reference."""
    hf("llama-64").save_pretrained(tmp_path)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_4bit_forward_and_generate(tmp_path, double_quant, op_calls):
    model = _bnb_model(tmp_path, double_quant)
    ids, mask = hf_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    want, want_tokens = model(ids, attention_mask=mask).logits, model.generate(ids, **kwargs)
    report = apply(model)
    assert sum("Linear4bit" in what for _, what in report.patched) == 2 * len(ALL)
    _assert_close(model(ids, attention_mask=mask).logits, want)
    assert torch.equal(model.generate(ids, **kwargs), want_tokens)
    assert len(op_calls["nf4_matmul"]) > 0
    layer = model.model.layers[0].self_attn.q_proj
    qw = layer._fusedlm_qweight  # the same bytes and scales, not a copy
    assert qw.data.data_ptr() == layer.weight.data.data_ptr()
    state = layer.weight.quant_state
    if double_quant:  # decoded once to float32
        want_absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        torch.testing.assert_close(qw.absmax, want_absmax, atol=0, rtol=1e-6)
    else:
        assert qw.absmax.data_ptr() == state.absmax.data_ptr()
    undo(model)
    _assert_close(model(ids, attention_mask=mask).logits, want)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_layer_repacked_for_cpu_is_turned_back(double_quant):
    """A layer bitsandbytes already repacked for its CPU kernel: the bytes come back exactly, the
    scales as bitsandbytes' bfloat16 copies, and the patched layer computes with exactly those."""
    from fusedlm.integrations import nf4

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(128, 64).state_dict())
    layer = layer.to("cpu").eval()
    packed_bytes = layer.weight.data.clone()
    scales = bnb.functional.dequantize_blockwise(layer.weight.quant_state.absmax, layer.weight.quant_state.state2) \
        + layer.weight.quant_state.offset if double_quant else layer.weight.quant_state.absmax.clone()
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer(x)
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on avx512_bf16 CPUs")
    assert layer.weight.quant_state.packing_format_for_cpu
    nf4.patch(layer)
    assert torch.equal(layer.weight.data, packed_bytes)
    qw = layer._fusedlm_qweight
    assert not qw.double_quant and torch.equal(qw.absmax, scales.bfloat16().float())
    with torch.no_grad():
        got = layer(x)
    _assert_close(got, x @ ops.nf4_dequantize(qw).T + layer.bias)
    nf4.unpatch(layer)
    with torch.no_grad():
        layer(x)  # bitsandbytes repacks it again and runs


def test_bnb_fp4_is_left_alone():
    layer = bnb.nn.Linear4bit(64, 32, quant_type="fp4").to("cpu")
    report = apply(torch.nn.Sequential(layer))
    assert report.patched == [] and "fp4" in report.left_alone[-1][1]


def test_qlora_forward_and_grads(tmp_path, op_calls):
    model = _lora_model(base=_bnb_model(tmp_path, double_quant=True))
    ids, mask = hf_batch()
    want, want_grads = _outputs_and_lora_grads(model, ids, mask)
    apply(model)
    got, got_grads = _outputs_and_lora_grads(model, ids, mask)
    _assert_close(got, want)
    _assert_grads_close(got_grads, want_grads)
    assert len(op_calls["lora_linear"]) == 2 * len(ALL)
