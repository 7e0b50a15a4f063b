"""The tour's report: checks and claims, the markdown, summary.json."""
import json

import pytest

from fusedlm.tour.report import Section, Table, fmt, write


@pytest.mark.parametrize("expect, before, after, held", [("up", 0.1, 0.2, True), ("up", 0.2, 0.2, False),
                                                         ("down", 3.0, 1.0, True), ("down", 1.0, 3.0, False)])
def test_check_direction(expect, before, after, held):
    sec = Section("k", "T")
    c = sec.check("m", before, after, expect)
    assert c.passed is held and not c.claim
    assert sec.claim("m", before, after, expect).claim


def test_missing_marks_the_section():
    sec = Section("k", "T")
    sec.missing("fusedlm.x missing")
    assert sec.status == "not available" and "not available: fusedlm.x missing" in sec.text[-1]
    sec = Section("k", "T", tables=[Table("t", ["a"], [[1]])])
    sec.missing("a part")
    assert sec.status == "partial"


@pytest.mark.parametrize("value, text", [(True, "yes"), (False, "**no**"), (None, "–"), (float("nan"), "–"),
                                         (1234567, "1,234,567"), (0.123456, "0.1235"), (123456.7, "123,457")])
def test_fmt(value, text):
    assert fmt(value) == text


def test_write(tmp_path):
    sec = Section("one", "First", text=["hello", Table("inline", ["x", "y"], [[1, 2.5]])])
    sec.tables.append(Table("after", ["z"], [["w"]]))
    sec.check("loss", 2.0, 1.0, "down")
    path = write(str(tmp_path), ["# title"], [sec])
    report = open(path).read()
    assert report.index("hello") < report.index("**inline**") < report.index("**after**")
    assert "| First | stage | loss | 2 | 1 | down | yes |" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sections"][0]["checks"][0] == {"stage": "First", "metric": "loss", "before": 2.0, "after": 1.0,
                                                "expect": "down", "passed": True, "claim": False}
