"""`fusedlm bench --suite peft`'s fine-tuning cases on a tiny shape: same weights on both sides,
the FLOP floor counted as documented, every column the table shows filled in."""
import pytest

from fusedlm.benchmarks import bench_peft
from fusedlm.benchmarks._harness import Row

TINY = dict(d=64, layers=2, heads=4, d_ff=128, vocab=256, seq=16, batch=2)


def test_floor_flops_counts_the_projections_and_the_head():
    flops, p = bench_peft.floor_flops(TINY)
    per_layer = 4 * 64 * 64 + 3 * 64 * 128  # q, k, v, o (MHA) + gate, up, down
    assert p == 2 * per_layer + 64 * 256
    assert flops == 4 * p * 2 * 16  # 4·P·T, T = batch · seq


def _peak():
    return {name: Row("peft", "GEMM peak", f"torch {name} matmul", 1.0, {"GFLOP/s": rate}, floor=True)
            for name, rate in (("fp32", 100.0), ("bf16", 200.0))}


@pytest.mark.parametrize("method", ["LoRA", "QLoRA"])
def test_fine_tuning_case_rows(method):
    pytest.importorskip("transformers")  # the checkpoint both sides load
    pytest.importorskip("peft")
    if method == "QLoRA":
        pytest.importorskip("bitsandbytes")
    path = bench_peft._checkpoint(TINY)
    rows = bench_peft._fine_tuning(TINY, path, method, "fp32", _peak(), reps=1)
    ours, peer, floor = rows
    assert ours.impl == f"fusedlm {method}" and peer.impl.startswith("peft") and floor.floor
    assert ours.extra["loss_diff"] < 1e-3  # the same weights and data on both sides (first step, before any update)
    flops, p = bench_peft.floor_flops(TINY)
    assert floor.extra["P"] == p and floor.ms == pytest.approx(flops / 100.0 / 1e6)  # at the fp32 GEMM rate given
    for row in (ours, peer):
        assert row.extra["GFLOP/s"] == pytest.approx(flops / row.ms / 1e6)
        assert row.extra["x_floor"] == pytest.approx(row.ms / floor.ms)
        assert row.extra["peak_MiB"] > 0
    assert ours.extra["peak_vs_peer"] == pytest.approx(ours.extra["peak_MiB"] / peer.extra["peak_MiB"])
    assert ours.extra["trainable"] == peer.extra["trainable"]


def test_gemm_peak_rows_report_a_rate():
    rows = bench_peft.gemm_peak(calls=2)
    assert set(rows) == {"fp32", "bf16"}
    assert all(r.floor and r.extra["GFLOP/s"] > 0 for r in rows.values())
    assert set(bench_peft.gemm_peak(calls=1, bf16=False)) == {"fp32"}  # no emulated bf16 GEMM where no bf16 case runs


def test_refloor_moves_the_floor_and_the_ratios_to_a_faster_peak():
    rows = [Row("peft", "c", "fusedlm LoRA", 20.0, {"x_floor": 2.0}), Row("peft", "c", "peft", 30.0, {"x_floor": 3.0}),
            Row("peft", "c", "FLOP floor 4·P·T at the bf16 GEMM peak", 10.0, {"GFLOP": 2.0, "GEMM GFLOP/s": 200.0}, floor=True)]
    bench_peft._refloor(rows, {"fp32": Row("peft", "p", "fp32", 1.0, {"GFLOP/s": 100.0}),
                               "bf16": Row("peft", "p", "bf16", 1.0, {"GFLOP/s": 400.0})})
    assert rows[2].ms == pytest.approx(5.0) and rows[2].extra["GEMM GFLOP/s"] == 400.0  # 2 GFLOP at 400 GFLOP/s
    assert rows[0].extra["x_floor"] == pytest.approx(4.0) and rows[1].extra["x_floor"] == pytest.approx(6.0)
