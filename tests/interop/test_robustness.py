"""interop under bad input (issue: nothing lost, nothing silently wrong): every corrupted or
mismatched checkpoint or adapter folder gets an error that names the file and what is wrong, never
a bare library exception; loading never half-applies; saving refuses what it would drop."""
import json
import os
import shutil

import pytest
import torch
from tiny_models import fused, randomize, saved

from fusedlm import peft
from fusedlm.interop import hf
from fusedlm.interop import peft as peft_files

V = 128  # llama-tiny's vocabulary


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "llama"
    hf.save_pretrained(fused("llama-tiny"), str(path))
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, base_dir):
    path = tmp_path_factory.mktemp("adapter") / "lora"
    m = hf.from_pretrained(str(base_dir))
    peft.apply_lora(m, r=4, alpha=8, targets=("q", "v"))
    randomize(m)
    peft_files.save_adapter(m, str(path))
    return path


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    config = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    path.write_text(json.dumps(config))


def _edit_tensors(path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _first(tensors, part=""):
    return next(k for k in sorted(tensors) if part in k)


def _nan(tensors):
    tensors[_first(tensors, "weight")][0, 0] = float("nan")


def _drop(tensors):
    del tensors[_first(tensors, "layers.1")]


def _extra(tensors):
    tensors["model.layers.0.self_attn.rotary.extra"] = torch.ones(3)


def _reshape(tensors):
    key = _first(tensors, "q_proj.weight")
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])


MODEL_FILES = [  # (what is damaged, how, error type, message)
    ("config", lambda d: os.remove(d / "config.json"), FileNotFoundError, r"config\.json does not exist"),
    ("config", lambda d: (d / "config.json").write_text(""), ValueError, r"config\.json is empty"),
    ("config", lambda d: (d / "config.json").write_text('{"model_type": "lla'), ValueError, r"config\.json is not valid JSON"),
    ("config", lambda d: (d / "config.json").write_text("[1, 2]"), ValueError, r"config\.json holds a list, not an object"),
    ("config", lambda d: _edit_json(d / "config.json", model_type="xlnet"), ValueError, "unsupported model_type 'xlnet'"),
    ("config", lambda d: _edit_json(d / "config.json", hidden_size=None), ValueError, r"config\.json lacks the field 'hidden_size'"),
    ("config", lambda d: _edit_json(d / "config.json", hidden_act="gelu"), ValueError, r"config\.json: llama activation 'gelu'"),
    ("config", lambda d: _edit_json(d / "config.json", num_hidden_layers=3), ValueError, r"lacks tensors the config needs"),
    ("config", lambda d: _edit_json(d / "config.json", quantization_config={"quant_method": "gptq"}), ValueError,
     "quantization_config .* is not supported"),
    ("weights", lambda d: os.remove(d / "model.safetensors"), FileNotFoundError, "holds neither model.safetensors nor"),
    ("weights", lambda d: (d / "model.safetensors").write_bytes(b""), ValueError, r"model\.safetensors is empty"),
    ("weights", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), ValueError,
     r"model\.safetensors is truncated"),
    ("weights", lambda d: (d / "model.safetensors").write_bytes(os.urandom(4000)), ValueError,
     r"model\.safetensors is truncated or not a safetensors file"),
    ("weights", lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{not json}" + b" " * 6), ValueError,
     r"model\.safetensors has a bad header"),
    ("weights", lambda d: _edit_tensors(d / "model.safetensors", _nan), ValueError, r"model\.safetensors: tensor .* holds NaN or inf"),
    ("weights", lambda d: _edit_tensors(d / "model.safetensors", _drop), ValueError, "lacks tensors the config needs"),
    ("weights", lambda d: _edit_tensors(d / "model.safetensors", _extra), ValueError, "has tensors the config does not explain"),
    ("weights", lambda d: _edit_tensors(d / "model.safetensors", _reshape), ValueError, r"has shape \[65, 64\] but the config"),
]


@pytest.mark.parametrize("what, damage, error, match", MODEL_FILES,
                         ids=[f"{w}-{i}" for i, (w, *_) in enumerate(MODEL_FILES)])
def test_broken_model_folders_name_the_path(base_dir, tmp_path, what, damage, error, match):
    d = _copy(base_dir, tmp_path)
    damage(d)
    with pytest.raises(error, match=match) as e:
        hf.from_pretrained(str(d))
    assert str(d) in str(e.value)


