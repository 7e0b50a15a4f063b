"""LoRA on fusedlm models: init, mixed batches, merge, gradients, counts and bad inputs."""
import contextlib
import io

import pytest
import torch

from tiny_models import assert_close, batch, fused, randomize, run

from fusedlm import ops, peft
from fusedlm.models import build, get_config
from fusedlm.peft import lora as lora_mod

PRESETS = ("llama-tiny", "gpt2-tiny", "t5-tiny", "bert-tiny")


@pytest.mark.parametrize("name", PRESETS)
@torch.no_grad()
def test_init_leaves_the_model_unchanged(name):
    m = fused(name)
    ids, mask = batch()
    base = run(m, ids, mask)
    peft.apply_lora(m, r=4, targets="all")
    assert torch.equal(run(m, ids, mask), base)


@pytest.mark.parametrize("name", PRESETS)
def test_targets_all_wraps_every_block_linear_never_the_head(name):
    m = fused(name)
    n_linear = sum(isinstance(mod, torch.nn.Linear) and ".blocks." in f".{path}" for path, mod in m.named_modules())
    peft.apply_lora(m, r=2, targets="all")
    layers = lora_mod.lora_layers(m)
    assert len(layers) == n_linear
    assert all(".blocks." in f".{path}" for path, _ in layers)
    if m.config.arch == "encoder-decoder":  # cross-attention counts as attention
        assert any(".cross_attn." in path for path, _ in layers)


def test_peft_init_and_scaling():
    m = fused("llama-tiny")
    peft.apply_lora(m, r=4, alpha=12, targets=("q",))
    peft.apply_lora(m, r=4, alpha=12, targets=("q",), rslora=True, name="rs")
    layer = m.decoder.blocks[0].attn.q_proj
    assert layer.scaling == {"default": 3.0, "rs": 6.0}
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(64, 4))
    bound = 1 / 64**0.5  # kaiming-uniform with a = sqrt(5) on fan_in 64
    a = layer.lora_A["default"].weight
    assert a.abs().max() <= bound and a.std() > bound / 3


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "t5-tiny"])
@torch.no_grad()
def test_forward_is_the_lora_formula(name):
    m = fused(name)
    ids, mask = batch()
    peft.apply_lora(m, r=3, alpha=7, targets=("q", "v", "down"))
    randomize(m)
    ours = run(m, ids, mask)
    for _, layer in lora_mod.lora_layers(m):  # the same weights merged by hand into a plain model
        layer.base_layer.weight += layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    with peft.disable(m):
        assert_close(run(m, ids, mask), ours)


def _two_adapter_model(name="llama-tiny"):
    """Adapters of different ranks and targets: 0 on all (r=4), 1 on q/v (r=2), 2 on down (r=6)."""
    m = fused(name)
    peft.apply_lora(m, r=4, alpha=8, targets="all")
    peft.apply_lora(m, r=2, alpha=3, targets=("q", "v"), name="qv")
    peft.apply_lora(m, r=6, alpha=6, targets=("down",), name="down", rslora=True)
    randomize(m)
    return m


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "t5-tiny"])
@torch.no_grad()
def test_mixed_batch_equals_each_sequence_with_its_adapter(name):
    m = _two_adapter_model(name)
    assert peft.adapter_names(m) == ["default", "qv", "down"]
    ids, mask = batch(b=5)
    adapter_ids = torch.tensor([0, 1, -1, 2, 1])
    mixed = run(m, ids, mask, adapter_ids=adapter_ids)
    for row, a in enumerate(adapter_ids.tolist()):
        if a == -1:
            with peft.disable(m):
                alone = run(m, ids[row:row + 1], mask[row:row + 1])
        else:
            peft.set_adapter(m, peft.adapter_names(m)[a])
            alone = run(m, ids[row:row + 1], mask[row:row + 1])
        assert_close(mixed[row:row + 1], alone)  # batch-size rounding only


