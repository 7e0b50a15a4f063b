"""`fusedlm bench --suite training` on a tiny shape: every case has its FLOP floor, and the rates,
floor ratios and peak memory the table shows."""
import pytest

from fusedlm.benchmarks import bench_peft, bench_training
from fusedlm.benchmarks._harness import Row

TINY = dict(n_layers=1, d_model=64, n_heads=4, d_ff=128, seq=16, batch=2)


def test_floor_flops_of_sft_and_dpo():
    p = 1 * (4 * 64 * 64 + 3 * 64 * 128) + 64 * bench_training.V
    assert bench_training.floor_flops(TINY, "sft") == (6 * p * 2 * 16, p)
    assert bench_training.floor_flops(TINY, "dpo") == (8 * p * 2 * 16, p)  # + the frozen reference's forward


def test_tiny_run_fills_every_column(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(bench_training, "_shape", lambda full: TINY)
    monkeypatch.setattr(bench_training, "_round_fns", lambda fns, *a: fns)  # trl's trainers: not in a unit test
    monkeypatch.setattr(bench_peft, "gemm_peak", lambda calls=8, suite="training", bf16=True: {
        k: Row(suite, "GEMM peak", k, 1.0, {"GFLOP/s": rate}, floor=True) for k, rate in (("fp32", 100.0), ("bf16", 200.0))})
    rows = bench_training.run(full=False)
    sft = [r for r in rows if r.case.startswith("SFT")]
    dpo = [r for r in rows if r.case.startswith("DPO")]
    assert [r.impl for r in sft] == ["fusedlm Trainer", "transformers + AdamW loop", "FLOP floor 6·P·T at the fp32 GEMM peak"]
    assert [r.impl for r in dpo] == ["fusedlm Trainer + DPO", "FLOP floor 8·P·T at the fp32 GEMM peak"]
    for case, kind in ((sft, "sft"), (dpo, "dpo")):
        *timed, floor = case
        flops, p = bench_training.floor_flops(TINY, kind)
        assert floor.floor and floor.extra["P"] == p and floor.ms == pytest.approx(flops / 100.0 / 1e6)
        for r in timed:
            assert r.extra["GFLOP/s"] == pytest.approx(flops / r.ms / 1e6)
            assert r.extra["x_floor"] == pytest.approx(r.ms / floor.ms)
            assert r.extra["peak_MiB"] > 0 and r.extra["tok_per_s"] > 0
