"""The benchmark runner behind `fusedlm bench`: table, JSON, chart, suite selection."""
import json
import subprocess
import sys
import types

from fusedlm.benchmarks import _harness, run


def _rows():
    return [
        _harness.Row("toy", "n=8", "fusedlm[cpu]", 2.0, {"GB/s": 12.5}),
        _harness.Row("toy", "n=8", "peer", 5.0),
        _harness.Row("toy", "n=8", "fusedlm[reference]", 8.0),
    ]


def test_ratio_table_compares_with_the_first_fusedlm_row():
    table = _harness.ratio_table(_rows())
    assert "| toy | n=8 | peer | 5.000 | 2.50x |" in table
    assert "| toy | n=8 | fusedlm[reference] | 8.000 | 4.00x |" in table
    assert "GB/s=12.5" in table


def test_ratio_table_shows_the_times_after_a_torch_op_beside_the_times_alone():
    rows = _rows()
    rows[0].ms_after_torch, rows[1].ms_after_torch = 2.5, 5.5
    table = _harness.ratio_table(rows)
    assert "ms after torch op" in table
    assert "| toy | n=8 | peer | 5.000 | 2.50x | 5.500 | 2.20x |" in table
    assert "| toy | n=8 | fusedlm[reference] | 8.000 | 4.00x |  |  |" in table


def test_timed_runs_the_torch_op_before_each_call_of_the_second_timing(monkeypatch):
    calls = []
    monkeypatch.setattr(_harness, "torch_op", lambda: lambda: calls.append("torch"))
    row = _harness.timed("toy", "n=8", "fusedlm[cpu]", lambda: calls.append("op"), {"k": 1},
                         warmup=0, min_repeat=2, max_repeat=2, min_seconds=0.0)
    assert calls == ["op", "op", "torch", "op", "torch", "op"]
    assert row.ms > 0 and row.ms_after_torch > 0 and row.extra == {"k": 1}


def test_write_results_writes_json_with_machine_and_a_chart(tmp_path):
    json_path, png_path = _harness.write_results(_rows(), str(tmp_path))
    data = json.loads(open(json_path).read())
    assert data["machine"]["torch"] and data["machine"]["torch_threads"] >= 1
    assert [r["impl"] for r in data["rows"]] == ["fusedlm[cpu]", "peer", "fusedlm[reference]"]
    assert png_path is None or open(png_path, "rb").read(4) == b"\x89PNG"


def test_timeit_returns_a_positive_median():
    assert _harness.timeit(lambda: sum(range(100)), warmup=1, min_repeat=3, min_seconds=0.0) > 0


def test_runner_runs_the_chosen_suite(tmp_path, monkeypatch, capsys):
    toy = types.ModuleType("fusedlm.benchmarks.bench_toy")
    toy.run = lambda full: _rows()
    monkeypatch.setitem(sys.modules, "fusedlm.benchmarks.bench_toy", toy)
    monkeypatch.setitem(run.SUITES, "toy", "bench_toy")
    assert run.main(["--suite", "toy", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== toy (quick set) ==" in out and "2.50x" in out
    assert (tmp_path / "results.json").exists()


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "fusedlm.cli", "--help"], capture_output=True, text=True, check=True)
    assert "fusedlm bench" in result.stdout


def test_header_names_the_simd_levels():
    info = _harness.machine_info()
    text = _harness.header(info)
    assert info["fusedlm_isa"] in text and info["torch_cpu_capability"] in text


def test_isa_flag_caps_fusedlm_and_torch_in_a_fresh_process():
    env = run._capped_environment("avx2")
    assert env["FUSEDLM_MAX_ISA"] == "avx2" and env["ATEN_CPU_CAPABILITY"] == "avx2"
    code = "from fusedlm.benchmarks import _harness; i = _harness.machine_info(); print(i['fusedlm_isa'], i['torch_cpu_capability'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in ("scalar", "avx2") and out[1] in ("DEFAULT", "AVX2")  # capped, or this CPU has less


