"""`fusedlm bench --suite decode` on tiny shapes: every group runs, rows carry what the table shows."""
import os
import subprocess
import sys

import pytest
import torch

from fusedlm.benchmarks import bench_decode
from fusedlm.nn import NF4Linear

TINY = dict(d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)


def test_linear_bytes_counts_what_the_kernels_read():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 64), torch.nn.Linear(64, 32), torch.nn.Linear(64, 16, bias=False))
    assert bench_decode.linear_bytes(model) == (32 * 64 + 32 + 16 * 64) * 4  # the embedding not counted
    nf4 = NF4Linear.from_linear(torch.nn.Linear(128, 48, bias=False), blocksize=64, double_quant=True)
    assert bench_decode.linear_bytes(nf4) == 48 * 128 // 2 + 48 * 2 * 4  # nibbles + float32 absmax per block


def test_linear_bytes_of_a_bitsandbytes_layer_patched_by_apply():
    bnb = pytest.importorskip("bitsandbytes")
    from fusedlm.integrations import nf4 as nf4_integration

    layer = bnb.nn.Linear4bit(128, 48, bias=False, quant_type="nf4", compress_statistics=True)  # double quant: uint8 absmax stored
    layer.load_state_dict(torch.nn.Linear(128, 48, bias=False).state_dict())
    layer = layer.to("cpu")  # quantises
    nf4_integration.patch(layer)
    assert bench_decode.linear_bytes(layer) == 48 * 128 // 2 + 48 * 128 // 64 * 4  # fusedlm's tiles, float32 absmax
    nf4_integration.unpatch(layer)
    assert bench_decode.linear_bytes(layer) == 48 * 128 // 2 + 48 * 128 // 64  # bitsandbytes' stored bytes


def test_quick_path_runs_on_tiny_shapes(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(bench_decode, "read_bandwidth", lambda: (1.0, 20.0))  # no 1 GiB probe in a test
    rows = bench_decode.run(shape=TINY, sizes=dict(n_layers=2, prompt=5, new=3), peak_memory=False)  # tested below
    impls = {r.impl for r in rows}
    for name in ("fusedlm DecoderLM fp32", "transformers fp32 (sdpa)", "fusedlm DecoderLM bf16", "transformers bf16 (sdpa)",
                 "fusedlm DecoderLM NF4 (bf16 model, bf16 head)", "fusedlm DecoderLM NF4 (fp32 model, fp32 head)"):
        assert name in impls
    decode = [r for r in rows if r.case.startswith("greedy decode") and not r.floor]
    assert decode and all(r.ms > 0 and r.extra["tok_per_s"] > 0 and 0 < r.extra["pct_of_read_bw"] for r in decode)
    fp32 = [r for r in decode if r.case.endswith("fp32")]
    assert len(fp32) == 2 and all(r.extra["same_tokens"] for r in fp32)  # same weights, same greedy tokens
    assert fp32[0].extra["weight_MB_per_tok"] == fp32[1].extra["weight_MB_per_tok"]
    floors = [r for r in rows if r.floor]
    assert len(floors) == 3 and all(r.extra["read_bw_GB/s"] == 20.0 for r in floors)
    nf4 = {r.impl: r for r in decode if "NF4" in r.case}
    for name, row in nf4.items():  # every NF4 row against its exact reference
        assert row.extra["ref_tokens"].endswith("/4 same") and row.extra["ref_dtype"] == "float64", name
        if row.extra["ref_tokens"] != "4/4 same":
            assert row.extra["ref_margin"] >= 0 and row.extra["ref_top2_margin"] >= 0
    if "transformers + bitsandbytes NF4 + fusedlm apply()" in nf4:
        assert nf4["transformers + bitsandbytes NF4 + fusedlm apply()"].kind == "context"  # fusedlm inside transformers
        assert nf4["transformers + bitsandbytes NF4 (as it runs)"].kind is None  # a peer, from its name


def test_compare_with_reference_finds_the_first_divergence_and_its_margins():
    ref_logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 2.9], [0.0, 0.0, 1.0]])
    ref_tokens = [1, 0, 2]
    same = bench_decode.compare_with_reference(ref_tokens, ref_logits + 0.01, ref_tokens, ref_logits)
    assert same["ref_tokens"] == "3/3 same" and same["ref_logit_err"] == pytest.approx(0.01)
    row_logits = ref_logits.clone()
    row_logits[0, 0] += 0.05  # an error that flips nothing at step 0
    row_logits[1, 2] += 0.2  # flips step 1, where the reference's margin is 0.1
    got = bench_decode.compare_with_reference([1, 2, 2], row_logits, ref_tokens, ref_logits)
    assert got["ref_tokens"] == "1/3 same" and got["ref_diverge_at"] == 1
    assert got["ref_margin"] == pytest.approx(0.1) and got["ref_top2_margin"] == pytest.approx(0.1)
    assert got["logit_err_before"] == pytest.approx(0.05)
    first = bench_decode.compare_with_reference([2, 0, 2], row_logits, ref_tokens, ref_logits)
    assert first["ref_diverge_at"] == 0 and first["ref_margin"] == pytest.approx(1.0) and first["logit_err_before"] != first["logit_err_before"]  # NaN
    with pytest.raises(ValueError, match="reference's 3 steps"):
        bench_decode.compare_with_reference([1, 0], row_logits[:2], ref_tokens, ref_logits)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("safetensors")  # the checkpoint format (the installed-wheel tests run without it)
    from fusedlm.interop import hf

    path = str(tmp_path_factory.mktemp("tiny"))
    model = bench_decode._fusedlm_model({**TINY, "n_layers": 2})
    hf.save_pretrained(model, path)
    return model, path


