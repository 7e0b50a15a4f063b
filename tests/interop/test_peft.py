"""peft adapter directories both ways: fusedlm's outputs equal peft's on the transformers model with
the same base and adapter weights (fp32, max abs logit diff <= 1e-4, padded batches), for LLaMA with
GQA, GPT-2 and T5 (BART for LoRA too); LoRA, prompt tuning, prefix tuning and P-tuning."""
import json
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
hf_peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from tiny_models import saved  # noqa: E402

from fusedlm import peft  # noqa: E402
from fusedlm.interop import hf  # noqa: E402
from fusedlm.interop import peft as peft_files  # noqa: E402
from fusedlm.peft import lora as lora_mod  # noqa: E402

ATOL = 1e-4
P = 3
SEQ2SEQ = ("t5", "bart")
LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "gpt2": ["c_attn", "c_proj", "c_fc"], "t5": ["q", "v", "o", "wi"], "bart": ["q_proj", "v_proj", "fc1"]}


def _prompt_config(method, task):
    return {
        "prompt": lambda: hf_peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P),
        "p-mlp": lambda: hf_peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=16),
        "p-lstm": lambda: hf_peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=8,
                                                      encoder_reparameterization_type="LSTM"),
        "prefix": lambda: hf_peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P),
        "prefix-proj": lambda: hf_peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True,
                                                          encoder_hidden_size=20),
    }[method]()


def _inputs(model_type, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 8), generator=g)
    left = torch.ones(3, 8, dtype=torch.long)
    left[1, :3] = 0
    left[2, :1] = 0
    right = torch.ones(3, 8, dtype=torch.long)
    right[1, 5:] = 0
    dec = torch.randint(3, 97, (3, 5), generator=g)
    dmask = torch.ones(3, 5, dtype=torch.long)
    dmask[2, 3:] = 0
    return ids, left, right, dec, dmask


def _cases(fast, slow):
    """pytest params: `fast` in every run, `slow` marked slow (the whole grid)."""
    return list(fast) + [pytest.param(*c if isinstance(c, tuple) else (c,), marks=pytest.mark.slow) for c in slow]


def _maxdiff(a, b, mask=None):
    d = (a - b).abs()
    return float((d[mask.bool()] if mask is not None else d).max())


