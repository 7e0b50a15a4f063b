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
