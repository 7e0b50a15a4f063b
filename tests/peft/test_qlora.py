"""QLoRA: NF4 base layers under LoRA, gradients, bitsandbytes state dicts."""
import copy
import os

import pytest
import torch

from tiny_models import assert_close, batch, fused, randomize, run

from fusedlm import peft
from fusedlm.nn import NF4Linear
from fusedlm.peft import lora as lora_mod


@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny"])
def test_every_block_linear_is_nf4_with_lora_on_top(name):
    m = fused(name)
    dense_total = peft.trainable_parameters(m)[1]
    peft.apply_qlora(m, r=4)
    layers = lora_mod.lora_layers(m)
    assert layers and all(isinstance(layer.base_layer, NF4Linear) for _, layer in layers)
    assert all(layer.base_layer.blocksize == 64 and layer.base_layer.double_quant for _, layer in layers)
    trainable, total = peft.trainable_parameters(m)
    assert total == dense_total + trainable  # a 4-bit weight counts as its elements, as peft counts Params4bit
    assert trainable == sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)


def _dense_twin(q):
    """A copy of QLoRA model q whose base layers are nn.Linear holding the dequantised weights."""
    d = copy.deepcopy(q)
    for _, layer in lora_mod.lora_layers(d):
        nf4 = layer.base_layer
        dense = torch.nn.Linear(nf4.in_features, nf4.out_features, bias=nf4.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(nf4.dequantized_weight())
            if nf4.bias is not None:
                dense.bias.copy_(nf4.bias)
        dense.requires_grad_(False)
        layer.base_layer = dense
    return d


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=str)
def test_lora_gradients_equal_lora_on_the_dequantised_weight(name, compute_dtype):
    """Exact in float32 (compute_dtype None); with bf16 operands (the default where the CPU has bf16
    dot products) within bf16's rounding of the products' operands."""
    q = fused(name)
    q.train()
    peft.apply_qlora(q, r=4, targets="all", compute_dtype=compute_dtype)
    randomize(q)
    d = _dense_twin(q)
    ids, mask = batch()
    grads = []
    for m in (q, d):
        out = run(m, ids, mask)
        out.float().pow(2).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
        grads[-1]["out"] = out.detach()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 1
    for key in grads[0]:
        assert_close(grads[0][key], grads[1][key], rel=1e-4 if compute_dtype is None else 3e-2)


def test_auto_compute_dtype_is_bf16_where_the_cpu_has_bf16_dot_products():
    from fusedlm.ops import _gemm

    m = peft.apply_qlora(fused("llama-tiny"), r=4)
    expected = torch.bfloat16 if _gemm.native_bf16() else None
    assert all(layer.base_layer.compute_dtype == expected for _, layer in lora_mod.lora_layers(m))
    with pytest.raises(ValueError, match="compute_dtype"):
        peft.apply_qlora(fused("llama-tiny"), r=4, compute_dtype=torch.float16)


def test_merging_a_4bit_base_is_an_error():
    m = fused("llama-tiny")
    peft.apply_qlora(m, r=4)
    with pytest.raises(ValueError, match="4-bit"):
        peft.merge(m)
    assert not any(layer.merged for _, layer in lora_mod.lora_layers(m))


@pytest.mark.slow
def test_loads_a_bitsandbytes_4bit_state_dict(tmp_path):
    """The bytes bitsandbytes quantised (transformers load_in_4bit, double quantisation) load as they
    are; the forward equals the dense model holding the same dequantised weights."""
    pytest.importorskip("bitsandbytes")
    tf = pytest.importorskip("transformers")
    import bitsandbytes as bnb

    from fusedlm.interop import hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, max_position_embeddings=64)  # K >= 64: bitsandbytes' CPU layout
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path)
    quant = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu", dtype=torch.float32)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    with pytest.raises(ValueError, match="quantize the model first"):
        hf.load_bnb_state_dict(hf.from_pretrained(str(tmp_path)), state)
    ours = peft.apply_qlora(hf.from_pretrained(str(tmp_path)), r=4, compute_dtype=None)  # bnb's float32 compute
    hf.load_bnb_state_dict(ours, state)
    lin = ref.model.layers[1].mlp.down_proj
    w_bnb = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(ours.decoder.blocks[1].mlp.down_proj.base_layer.dequantized_weight(), w_bnb)
    dense = hf.from_pretrained(str(tmp_path))  # the same dequantised weights, in dense layers
    with torch.no_grad():
        for path, layer in lora_mod.lora_layers(ours):
            dense.get_submodule(path).weight.copy_(layer.base_layer.dequantized_weight())
        ids, mask = batch(n=7, vocab=97)
        assert_close(ours(ids, attention_mask=mask).logits, dense(ids, attention_mask=mask).logits, rel=1e-5)