@torch.no_grad()
def _compare(model_type, ref, ours, method):
    """Max abs logit difference over real positions: decoders with left padding (position ids that
    count real tokens, as generate makes them) and right padding, seq2seq with padded source and target."""
    ids, left, right, dec, dmask = _inputs(model_type)
    if model_type in SEQ2SEQ:
        a = ref(input_ids=ids, attention_mask=left, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
        b = ours(ids, attention_mask=left, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
        return _maxdiff(a, b, dmask)
    diffs = []
    for mask in (left, right):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        if method in ("lora", "prefix", "prefix-proj"):  # peft offsets position_ids by P for prefixes
            a = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            b = ours(ids, attention_mask=mask).logits
        else:  # peft drops position_ids for prompt tuning / P-tuning: positions 0 .. P + N - 1, pads included
            a = ref(input_ids=ids, attention_mask=mask).logits[:, P:]
            b = ours(ids, attention_mask=mask, position_ids=torch.arange(8).expand(3, 8)).logits
        diffs.append(_maxdiff(a, b, mask))
    return max(diffs)


def _task(model_type):
    return "SEQ_2_SEQ_LM" if model_type in SEQ2SEQ else "CAUSAL_LM"


def _randomize(module, std=0.3, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_" in n or "prompt_encoder" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("model_type", _cases(["llama", "gpt2", "t5"], ["bart"]))
def test_lora_peft_to_fusedlm(model_type, tmp_path):
    ref = saved(model_type, tmp_path / "base")
    config = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[model_type], task_type=_task(model_type),
                                fan_in_fan_out=model_type == "gpt2", use_rslora=model_type == "t5")
    pm = hf_peft.get_peft_model(ref, config).eval()
    _randomize(pm)
    pm.save_pretrained(tmp_path / "adapter")
    ours = peft_files.load_adapter(hf.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter"))
    assert _compare(model_type, pm, ours, "lora") <= ATOL
    if model_type != "gpt2":  # GPT-2's shared c_attn A becomes one A per slice
        assert peft.trainable_parameters(ours)[0] == pm.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("model_type", _cases(["llama", "gpt2", "t5"], ["bart"]))
def test_lora_fusedlm_to_peft(model_type, tmp_path):
    saved(model_type, tmp_path / "base")
    ours = hf.from_pretrained(str(tmp_path / "base"))
    targets = {"llama": "all", "gpt2": ("q", "v", "o", "down"), "t5": ("q", "k", "up"), "bart": ("v", "o", "up")}[model_type]
    peft.apply_lora(ours, r=3, alpha=5, targets=targets)
    peft.apply_lora(ours, r=2, alpha=4, targets=("q",), name="other")  # only "default" is written
    _randomize(ours)
    peft_files.save_adapter(ours, str(tmp_path / "adapter"))
    ref = hf_peft.PeftModel.from_pretrained(saved(model_type, tmp_path / "base2"), str(tmp_path / "adapter")).eval()
    assert _compare(model_type, ref, ours, "lora") <= ATOL
    back = peft_files.load_adapter(hf.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter"))
    before = {p: layer.r["default"] for p, layer in lora_mod.lora_layers(ours) if "default" in layer.r}
    assert {p: layer.r["default"] for p, layer in lora_mod.lora_layers(back)} == before  # stacked c_attn slices come back as they were
    assert _compare(model_type, ref, back, "lora") <= ATOL


@pytest.mark.parametrize("model_type, method", _cases(
    [("llama", "prompt"), ("llama", "p-mlp"), ("llama", "prefix"), ("gpt2", "prompt"), ("gpt2", "prefix"), ("t5", "prompt"),
     ("t5", "prefix")],
    [("llama", "p-lstm"), ("llama", "prefix-proj"), ("gpt2", "p-mlp"), ("gpt2", "prefix-proj"), ("t5", "p-mlp"),
     ("t5", "prefix-proj"), ("bart", "prompt"), ("bart", "prefix")]))
def test_prompt_methods_both_ways(model_type, method, tmp_path):
    ref = saved(model_type, tmp_path / "base")
    pm = hf_peft.get_peft_model(ref, _prompt_config(method, _task(model_type))).eval()
    _randomize(pm, std=1.0)
    pm.save_pretrained(tmp_path / "adapter")
    ours = peft_files.load_adapter(hf.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter"))
    assert isinstance(ours, peft.PromptModel)
    assert _compare(model_type, pm, ours, method) <= ATOL
    peft_files.save_adapter(ours, str(tmp_path / "back"))
    again = hf_peft.PeftModel.from_pretrained(saved(model_type, tmp_path / "base2"), str(tmp_path / "back")).eval()
    assert _compare(model_type, again, ours, method) <= ATOL


@pytest.mark.parametrize("model_type, method", _cases(
    [("llama", "p-mlp"), ("llama", "p-lstm"), ("llama", "prefix-proj")], [("t5", "p-mlp"), ("t5", "p-lstm"), ("t5", "prefix-proj")]))
def test_native_encoders_are_peft_modules(model_type, method, tmp_path):
    """fusedlm's encoders hold peft's parameters under peft's names and compute the same prompts;
    a native fusedlm adapter written out loads in peft with the same outputs."""
    ref = saved(model_type, tmp_path / "base")
    pm = hf_peft.get_peft_model(ref, _prompt_config(method, _task(model_type))).eval()
    _randomize(pm)
    model = hf.from_pretrained(str(tmp_path / "base"))
    kw = {"p-mlp": dict(hidden_size=16), "p-lstm": dict(encoder="LSTM", hidden_size=8),
          "prefix-proj": dict(projection=True, hidden_size=20)}[method]
    make_ours = peft.apply_prefix_tuning if method.startswith("prefix") else peft.apply_p_tuning
    ours = make_ours(model, n_virtual_tokens=P, **kw)
    ours.prompt_encoder.load_state_dict(pm.prompt_encoder["default"].state_dict(), strict=True)
    assert peft.trainable_parameters(ours)[0] == pm.get_nb_trainable_parameters()[0]
    assert _compare(model_type, pm, ours, method) <= ATOL  # peft in training form: its encoder runs
    ids, left, _, dec, dmask = _inputs(model_type)
    if model_type not in SEQ2SEQ:  # the loss over labels extended with -100, as peft extends them
        labels = ids.masked_fill(left == 0, -100)
        with torch.no_grad():
            a = pm(input_ids=ids, attention_mask=left, labels=labels).loss
            b = ours(ids, attention_mask=left, labels=labels, position_ids=torch.arange(8).expand(3, 8)).loss
        assert abs(float(a) - float(b)) <= ATOL
    peft_files.save_adapter(ours, str(tmp_path / "native"))  # peft saves the encoded tokens: so does fusedlm
    again = hf_peft.PeftModel.from_pretrained(saved(model_type, tmp_path / "base2"), str(tmp_path / "native")).eval()
    assert _compare(model_type, again, ours, method) <= ATOL


@pytest.mark.parametrize("model_type, method", _cases([("llama", "prompt"), ("gpt2", "prefix"), ("t5", "prompt")],
                                                      [("llama", "prefix"), ("gpt2", "prompt"), ("t5", "prefix"), ("bart", "prefix")]))
def test_native_tables_written_out_load_in_peft(model_type, method, tmp_path):
    """fusedlm-made prompt tuning (token-id init) and prefix tuning written by save_adapter: peft loads
    them onto the transformers model and gives the same outputs."""
    saved(model_type, tmp_path / "base")
    model = hf.from_pretrained(str(tmp_path / "base"))
    if method == "prompt":
        ours = peft.apply_prompt_tuning(model, n_virtual_tokens=P, init_token_ids=[5, 11])
    else:
        ours = peft.apply_prefix_tuning(model, n_virtual_tokens=P)
        _randomize(ours, std=1.0)
    peft_files.save_adapter(ours, str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[method]
    ref = hf_peft.PeftModel.from_pretrained(saved(model_type, tmp_path / "base2"), str(tmp_path / "adapter")).eval()
    assert _compare(model_type, ref, ours, method) <= ATOL


def _lora_dir(tmp_path, **config_overrides):
    ref = saved("llama", tmp_path / "base")
    pm = hf_peft.get_peft_model(ref, hf_peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(config_overrides)
    path.write_text(json.dumps(config))
    return str(tmp_path / "adapter")


@pytest.mark.parametrize("overrides, match", [
    (dict(use_dora=True), "use_dora"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(bias="all"), "bias='all'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern gives 8"),
    (dict(some_future_option={"on": 1}), "some_future_option"),
    (dict(peft_type="IA3"), "peft_type 'IA3' .* not supported"),
])
def test_unsupported_config_fields_name_themselves(overrides, match, tmp_path):
    path = _lora_dir(tmp_path, **overrides)
    with pytest.raises(ValueError, match=match):
        peft_files.load_adapter(hf.from_pretrained(str(tmp_path / "base")), path)


def test_adapter_of_another_architecture_or_shape(tmp_path):
    path = _lora_dir(tmp_path)
    saved("gpt2", tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"adapter key 'base_model\.model\.model\.layers\.0\.self_attn\.(q|v)_proj\.lora_A\.weight'"):
        peft_files.load_adapter(hf.from_pretrained(str(tmp_path / "gpt2")), path)
    wide = hf.from_pretrained(str(tmp_path / "base"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 48)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"adapter key '{key}' has shape \[4, 48\]"):
        peft_files.load_adapter(wide, path)
    with pytest.raises(ValueError, match="already exists"):
        peft.apply_lora(wide, name="x")
        peft_files.load_adapter(wide, _lora_dir(tmp_path / "again"), name="x")


def test_mixed_adapters_from_files_match_peft_adapter_names(tmp_path):
    """Two peft adapters loaded from files run as one mixed batch equal to peft's adapter_names."""
    ref = saved("llama", tmp_path / "base")
    pm = hf_peft.get_peft_model(ref, hf_peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="one")
    pm.add_adapter("two", hf_peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]))
    _randomize(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "adapters", selected_adapters=["one", "two"])  # adapters/one/, adapters/two/
    ours = hf.from_pretrained(str(tmp_path / "base"))
    peft_files.load_adapter(ours, str(tmp_path / "adapters" / "one"), name="one")
    peft_files.load_adapter(ours, str(tmp_path / "adapters" / "two"), name="two")
    ids, left, _, _, _ = _inputs("llama")
    pos = (left.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pm(input_ids=ids, attention_mask=left, position_ids=pos, adapter_names=["one", "__base__", "two"]).logits
        b = ours(ids, attention_mask=left, adapter_ids=torch.tensor([0, -1, 1])).logits
    assert _maxdiff(a, b, left) <= ATOL


def test_mixed_adapter_generation_equals_peft_generate_adapter_names(tmp_path):
    """Greedy decoding of a left-padded mixed batch (adapter_ids, through the cache) gives the tokens
    peft's generate(adapter_names=...) gives."""
    from fusedlm.generation import generate

    ref = saved("llama", tmp_path / "base")
    pm = hf_peft.get_peft_model(ref, hf_peft.LoraConfig(r=4, target_modules="all-linear"), adapter_name="one")
    pm.add_adapter("two", hf_peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomize(pm, std=1.0)
    pm.eval()
    pm.save_pretrained(tmp_path / "adapters", selected_adapters=["one", "two"])
    ours = hf.from_pretrained(str(tmp_path / "base"))
    for name in ("one", "two"):
        peft_files.load_adapter(ours, str(tmp_path / "adapters" / name), name=name)
    ids, left, _, _, _ = _inputs("llama")
    ids = ids.masked_fill(left == 0, 0)  # pad id 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pm.generate(input_ids=ids, attention_mask=left, adapter_names=["two", "one", "__base__"], max_new_tokens=6,
                        min_new_tokens=6, do_sample=False, pad_token_id=0)
        b = generate(ours, ids, attention_mask=left, adapter_ids=torch.tensor([1, 0, -1]), max_new_tokens=6, eos_token_id=[])
    assert b.tolist() == a.tolist()
    with torch.no_grad():  # the adapters do change the continuation
        assert generate(ours, ids, attention_mask=left, max_new_tokens=6, eos_token_id=[]).tolist() != b.tolist()
