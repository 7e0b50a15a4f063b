import pytest
import torch

from fusedlm.models import PRESETS, ModelConfig, build, count_parameters, get_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_count_parameters_equals_built_model(name):
    cfg = get_config(name)
    with torch.device("meta"):  # no allocation: LLaMA-7B and GPT-3 sized configs count instantly
        model = build(cfg)
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_known_figures():
    assert count_parameters(get_config("llama-7b"))["total"] == 6_738_415_616
    assert count_parameters(get_config("gpt2"))["total"] == 124_439_808
    assert count_parameters(get_config("t5-small"))["total"] == 60_506_624
    assert count_parameters(get_config("bert-base"))["total"] == 109_514_298  # BertForMaskedLM


def test_formulas():
    c = get_config("llama-7b")
    counts = count_parameters(c)
    assert counts["attention"] == c.n_layers * 4 * c.d_model**2
    assert counts["mlp"] == c.n_layers * 3 * c.d_model * c.d_ff
    gqa = count_parameters(get_config("llama-7b", n_kv_heads=8))
    assert gqa["attention"] == c.n_layers * (2 * c.d_model**2 + 2 * c.d_model * 8 * c.head_dim)


def test_presets_have_tiny_variants():
    for family in ("gpt2", "llama", "qwen2", "bert", "roberta", "t5", "bart"):
        assert f"{family}-tiny" in PRESETS


def test_bad_config():
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(d_model=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("gpt5")


@pytest.mark.parametrize("arch,field,value", [
    ("encoder", "attn_mode", "prefix"), ("encoder-decoder", "attn_mode", "causal"),
    ("decoder", "head", "classifier"), ("decoder", "pooler", True), ("decoder", "n_labels", 3),
    ("encoder-decoder", "head", "lm"), ("decoder", "n_decoder_layers", 2), ("encoder", "decoder_start_token_id", 0),
    ("decoder", "final_logits_bias", True), ("decoder", "rescale_tied_head", True),
])
def test_fields_an_architecture_ignores_are_rejected(arch, field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} is read by .* leave {field} unset"):
        ModelConfig(arch=arch, d_model=64, n_heads=4, **{field: value})


def test_family_of_presets_and_architecture_defaults():
    assert {get_config(name).family for name in PRESETS} == {"gpt2", "llama", "qwen2", "bert", "roberta", "t5", "bart", "prefix-lm"}
    assert get_config("llama-tiny").attn_mode == "causal" and get_config("prefix-lm-tiny").attn_mode == "prefix"
    bert = get_config("bert-tiny")
    assert (bert.attn_mode, bert.head, bert.pooler, bert.n_labels) == (None, "lm", False, None)
    assert get_config("bert-tiny", head="classifier", pooler=True).n_labels == 2
    assert get_config("t5-tiny").n_decoder_layers == 2 and get_config("gpt2-tiny").n_decoder_layers is None
    with pytest.raises(ValueError, match="family"):
        get_config("llama-tiny", family="bert")
    with pytest.raises(ValueError, match="n_labels"):
        get_config("bert-tiny", n_labels=3)