# ---- bad arguments fail at once, before any suite runs --------------------------------------------
def _no_suite(monkeypatch):
    toy = types.ModuleType("fusedlm.benchmarks.bench_toy")

    def never(full):
        raise AssertionError("a suite ran")

    toy.run = never
    monkeypatch.setitem(sys.modules, "fusedlm.benchmarks.bench_toy", toy)
    monkeypatch.setitem(run.SUITES, "toy", "bench_toy")


def test_bad_arguments_fail_before_any_suite(tmp_path, monkeypatch, capsys):
    import pytest

    _no_suite(monkeypatch)
    (tmp_path / "file").write_text("x")
    cases = [
        (["--threads", "-1"], "argument --threads: must be >= 1, got -1"),
        (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
        (["--threads", "two"], "argument --threads: expected an integer, got 'two'"),
        (["--suite", "nosuch"], "argument --suite: invalid choice: 'nosuch'"),
        (["--isa", "sse"], "argument --isa: invalid choice"),
        # an unwritable --out used to fail after every suite ran (a --full run lost everything)
        (["--suite", "toy", "--full", "--out", str(tmp_path / "file" / "out")], f"--out {tmp_path / 'file' / 'out'} cannot be created"),
        (["--suite", "toy", "--out", str(tmp_path / "file")], "exists and is not a folder"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            run.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_results_are_written_atomically(tmp_path, monkeypatch):
    # a crash while results.json is written (here: the final rename fails) leaves the previous one whole
    import pytest

    from fusedlm import _io

    _harness.write_results(_rows(), str(tmp_path))
    before = (tmp_path / "results.json").read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(_io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _harness.write_results(_rows()[:1], str(tmp_path))
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_text() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


# ---- the chart: one panel per suite; only peers are wins or losses -------------------------------
def test_kind_of_tells_peers_from_context_and_limits():
    import pytest

    Row = _harness.Row
    assert _harness.kind_of(Row("s", "c", "bitsandbytes", 1.0)) == "peer"
    assert _harness.kind_of(Row("s", "c", "fusedlm[reference]", 1.0)) == "context"  # fusedlm's own reference
    assert _harness.kind_of(Row("s", "c", "torch reference (eager)", 1.0)) == "context"
    assert _harness.kind_of(Row("s", "c", "fusedlm LoRA r=16", 1.0)) == "context"  # against fusedlm full fine-tuning
    assert _harness.kind_of(Row("s", "c", "read bound", 1.0, floor=True)) == "limit"
    # a suite says it where the name does not: fusedlm's kernels inside transformers
    assert _harness.kind_of(Row("s", "c", "transformers + fusedlm apply()", 1.0, kind="context")) == "context"
    with pytest.raises(ValueError, match="Row.kind must be one of"):
        _harness.kind_of(Row("s", "c", "x", 1.0, kind="rival"))


def test_chart_has_a_panel_per_suite_and_colours_only_peers(tmp_path):
    import pytest

    Row = _harness.Row
    rows = _rows() + [
        Row("other", "m=1", "fusedlm[cpu]", 1.0), Row("other", "m=1", "fast peer", 0.5),
        Row("other", "m=1", "apply() in transformers", 3.0, kind="context"), Row("other", "m=1", "bound", 0.25, floor=True),
        Row("other", "no fusedlm row", "peer alone", 1.0), Row("other", "m=1", "bitsandbytes (not installed)", float("nan")),
    ]
    panels = _harness._chart_bars(rows)
    assert list(panels) == ["toy", "other"]
    assert [(ratio, kind) for _, ratio, kind in panels["toy"]] == [(2.5, "peer"), (4.0, "context")]
    assert [(ratio, kind) for _, ratio, kind in panels["other"]] == [(0.5, "peer"), (3.0, "context"), (0.25, "limit")]
    # only a peer is a win or a loss; a context bar below 1 is grey, never red
    assert _harness.bar_style(0.5, "peer") == ("tab:red", "") and _harness.bar_style(2.5, "peer") == ("tab:green", "")
    assert _harness.bar_style(0.5, "context") == _harness.bar_style(4.0, "context") == ("darkgrey", "")
    assert _harness.bar_style(0.25, "limit") == ("lightgrey", "//")
    pytest.importorskip("matplotlib")
    png = _harness._chart(rows, _harness.machine_info(), str(tmp_path / "chart.png"))
    assert png == str(tmp_path / "chart.png") and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