def test_mixed_batch_is_one_kernel_call_per_layer(monkeypatch):
    m = _two_adapter_model()
    calls = []
    real = ops.lora_linear

    def counting(x, *args, **kw):
        calls.append(kw.get("adapter_ids"))
        return real(x, *args, **kw)

    monkeypatch.setattr(lora_mod.ops, "lora_linear", counting)
    ids, mask = batch(b=4)
    with torch.no_grad():
        m(ids, attention_mask=mask, adapter_ids=torch.tensor([0, 1, 2, -1]))
    assert len(calls) == len(lora_mod.lora_layers(m))  # one per adapted layer, whole batch
    assert all(ids_ is not None and ids_.shape == (4 * 9,) for ids_ in calls)


def test_mixed_batch_gradients_equal_each_sequence_alone():
    m = _two_adapter_model()  # every adapter's weights are trainable (apply_lora makes them so)
    ids, mask = batch(b=3)
    adapter_ids = torch.tensor([0, 1, 2])
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == sum(2 * len(layer.lora_A) for _, layer in lora_mod.lora_layers(m))
    mixed = torch.autograd.grad(run(m, ids, mask, adapter_ids=adapter_ids).pow(2).sum(), params, allow_unused=True)
    alone = [torch.zeros_like(p) for p in params]
    for row in range(3):
        g = torch.autograd.grad(run(m, ids[row:row + 1], mask[row:row + 1], adapter_ids=adapter_ids[row:row + 1]).pow(2).sum(),
                                params, allow_unused=True)
        alone = [t if gi is None else t + gi for t, gi in zip(alone, g)]
    for gm, ga in zip(mixed, alone):  # fp32 rounding of different batch shapes
        assert_close(torch.zeros_like(ga) if gm is None else gm, ga)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "t5-tiny"])
@torch.no_grad()
def test_merge_equals_unmerged_and_unmerge_restores(name):
    m = fused(name)
    ids, mask = batch()
    base_w = m.get_submodule("decoder.blocks.0.attn.q_proj").weight.clone()
    peft.apply_lora(m, r=4, targets="all")
    randomize(m)
    unmerged = run(m, ids, mask)
    peft.merge(m)
    assert_close(run(m, ids, mask), unmerged)
    with pytest.raises(ValueError, match="unmerge"):
        run(m, ids, mask, adapter_ids=torch.zeros(3, dtype=torch.long))
    peft.unmerge(m)
    torch.testing.assert_close(m.get_submodule("decoder.blocks.0.attn.q_proj").base_layer.weight, base_w, atol=1e-6, rtol=0)
    assert_close(run(m, ids, mask), unmerged)


@pytest.mark.parametrize("name", PRESETS)
def test_gradients_reach_exactly_the_trainable_parameters(name):
    m = fused(name)
    m.train()
    peft.apply_lora(m, r=4, targets="all", dropout=0.1)
    randomize(m, "lora_B")
    ids, mask = batch()
    run(m, ids, mask).float().pow(2).mean().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable == {n for n, _ in m.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if p.grad is not None)


def test_dropout_is_peft_dropout_on_the_adapter_input():
    m = fused("llama-tiny")
    peft.apply_lora(m, r=4, targets=("q",), dropout=0.5)
    randomize(m)
    ids, mask = batch()
    with torch.no_grad():
        eval_out = run(m, ids, mask)
        m.train()
        torch.manual_seed(0)
        a = run(m, ids, mask)
        torch.manual_seed(0)
        b = run(m, ids, mask)
    assert torch.equal(a, b) and not torch.allclose(a, eval_out)  # seeded, and active in training only


def test_set_adapter_and_disable():
    m = _two_adapter_model()
    ids, mask = batch()
    with torch.no_grad():
        with peft.disable(m):
            base = run(m, ids, mask)
        first = run(m, ids, mask)
        peft.set_adapter(m, "qv")
        second = run(m, ids, mask)
    assert not torch.allclose(first, second) and not torch.allclose(base, second)
    assert all(p.requires_grad == (".qv." in n) for n, p in m.named_parameters() if "lora_" in n)


