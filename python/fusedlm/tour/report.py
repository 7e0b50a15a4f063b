"""What a tour section hands back, and the report.md / summary.json writers.

A section returns a :class:`Section`: a title, a few lines of text, tables, PNG plots (written by
:func:`plot`), and its *checks*, each with the numbers before and after and whether it held. Two
kinds: a stage check says a training stage did its job ("CLM loss falls", "the reward model
ranks held-out pairs better"): the smoke test asserts those. A claim is a textbook statement
measured ("higher temperature, more diverse text", "RAG raises precision"): reported as it came
out, held or not, never asserted. Both make the summary table.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from .. import _io


@dataclasses.dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list]

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclasses.dataclass
class Check:
    """One measured claim: `metric` went from `before` to `after`; `passed` says it moved the
    expected way (`expect`: "up", "down", or a sentence for claims that are not a before/after)."""

    stage: str
    metric: str
    before: float | None
    after: float | None
    expect: str
    passed: bool
    claim: bool = False  # a measured textbook statement (reported), not a stage check (asserted)


@dataclasses.dataclass
class Section:
    key: str  # file-name friendly: "pretraining"
    title: str
    text: list = dataclasses.field(default_factory=list)  # paragraphs (markdown) or Tables, in order
    tables: list[Table] = dataclasses.field(default_factory=list)
    plots: list[str] = dataclasses.field(default_factory=list)  # PNG paths relative to the report
    checks: list[Check] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    status: str = "ok"  # ok | partial (some part not available) | not available | failed

    def check(self, metric: str, before, after, expect: str = "up", passed: bool | None = None, claim: bool = False) -> Check:
        """Records a stage check; with expect "up"/"down" and passed None, passed = after > / < before."""
        if passed is None:
            passed = after > before if expect == "up" else after < before
        c = Check(self.title, metric, before, after, expect, bool(passed), claim)
        self.checks.append(c)
        return c

    def claim(self, metric: str, before, after, expect: str = "up", passed: bool | None = None) -> Check:
        """Records a measured claim (see the module docstring)."""
        return self.check(metric, before, after, expect, passed, claim=True)

    def missing(self, what: str) -> None:
        """Marks a part of the section as not measurable here (a base package is missing)."""
        self.text.append(f"*not available: {what}*")
        self.status = "partial" if self.tables or self.checks else "not available"


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,d}"
    return "–" if v is None else str(v)


def plot(path: str, draw: Callable, *, figsize=(6.4, 4.0)) -> str:
    """Calls draw(fig) on a new matplotlib figure and saves it to `path` (PNG); returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize)
    draw(fig)
    fig.tight_layout()
    with _io.atomic_file(path) as f:  # DESIGN.md rule 8: a crash leaves the old plot or the new one
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def summary_table(sections: list[Section]) -> Table:
    rows = [[c.stage, "claim" if c.claim else "stage", c.metric, c.before, c.after, c.expect, c.passed]
            for s in sections for c in s.checks]
    return Table("Summary: each stage's metric and each measured claim, before and after",
                 ["section", "kind", "metric", "before", "after", "expected", "held"], rows)


def status_table(sections: list[Section]) -> Table:
    return Table("Sections", ["section", "status", "seconds"], [[s.title, s.status, round(s.seconds, 1)] for s in sections])


def write(out_dir: str, header: list[str], sections: list[Section]) -> str:
    """Writes out_dir/report.md and out_dir/summary.json; returns the report's path."""
    parts = header + ["", status_table(sections).markdown(), "", summary_table(sections).markdown()]
    for i, s in enumerate(sections, 1):
        parts += ["", f"## {i}. {s.title}", ""]
        for t in s.text:
            parts += [t.markdown() if isinstance(t, Table) else t, ""]
        for t in s.tables:
            parts += ["", t.markdown()]
        for p in s.plots:
            parts += ["", f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})"]
    path = os.path.join(out_dir, "report.md")
    _io.write_text(path, "\n".join(parts) + "\n")
    summary = {"sections": [{"key": s.key, "title": s.title, "status": s.status, "seconds": s.seconds,
                             "plots": [os.path.relpath(p, out_dir) for p in s.plots],
                             "checks": [dataclasses.asdict(c) for c in s.checks]} for s in sections]}
    _io.write_json(os.path.join(out_dir, "summary.json"), summary, indent=1)
    return path
