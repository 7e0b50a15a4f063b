"""`fusedlm bench --suite decode` on tiny shapes: every group runs, rows carry what the table shows."""
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
    rows = bench_decode.run(shape=TINY, sizes=dict(n_layers=2, prompt=5, new=3))
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