def test_another_architectures_weights(base_dir, tmp_path):
    d = _copy(base_dir, tmp_path)
    saved("gpt2", tmp_path / "gpt2")
    shutil.copy(tmp_path / "gpt2" / "model.safetensors", d / "model.safetensors")
    with pytest.raises(ValueError, match=rf"checkpoint {d} lacks tensors the config needs: model\.embed_tokens"):
        hf.from_pretrained(str(d))


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot be read .truncated"),
    (lambda p: torch.save([torch.ones(2)], p), "does not hold a state dict"),
    (lambda p: p.write_bytes(b""), "is empty"),
], ids=["truncated", "a-list", "empty"])
def test_broken_torch_weights(base_dir, tmp_path, damage, match):
    from safetensors.torch import load_file

    d = _copy(base_dir, tmp_path)
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    os.remove(d / "model.safetensors")
    damage(d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=match) as e:
        hf.from_pretrained(str(d))
    assert str(d / "pytorch_model.bin") in str(e.value)


@pytest.mark.parametrize("path, error, match", [
    ("missing", FileNotFoundError, "is not a checkpoint folder .it does not exist"),
    ("file", FileNotFoundError, "is not a checkpoint folder .it is a file"),
])
def test_not_a_folder(tmp_path, path, error, match):
    (tmp_path / "file").write_text("x")
    with pytest.raises(error, match=match):
        hf.from_pretrained(str(tmp_path / path))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype="int8"), ValueError, "dtype must be a torch floating dtype"),
    (dict(dtype="nosuch"), ValueError, "dtype must be a torch floating dtype or its name"),
    (dict(dtype=torch.int64), ValueError, "dtype must be a torch floating dtype"),
    (dict(dtype=3), TypeError, "dtype must be a torch floating dtype"),
    (dict(device="nodevice"), ValueError, "device must be a torch device"),
])
def test_from_pretrained_arguments(base_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        hf.from_pretrained(str(base_dir), **kwargs)


@pytest.mark.parametrize("dtype", ["float16", "torch.bfloat16", torch.float16])
def test_from_pretrained_takes_a_dtype_name(base_dir, dtype):
    model = hf.from_pretrained(str(base_dir), dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype.removeprefix("torch."))
    assert model.tok_embed.weight.dtype == want


# ---- save_pretrained ----------------------------------------------------------------------------
def _ids():
    return torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(0))