def test_full_fine_tuning_is_the_default():
    m = fused("llama-tiny")
    trainable, total = peft.trainable_parameters(m)
    assert trainable == total == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "t5-tiny", "bert-tiny", "qwen2-tiny", "bart-tiny"])
@pytest.mark.parametrize("targets", ["all", ("q", "v"), ("o", "up", "down")])
def test_count_lora_parameters_equals_the_built_model(name, targets):
    cfg = get_config(name)
    with torch.device("meta"):
        m = build(cfg)
    peft.apply_lora(m, r=3, targets=targets)
    assert peft.count_lora_parameters(cfg, r=3, targets=targets) == peft.trainable_parameters(m)[0]


def test_count_lora_parameters_llama_7b():
    cfg = get_config("llama-7b")
    n = peft.count_lora_parameters(cfg, r=8, targets=("q", "k", "v", "o", "gate", "up", "down"))
    assert n == 19_988_480
    assert f"{100 * n / 6_738_415_616:.3f}" == "0.297"


def test_report_is_peft_format():
    pytest.importorskip("peft")
    import peft as hf_peft
    import transformers as tf

    hf_model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=48))
    pm = hf_peft.get_peft_model(hf_model, hf_peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = pm.get_nb_trainable_parameters()
    ours = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pm.print_trainable_parameters()
    assert out.getvalue().strip() == ours
    m = fused("llama-tiny")
    peft.apply_lora(m, r=4, targets=("q", "v"))
    t, a = peft.trainable_parameters(m)
    assert peft.report(m) == f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(targets=("q", "query")), ValueError, "unknown target"),
    (dict(targets=("gate",)), ValueError, "match no linear"),  # GPT-2's MLP is not gated
    (dict(targets=()), ValueError, "at least one"),
    (dict(r=0), ValueError, "r must be > 0"),
    (dict(r=-2), ValueError, "r must be > 0"),
    (dict(r=2.5), TypeError, "r must be an int"),
    (dict(alpha=0), ValueError, "alpha"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(name="a.b"), ValueError, "name"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        peft.apply_lora(fused("gpt2-tiny"), **kwargs)


def test_bad_adapter_ids_and_names():
    m = _two_adapter_model()
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\)"):
        m(ids, adapter_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="adapter_ids must be >= -1|adapter_ids must lie"):
        m(ids, adapter_ids=torch.tensor([0, -2, 1]))
    with pytest.raises(ValueError, match="shape"):
        m(ids, adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="already exists"):
        peft.apply_lora(m, name="qv")
    with pytest.raises(ValueError, match="no adapter named"):
        peft.set_adapter(m, "nope")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        peft.merge(fused("llama-tiny"))
    m.train()
    with pytest.raises(ValueError, match="share their dropout"):
        lora_mod.lora_layers(m)[0][1].dropout["qv"] = 0.3
        m(ids, adapter_ids=torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("method", ["lora", "qv+prompt", "prefix", "adaptplora", "houlsby"])
@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny"])
@torch.no_grad()
def test_disable_gives_the_base_model_for_every_method(method, name):
    m = fused(name)
    ids, mask = batch()
    base = run(m, ids, mask)
    kw = {}
    if method == "lora":
        pm = peft.apply_lora(m, r=4, targets="all")
    elif method == "qv+prompt":
        pm = peft.apply_prompt_tuning(peft.apply_lora(m, r=4), n_virtual_tokens=3)
    elif method == "prefix":
        pm = peft.apply_prefix_tuning(m, n_virtual_tokens=3)
    elif method == "adaptplora":
        pm, kw = peft.apply_adaptplora(m, n_tasks=2, n_prompt_tokens=3), {"task_ids": torch.tensor([0, 1, 1])}
    else:
        pm = peft.apply_adapters(m, kind="houlsby")
    randomize(pm, std=0.3)
    randomize(pm, "adapter.up", std=0.3)
    assert not torch.allclose(run(pm, ids, mask, **kw), base, atol=1e-3)
    with peft.disable(pm):
        assert_close(run(pm, ids, mask, **kw), base)
    assert not torch.allclose(run(pm, ids, mask, **kw), base, atol=1e-3)  # back on after the block
