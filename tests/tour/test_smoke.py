"""`fusedlm tour --smoke`: every section runs, the report and every plot exist, and each training
stage's metric moved the right way (the measured textbook claims are reported, not asserted)."""
import json
import re

import pytest

for _module in ("matplotlib", "tokenizers", "tqdm", "bm25s"):
    pytest.importorskip(_module, reason=f"the tour needs {_module} (pip install fusedlm[tour])")

from fusedlm.tour import main  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("tour-smoke")
    # one thread: a busy machine (other tests, other jobs) makes two threads of tiny ops spin and crawl
    rc = main(["--smoke", "--out", str(out), "--seed", "0", "--threads", "1"])
    return out, rc, json.loads((out / "summary.json").read_text())


def test_every_section_ran(smoke):
    out, rc, summary = smoke
    assert rc == 0
    status = {s["key"]: s["status"] for s in summary["sections"]}
    assert list(status) == ["world", "architectures", "masks", "pretraining", "alignment", "finetuning", "decoding",
                            "hallucination", "inference"]
    assert set(status.values()) == {"ok"}, status


def test_report_and_plots_exist(smoke):
    out, _, summary = smoke
    report = (out / "report.md").read_text()
    assert (out / "tokenizer.json").stat().st_size > 0
    plots = [p for s in summary["sections"] for p in s["plots"]]
    assert len(plots) >= 6
    for p in plots:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
        assert f"]({p})" in report
    for s in summary["sections"]:
        assert re.search(rf"^## \d+\. {re.escape(s['title'])}$", report, re.M), s["title"]


def test_each_stage_moved_the_right_way(smoke):
    _, _, summary = smoke
    stages = [c for s in summary["sections"] for c in s["checks"] if not c["claim"]]
    assert len(stages) >= 15
    failed = [f"{c['stage']}: {c['metric']} {c['before']} -> {c['after']} (expected {c['expect']})"
              for c in stages if not c["passed"]]
    assert not failed, "\n".join(failed)


def _pretraining_numbers(summary: dict) -> list:
    return [(c["metric"], c["before"], c["after"]) for s in summary["sections"] if s["key"] == "pretraining" for c in s["checks"]]


def test_deterministic_for_a_seed(smoke, tmp_path):
    """The pretraining section alone, run again: the same numbers as in the whole run."""
    _, _, summary = smoke
    assert main(["--smoke", "--out", str(tmp_path), "--seed", "0", "--threads", "1", "--only", "pretraining"]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert _pretraining_numbers(again) == _pretraining_numbers(summary) != []
