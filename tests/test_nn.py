"""fusedlm.NF4Linear: construction, forward, bitsandbytes interop, state dicts."""
import io

import pytest
import torch

import fusedlm
from fusedlm import ops
from fusedlm.reference import nf4 as ref

bnb = pytest.importorskip("bitsandbytes")


def _linear(in_features=64, out_features=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_forward_equals_reference(double_quant, bias):
    lin = _linear(bias=bias)
    layer = fusedlm.NF4Linear.from_linear(lin, blocksize=32, double_quant=double_quant)
    x = torch.randn(3, 5, 64)
    qw = ops.nf4_quantize(lin.weight.detach(), blocksize=32, double_quant=double_quant)
    expected = ref.matmul(x.reshape(-1, 64), qw.data, qw.float_absmax(), 32, (24, 64), lin.bias).view(3, 5, 24)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(layer.weight, qw.data) and layer.double_quant == double_quant
    # close to the float layer (NF4 error)
    assert (layer(x) - lin(x)).norm() / lin(x).norm() < 0.15


def test_grads_reach_x_and_bias_only():
    layer = fusedlm.NF4Linear.from_linear(_linear())
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.bias.grad is not None
    assert [name for name, p in layer.named_parameters()] == ["bias"]


def test_extra_repr():
    layer = fusedlm.NF4Linear.from_linear(_linear(), blocksize=128, double_quant=True)
    assert repr(layer) == (
        "NF4Linear(in_features=64, out_features=24, bias=True, blocksize=128, double_quant=True, weight_dtype=float32)"
    )


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip(double_quant):
    layer = fusedlm.NF4Linear.from_linear(_linear(), blocksize=64, double_quant=double_quant)
    sd = layer.state_dict()
    keys = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        keys |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == keys
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    fresh = fusedlm.NF4Linear(64, 24, blocksize=32)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.blocksize == 64 and fresh.double_quant == double_quant
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), layer(x))


def test_load_rejects_a_wrong_shape_and_missing_keys():
    sd = fusedlm.NF4Linear.from_linear(_linear(out_features=16)).state_dict()
    with pytest.raises(RuntimeError, match=r"weight shape \[16, 64\] does not match \[24, 64\]"):
        fusedlm.NF4Linear(64, 24).load_state_dict(sd)
    del sd["weight.absmax"]
    with pytest.raises(RuntimeError, match="Missing key"):
        fusedlm.NF4Linear(64, 16).load_state_dict(sd)


def _bnb_layer(lin, double_quant):
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4")  # blocksize 64
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")  # quantises


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_converted_both_ways_gives_the_same_outputs(double_quant):
    lin = _linear(in_features=128, out_features=48)
    layer4 = _bnb_layer(lin, double_quant)
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = layer4(x)
    ours = fusedlm.NF4Linear.from_bnb(layer4)
    assert ours.double_quant == double_quant
    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
    back = ours.to_bnb()
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(back.weight.data.view(torch.uint8), ours.weight)


def test_state_dict_loads_into_bitsandbytes_and_back():
    lin = _linear(in_features=128, out_features=48)
    ours = fusedlm.NF4Linear.from_linear(lin, blocksize=64)
    layer4 = _bnb_layer(lin, False)
    # our bytes equal what bitsandbytes made from the same float weight, and its state dict ours
    sd_bnb = layer4.state_dict()
    for key, value in ours.state_dict().items():
        if key != "weight.quant_state.bitsandbytes__nf4":
            assert torch.equal(value, sd_bnb[key]), key
    fresh = fusedlm.NF4Linear(128, 48)
    fresh.load_state_dict(sd_bnb)
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), ours(x))


def test_nf4linear_keeps_one_weight_object_and_its_tiles():
    # what the NF4Weight derives once (CPU tiles, float32 absmax) must survive between forwards,
    # and go when the buffers change
    layer = fusedlm.NF4Linear.from_linear(torch.nn.Linear(64, 40), double_quant=True)
    x = torch.randn(3, 64)
    y = layer(x)
    qw = layer.qweight
    assert layer.qweight is qw and qw.cpu_tiles() is qw.cpu_tiles() and qw.float_absmax() is qw.float_absmax()
    other = fusedlm.NF4Linear.from_linear(torch.nn.Linear(64, 40), double_quant=True)
    layer.load_state_dict(other.state_dict())  # in place: same tensors, new contents
    torch.testing.assert_close(layer(x), other(x))
    assert not torch.equal(layer(x), y)
    layer.weight = other.weight.clone()  # another tensor
    assert layer.qweight is not qw