def test_save_pretrained_refuses_nonfinite_weights(tmp_path):
    m = fused("llama-tiny")
    with torch.no_grad():
        m.decoder.blocks[0].attn.q_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight holds NaN or inf values: not writing"):
        hf.save_pretrained(m, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning", "bottleneck", "adaptplora"])
def test_save_pretrained_refuses_a_model_whose_output_it_cannot_hold(tmp_path, method):
    m = fused("llama-tiny")
    m = {"lora": lambda: peft.apply_lora(m), "prompt_tuning": lambda: peft.apply_prompt_tuning(m, n_virtual_tokens=2),
         "prefix_tuning": lambda: peft.apply_prefix_tuning(m, n_virtual_tokens=2),
         "bottleneck": lambda: peft.apply_adapters(m), "adaptplora": lambda: peft.apply_adaptplora(m, n_tasks=2)}[method]()
    with pytest.raises(ValueError, match=rf"depends on PEFT method\(s\) \['{method}'\]"):
        hf.save_pretrained(m, str(tmp_path / "out"))
    with peft.disable(m):  # the base model alone: written, and equal to the model without the method
        hf.save_pretrained(m, str(tmp_path / "out"))
    base = fused("llama-tiny")
    assert torch.equal(hf.from_pretrained(str(tmp_path / "out"))(_ids()).logits, base(_ids()).logits)


def test_save_pretrained_of_a_merged_lora_model_is_the_merged_model(tmp_path):
    m = fused("llama-tiny")
    peft.apply_lora(m, targets="all")
    randomize(m)
    want = m(_ids()).logits
    peft.merge(m)
    hf.save_pretrained(m, str(tmp_path / "out"))
    torch.testing.assert_close(hf.from_pretrained(str(tmp_path / "out"))(_ids()).logits, want, atol=1e-5, rtol=1e-5)


def test_nf4_model_round_trips_through_fusedlm_and_transformers(tmp_path):
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    m = fused("llama-tiny")
    peft.apply_qlora(m, r=4, compute_dtype=None)  # float32 products, as transformers + bitsandbytes compute below
    randomize(m)
    with pytest.raises(ValueError, match=r"depends on PEFT method\(s\) \['lora'\]"):
        hf.save_pretrained(m, str(tmp_path / "q"))  # QLoRA's adapter cannot merge into 4-bit: save_adapter it
    with peft.disable(m):
        hf.save_pretrained(m, str(tmp_path / "q"))
        want = m(_ids()).logits
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    back = hf.from_pretrained(str(tmp_path / "q"))
    assert torch.equal(back(_ids()).logits, want)  # the same bytes, the same kernels
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    torch.testing.assert_close(theirs(_ids()).logits, want, atol=1e-4, rtol=1e-4)


def test_nf4_checkpoint_keeps_its_compute_dtype(tmp_path):
    m = fused("llama-tiny")
    peft.quantize(m, compute_dtype=torch.bfloat16)
    hf.save_pretrained(m, str(tmp_path / "bf16"))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    back = hf.from_pretrained(str(tmp_path / "bf16"))
    assert torch.equal(back(_ids()).logits, m(_ids()).logits)
    peft.quantize(m, compute_dtype=None)
    hf.save_pretrained(m, str(tmp_path / "f32"))
    layers = [x for x in hf.from_pretrained(str(tmp_path / "f32")).modules() if hasattr(x, "compute_dtype")]
    assert layers and all(x.compute_dtype is None for x in layers)


def test_nf4_model_dequantized_on_request(tmp_path):
    m = fused("llama-tiny")
    peft.quantize(m, compute_dtype=None)  # float32 products, as the dense model computes
    want = m(_ids()).logits
    hf.save_pretrained(m, str(tmp_path / "dense"), dequantize=True)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    torch.testing.assert_close(hf.from_pretrained(str(tmp_path / "dense"))(_ids()).logits, want, atol=1e-4, rtol=1e-4)


def test_nf4_gpt2_needs_dequantize(tmp_path):
    m = fused("gpt2-tiny")
    peft.quantize(m)
    with pytest.raises(ValueError, match="stacked.* a 4-bit checkpoint cannot hold it; pass dequantize=True"):
        hf.save_pretrained(m, str(tmp_path / "g"))
    hf.save_pretrained(m, str(tmp_path / "g"), dequantize=True)
    assert hf.from_pretrained(str(tmp_path / "g")) is not None


# ---- adapters ------------------------------------------------------------------------------------
ADAPTER_CONFIG = [  # (config changes, message)
    (dict(peft_type="IA3"), "peft_type 'IA3' is not supported"),
    (dict(use_dora=True), r"use_dora=True \(DoRA"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' .this initialisation changes the base weights"),
    (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4'"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
    (dict(init_lora_weights="corda"), "init_lora_weights='corda'"),
    (dict(init_lora_weights="loftq"), "init_lora_weights='loftq'"),
    (dict(init_lora_weights="lora_ga"), "init_lora_weights='lora_ga'"),
    (dict(init_lora_weights="mica"), "init_lora_weights='mica'"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern gives 8"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(lora_bias=True), "lora_bias=True .a field fusedlm does not know"),
    (dict(target_parameters=["mlp.experts"]), "target_parameters"),
    (dict(layer_replication=[[0, 2]]), "layer_replication"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    (dict(lora_alpha=float("inf")), "lora_alpha must be a finite number"),
    (dict(lora_alpha=-1), "lora_alpha must be > 0"),
    (dict(lora_alpha="16"), "lora_alpha must be a number"),
    (dict(r=0), "r must be > 0"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
]


def _lora_model(base_dir):
    return hf.from_pretrained(str(base_dir))


def _assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert peft.methods(model) == []


def _assert_load_fails_cleanly(base_dir, d, error, match):
    """Loading the adapter folder `d` raises `error` naming the folder and leaves the model as it was."""
    model = _lora_model(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match) as e:
        peft_files.load_adapter(model, str(d))
    assert str(d) in str(e.value)
    _assert_untouched(model, before)


@pytest.mark.parametrize("changes, match", ADAPTER_CONFIG, ids=[m.split(" ")[0][:24] for _, m in ADAPTER_CONFIG])
def test_adapter_config_fields_that_change_the_forward_are_errors(base_dir, adapter_dir, tmp_path, changes, match):
    d = _copy(adapter_dir, tmp_path)
    _edit_json(d / "adapter_config.json", **changes)
    _assert_load_fails_cleanly(base_dir, d, ValueError, match)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "nora"])
def test_initialisations_that_keep_the_base_load(base_dir, adapter_dir, tmp_path, init):
    d = _copy(adapter_dir, tmp_path)
    _edit_json(d / "adapter_config.json", init_lora_weights=init)
    assert peft.methods(peft_files.load_adapter(_lora_model(base_dir), str(d))) == ["lora"]


def _lora_only_a(tensors):
    del tensors[_first(tensors, "lora_B")]


def _not_lora(tensors):
    tensors["base_model.model.model.layers.0.mlp.weird"] = torch.ones(2)


def _another_arch(tensors):
    for key in [k for k in tensors if "layers.0.self_attn.q_proj" in k]:
        tensors[key.replace("model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn")] = tensors.pop(key)


def _wrong_rank_shape(tensors):
    key = _first(tensors, "lora_A")
    tensors[key] = torch.zeros(4, 17)


ADAPTER_FILES = [
    (lambda d: os.remove(d / "adapter_config.json"), FileNotFoundError, "does not exist .not a peft adapter directory"),
    (lambda d: (d / "adapter_config.json").write_text(""), ValueError, "adapter_config.json is empty"),
    (lambda d: (d / "adapter_config.json").write_text('{"r": 4,'), ValueError, "adapter_config.json is not valid JSON"),
    (lambda d: os.remove(d / "adapter_model.safetensors"), FileNotFoundError, "holds neither adapter_model.safetensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b""), ValueError, "adapter_model.safetensors is empty"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:-10]), ValueError,
     "adapter_model.safetensors is truncated"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(os.urandom(300)), ValueError, "is truncated or not a safetensors file"),
    (lambda d: _edit_tensors(d / "adapter_model.safetensors", _nan), ValueError, "holds NaN or inf values"),
    (lambda d: _edit_tensors(d / "adapter_model.safetensors", _lora_only_a), ValueError, "not both lora_A and lora_B"),
    (lambda d: _edit_tensors(d / "adapter_model.safetensors", _not_lora), ValueError, "is not a LoRA weight"),
    (lambda d: _edit_tensors(d / "adapter_model.safetensors", _another_arch), ValueError, "is not a block linear of this fusedlm"),
    (lambda d: _edit_tensors(d / "adapter_model.safetensors", _wrong_rank_shape), ValueError, r"has shape \[4, 17\]"),
]


@pytest.mark.parametrize("damage, error, match", ADAPTER_FILES, ids=[str(i) for i in range(len(ADAPTER_FILES))])
def test_broken_adapter_folders_name_the_path_and_change_nothing(base_dir, adapter_dir, tmp_path, damage, error, match):
    d = _copy(adapter_dir, tmp_path)
    damage(d)
    _assert_load_fails_cleanly(base_dir, d, error, match)


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory, base_dir):
    path = tmp_path_factory.mktemp("prompt") / "pt"
    pm = peft.apply_prompt_tuning(hf.from_pretrained(str(base_dir)), n_virtual_tokens=3)
    randomize(pm, pattern="prompt_encoder", std=1.0)
    peft_files.save_adapter(pm, str(path))
    return path


@pytest.mark.parametrize("damage, match", [
    (lambda d: _edit_json(d / "adapter_config.json", num_virtual_tokens=None), "lacks the field 'num_virtual_tokens'"),
    (lambda d: _edit_json(d / "adapter_config.json", num_virtual_tokens=0), "num_virtual_tokens must be >= 1"),
    (lambda d: _edit_json(d / "adapter_config.json", num_virtual_tokens="3"), "num_virtual_tokens must be an int"),
    (lambda d: _edit_json(d / "adapter_config.json", num_virtual_tokens=4), r"'prompt_embeddings' has shape \[3, 64\], expected \[4, 64\]"),
    (lambda d: _edit_json(d / "adapter_config.json", num_transformer_submodules=2), "num_transformer_submodules=2"),
    (lambda d: _edit_tensors(d / "adapter_model.safetensors", lambda t: t.update(extra=torch.ones(1))), "holds one tensor"),
    (lambda d: _edit_tensors(d / "adapter_model.safetensors", lambda t: t["prompt_embeddings"].fill_(float("nan"))),
     "holds NaN or inf"),
], ids=["no-n", "zero-n", "str-n", "wrong-n", "submodules", "extra", "nan"])
def test_broken_prompt_folders(base_dir, prompt_dir, tmp_path, damage, match):
    d = _copy(prompt_dir, tmp_path)
    damage(d)
    model = _lora_model(base_dir)
    with pytest.raises(ValueError, match=match) as e:
        peft_files.load_adapter(model, str(d))
    assert str(d) in str(e.value)
    model(_ids())  # not bound to a PromptModel: the failed load left it a plain model


def test_load_adapter_arguments(base_dir, adapter_dir):
    model = _lora_model(base_dir)
    with pytest.raises(ValueError, match="name must be a non-empty string without dots, got 'a.b'"):
        peft_files.load_adapter(model, str(adapter_dir), name="a.b")
    peft_files.load_adapter(model, str(adapter_dir), name="x")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="an adapter named 'x' already exists"):
        peft_files.load_adapter(model, str(adapter_dir), name="x")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_one_contract_for_every_method(base_dir, adapter_dir, prompt_dir):
    """load_adapter returns the model to use; the model passed in is never left silently plain."""
    model = _lora_model(base_dir)
    plain = model(_ids()).logits
    assert peft_files.load_adapter(model, str(adapter_dir)) is model  # LoRA: in place, model returned
    assert not torch.equal(model(_ids()).logits, plain)

    model = _lora_model(base_dir)
    pm = peft_files.load_adapter(model, str(prompt_dir))  # prompt methods: a wrapper...
    assert isinstance(pm, peft.PromptModel) and pm.model is model
    with pytest.raises(ValueError, match="run the PromptModel load_adapter returned"):
        model(_ids())  # ...and the model alone refuses to drop the virtual tokens without a word
    from fusedlm.generation import generate

    with pytest.raises(ValueError, match="run the PromptModel load_adapter returned"):
        generate(model, _ids(), max_new_tokens=2)
    assert not torch.equal(pm(_ids()).logits, plain)
    with peft.disable(pm):
        assert torch.equal(pm(_ids()).logits, plain)
    assert generate(pm, _ids(), max_new_tokens=2).shape == (2, 9)


# ---- save_adapter -------------------------------------------------------------------------------
def test_save_adapter_refuses_to_drop_a_method(tmp_path):
    m = fused("llama-tiny")
    peft.apply_lora(m)
    randomize(m)
    pm = peft.apply_prompt_tuning(m, n_virtual_tokens=2)
    with pytest.raises(ValueError, match=r"carries PEFT method\(s\) \['prompt_tuning', 'lora'\]; a peft adapter folder holds one"):
        peft_files.save_adapter(pm, str(tmp_path / "both"))
    assert not (tmp_path / "both").exists()
    peft_files.save_adapter(pm, str(tmp_path / "lora"), method="lora")
    peft_files.save_adapter(pm, str(tmp_path / "prompt"), method="prompt_tuning")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    with pytest.raises(ValueError, match=r"method must be one of .*\['prompt_tuning', 'lora'\], got 'prefix_tuning'"):
        peft_files.save_adapter(pm, str(tmp_path / "x"), method="prefix_tuning")


@pytest.mark.parametrize("make, match", [
    (lambda m: m, "carries no PEFT method"),
    (lambda m: peft.apply_adapters(m), r"\['bottleneck'\]"),
    (lambda m: peft.apply_adapters(peft.apply_lora(m)), r"\['lora', 'bottleneck'\]"),
    (lambda m: peft.apply_adaptplora(m, n_tasks=2), r"\['adaptplora'\]"),
], ids=["none", "bottleneck", "lora+bottleneck", "adaptplora"])
def test_save_adapter_refuses_what_a_peft_folder_cannot_hold(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        peft_files.save_adapter(make(fused("llama-tiny")), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_save_adapter_refuses_nonfinite_weights_and_unknown_names(tmp_path):
    m = fused("llama-tiny")
    peft.apply_lora(m)
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        peft_files.save_adapter(m, str(tmp_path / "out"), name="other")
    with torch.no_grad():
        m.decoder.blocks[0].attn.q_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"lora_B\.weight holds NaN or inf values: not writing it"):
        peft_files.save_adapter(m, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---- real peft files of initialisations that change the base ------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_pissa_and_olora_files_are_refused_until_converted(tmp_path, init):
    hf_peft = pytest.importorskip("peft")
    saved("llama", tmp_path / "base")
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    config = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    pm = hf_peft.get_peft_model(ref, config)
    pm.save_pretrained(str(tmp_path / "raw"))
    ours = hf.from_pretrained(str(tmp_path / "base"))
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' .this initialisation changes the base weights"):
        peft_files.load_adapter(ours, str(tmp_path / "raw"))
    assert peft.methods(ours) == []
    # converted against the original base, it is a plain LoRA file: loads, and equals peft on the original base
    init_dir = tmp_path / "initial"
    pm.peft_config["default"].init_lora_weights = False
    pm.save_pretrained(str(init_dir))
    pm.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # "training"
    pm.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(init_dir))
    loaded = peft_files.load_adapter(hf.from_pretrained(str(tmp_path / "base")), str(tmp_path / "converted"))
    original = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    theirs = hf_peft.PeftModel.from_pretrained(original, str(tmp_path / "converted"))
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