@torch.inference_mode()
def test_exact_reference_of_a_fusedlm_nf4_model(tiny_checkpoint):
    import copy

    from fusedlm import ops
    from fusedlm.peft import qlora

    model = qlora.quantize(copy.deepcopy(tiny_checkpoint[0]), blocksize=64, compute_dtype=None)  # exact fp32 products
    ref = bench_decode._fusedlm_reference(model)
    assert bench_decode._reference_dtype(model) == torch.float64
    dense = dict(ref.named_modules())
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert layers
    for name, layer in layers:  # the dequantised weight, exactly (fp32 dequantisation rounds code x absmax once)
        w = dense[name].weight
        assert isinstance(dense[name], torch.nn.Linear) and w.dtype == torch.float64
        torch.testing.assert_close(w.float(), ops.nf4_dequantize(layer.qweight), rtol=2**-24, atol=0)
    assert all(p.dtype == torch.float64 for p in ref.parameters())
    prompt = torch.randint(0, TINY["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(1))
    ref_tokens, ref_logits, ref_dtype = bench_decode._reference_trace("fusedlm", ref, prompt, 6)
    assert ref_dtype == "float64"
    tokens, logits = bench_decode._trace("fusedlm", model, prompt, 6)
    got = bench_decode.compare_with_reference(tokens, logits, ref_tokens, ref_logits)
    # fp32 products of the exact weights: the same tokens, logits within float32 rounding
    assert got["ref_tokens"] == "7/7 same" and got["ref_logit_err"] < 1e-4


@torch.inference_mode()
def test_exact_reference_of_a_bitsandbytes_model(tiny_checkpoint):
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    _, path = tiny_checkpoint
    plain = bench_decode._hf_model(path, torch.bfloat16, bench_decode._bnb_config())
    ref = bench_decode._bnb_reference(plain, path)
    assert bench_decode._reference_dtype(plain) == torch.float64
    checked = 0
    for name, module in plain.named_modules():
        dense = ref.get_submodule(name)
        if isinstance(module, bnb.nn.Linear4bit):
            want = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).double()  # bf16-rounded
            torch.testing.assert_close(dense.weight, want, rtol=2**-8, atol=0)
            checked += 1
        elif isinstance(module, (torch.nn.Embedding, torch.nn.Linear)):  # head and embeddings: bnb's bf16, upcast
            assert torch.equal(dense.weight, module.weight.double())
    assert checked == 7 * 2 and ref.dtype == torch.float64


def test_peak_memory_of_a_row_is_measured_in_a_child(tiny_checkpoint):
    pytest.importorskip("transformers")  # the child loads the checkpoint as a row does
    model, path = tiny_checkpoint
    prompt = torch.randint(0, TINY["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(2))
    got = bench_decode.measure_peak_memory("fusedlm DecoderLM fp32", path, prompt, 3)
    assert got["peak_MiB"] > 0 and got["base_MiB"] > 0
    if os.path.exists("/proc/self/clear_refs"):
        assert got["includes_load"] is False
    with torch.inference_mode():  # the child ran the same model: the same greedy tokens
        assert got["tokens"] == bench_decode._trace("fusedlm", model, prompt, 3)[0]
    with pytest.raises(ValueError, match="impl must be one of"):
        bench_decode.measure_peak_memory("llama.cpp", path, prompt, 3)


def test_isa_cap_is_seen_by_the_suite_in_a_capped_process():
    from fusedlm.benchmarks import run

    env = run._capped_environment("avx2")
    code = "from fusedlm import _C; from fusedlm.benchmarks import bench_decode as b; print(_C.detected_isa(), b._isa_cap())"
    detected, cap = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert cap == (detected if detected.startswith("avx512") else "None")  # the note on bitsandbytes is printed then
