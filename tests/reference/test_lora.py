"""Reference lora_linear against peft's LoraLayer and against a per-row loop."""
import pytest
import torch

from fusedlm.reference import lora as ref

peft_lora = pytest.importorskip("peft.tuners.lora")
peft = pytest.importorskip("peft")


def _peft_layer(k, n, r, alpha, bias, seed=0, names=("default",)):
    """A peft lora.Linear around nn.Linear with random (non-zero) A and B for each adapter."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(k, n, bias=bias)
    layer = peft_lora.Linear(base, names[0], peft.LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
    for name in names[1:]:
        layer.update_layer(name, r, alpha, peft.LoraConfig(r=r, lora_alpha=alpha))
    for name in names:
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.1)
        torch.nn.init.normal_(layer.lora_A[name].weight, std=0.1)
    return layer.eval()


@pytest.mark.parametrize("k,n,r,alpha", [(16, 8, 1, 1), (33, 17, 4, 8), (64, 96, 8, 16), (128, 40, 16, 32)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_single_adapter_matches_peft(k, n, r, alpha, bias, lead):
    layer = _peft_layer(k, n, r, alpha, bias)
    x = torch.randn(*lead, k)
    with torch.no_grad():
        expected = layer(x)
        got = ref.lora_linear(
            x, layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.scaling["default"], bias=layer.base_layer.bias,
        )
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_multi_adapter_matches_peft_adapter_names():
    names = ("a0", "a1", "a2")
    layer = _peft_layer(32, 24, 4, 8, True, names=names)
    x = torch.randn(7, 32)
    ids = torch.tensor([0, 2, -1, 1, 1, 0, -1])
    adapter_names = [names[i] if i >= 0 else "__base__" for i in ids.tolist()]
    lora_a = torch.stack([layer.lora_A[n].weight for n in names])
    lora_b = torch.stack([layer.lora_B[n].weight for n in names])
    with torch.no_grad():
        expected = layer(x, adapter_names=adapter_names)
        got = ref.lora_linear(x, layer.base_layer.weight, lora_a, lora_b, layer.scaling["a0"],
                              bias=layer.base_layer.bias, adapter_ids=ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gates", [None, 0.5, "tensor"])
def test_multi_adapter_equals_per_row_loop(gates):
    g = torch.Generator().manual_seed(1)
    n_adapters, m, k, n, r = 3, 9, 20, 12, 5
    x = torch.randn(m, k, generator=g)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    lora_a, lora_b = torch.randn(n_adapters, r, k, generator=g), torch.randn(n_adapters, n, r, generator=g)
    ids = torch.tensor([0, -1, 2, 2, 1, -1, 0, 1, 2])
    if gates == "tensor":
        gates = torch.tensor([0.25, 1.0, 0.0])
    got = ref.lora_linear(x, w, lora_a, lora_b, 2.0, bias=b, adapter_ids=ids, gates=gates)
    gate = lambda a: 1.0 if gates is None else float(gates) if isinstance(gates, float) else float(gates[a])  # noqa: E731
    for row in range(m):
        a = int(ids[row])
        expected = x[row] @ w.T + b
        if a >= 0:
            expected = expected + 2.0 * gate(a) * (x[row] @ lora_a[a].T) @ lora_b[a].T
        torch.testing.assert_close(got[row], expected, atol=1e-4, rtol=1e-5)


def test_dropout_mask_is_seeded_and_rescaled():
    m1 = ref.dropout_mask(64, 32, 0.25, 7, torch.device("cpu"))
    m2 = ref.dropout_mask(64, 32, 0.25, 7, torch.device("cpu"))
    assert torch.equal(m1, m2)
    assert set(m1.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert 0.6 < (m1 > 0).float().mean() < 0.9
    assert ref.dropout_mask(4, 4, 0.0, 7, torch.device("cpu")) is None


def test_dropout_applies_to_adapter_input_only():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    a, b = torch.randn(2, 8, generator=g), torch.randn(5, 2, generator=g)
    mask = ref.dropout_mask(6, 8, 0.5, 3, torch.device("cpu"))
    got = ref.lora_linear(x, w, a, b, 1.5, dropout_mask=mask)
    torch.testing.assert_close(got, x @ w.T + 1.5 * ((x * mask) @ a.T) @ b.T, atol=1e-5, rtol=1e-5)


def test_bf16_returns_bf16_and_empty_rows():
    x = torch.randn(0, 8, dtype=torch.bfloat16)
    out = ref.lora_linear(x, torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16),
                          torch.randn(4, 2, dtype=torch.bfloat16), 1.0)
    assert out.shape == (0, 4) and out.dtype == torch.bfloat16
