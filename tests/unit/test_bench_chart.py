"""The benchmark chart reads the report's Targets table (the one source of its numbers) and
orients every target so that right of 1 is met, whichever way the target points."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import chart
from bench.report import Results, markdown

REPORT = """\
Run: 2026-12-03 11:44 UTC, 20 warm / 5 cold repetitions, 8.1 min.

## Targets

| target | gateway (median ratio) | met? |
| --- | ---: | --- |
| warm login ≤ 0.2× DIY | 0.51× | **not met** |
| exec stream up ≥ 1.5× DIY (throughput) | 1.70× | met |
| sftp get ≥ 1.0× plain OpenSSH | 0.89× | **not met** |
| cold first login ≤ 1.5× raw `docker run` + ready | 1.05× | met |
| load (100 sessions, 20 users): 0 failures | 0 of 400 | met |
| load: ≤ 1 MiB gateway RSS per idle session | 2.09 MiB | **not met** |

## Notes from this run

| not | a target | 9.99× |
"""


def test_targets_are_read_from_the_report_and_oriented() -> None:
    points = chart.from_markdown(REPORT)
    assert [(p.text[:10], p.ratio, p.op, p.bound) for p in points] == [
        ("warm login", 0.51, "≤", 0.2), ("exec strea", 1.70, "≥", 1.5),
        ("sftp get ≥", 0.89, "≥", 1.0), ("cold first", 1.05, "≤", 1.5)]
    assert [p.met for p in points] == [False, True, False, True]
    assert points[0].score == pytest.approx(0.2 / 0.51)
    assert points[1].score == pytest.approx(1.70 / 1.5)


def test_a_report_without_targets_is_an_error() -> None:
    with pytest.raises(ValueError, match="Targets"):
        chart.from_markdown("# Benchmarks\n")


def test_the_generated_report_round_trips(tmp_path: Path) -> None:
    res = Results()
    for v in (0.10, 0.12, 0.11):
        res.add("warm_login", "gateway", "s", v)
        res.add("warm_login", "diy", "s", v * 4)
    text = markdown(res, "test plan", [], 1.0, None, "report.png")
    assert "](report.png)" in text.split("## Machine")[0]  # the chart leads the report
    (points,) = [p for p in chart.from_markdown(text) if p.text.startswith("warm login")]
    assert points.ratio == pytest.approx(0.25) and not points.met
    report = tmp_path / "report.md"
    report.write_text(text)
    png = chart.redraw(report)
    assert png == tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
