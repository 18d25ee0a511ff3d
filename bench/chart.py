"""The chart at the top of docs/benchmarks.md: every target's measured ratio against its goal.

Drawn from the report's own Targets table (one source of numbers: what the table says is what
the picture shows), so `python -m bench.chart [docs/benchmarks.md]` redraws it for a report
written earlier.  Each bar is the distance to the goal, oriented so that right of 1 is met
whatever the target's direction: ratio / goal for "≥" targets, goal / ratio for "≤" ones.
matplotlib is optional (`pip install -e '.[bench]'`): without it the report has no chart."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROW = re.compile(r"^\| (?P<text>.+?) \| (?P<ratio>[0-9.]+)× \| (?P<met>[^|]+) \|$")
GOAL = re.compile(r"(?P<op>[≤≥]) (?P<bound>[0-9.]+)×")


@dataclass(frozen=True)
class Point:
    """One ratio target as measured in one run."""

    text: str  # the target as the report states it, e.g. "sftp get ≥ 1.0× plain OpenSSH"
    ratio: float  # gateway's median over the reference's median
    op: str  # "≤" or "≥"
    bound: float

    @property
    def score(self) -> float:
        """How far to the goal: ≥ 1 means met, whichever way the target points."""
        return self.ratio / self.bound if self.op == "≥" else self.bound / self.ratio

    @property
    def met(self) -> bool:
        return self.score >= 1.0


def from_markdown(text: str) -> list[Point]:
    """The ratio rows of a report's "## Targets" table (load rows, not ratios, are left out)."""
    start = text.find("\n## Targets\n")
    if start < 0:
        raise ValueError("no '## Targets' section in this report")
    points = []
    for line in text[start:].splitlines()[2:]:
        if line.startswith("## "):
            break
        row, goal = ROW.match(line.strip()), GOAL.search(line)
        if row and goal and float(row["ratio"]) > 0:
            points.append(Point(row["text"], float(row["ratio"]), goal["op"],
                                float(goal["bound"])))
    return points


def draw(points: list[Point], path: Path, title: str) -> bool:
    """Write the chart as a PNG; False (and nothing written) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(9, 0.42 * len(points) + 1.4), dpi=100)
    ys = list(range(len(points)))[::-1]
    colors = ["#2e7d32" if p.met else "#c62828" for p in points]
    ax.barh(ys, [p.score for p in points], color=colors, height=0.6)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator([0.25, 0.5, 1, 2]))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_yticks(ys, [p.text for p in points], fontsize=8)
    for y, p in zip(ys, points, strict=True):
        ax.text(p.score, y, f"  {p.ratio:.2f}× (goal {p.op} {p.bound:g}×)", va="center",
                fontsize=7)
    lo = min(0.2, min(p.score for p in points) * 0.8) if points else 0.2
    ax.set_xlim(lo, max(3.0, max((p.score for p in points), default=1) * 2.5))
    ax.set_xlabel("distance to goal (right of 1 = met; green met, red not met), log scale",
                  fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def redraw(report: Path) -> Path | None:
    """Draw the chart of a written report next to it (same name, .png); None without
    matplotlib."""
    text = report.read_text()
    run = re.search(r"^Run: ([^,]+)", text, re.M)
    out = report.with_suffix(".png")
    title = f"dind-gateway: each target, measured in the run of {run[1] if run else '?'}"
    return out if draw(from_markdown(text), out, title) else None


def main(argv: list[str]) -> int:
    report = Path(argv[0]) if argv else Path("docs/benchmarks.md")
    out = redraw(report)
    if out is None:
        print("bench.chart: matplotlib is not installed (pip install -e '.[bench]')",
              file=sys.stderr)
        return 1
    points = from_markdown(report.read_text())
    print(f"wrote {out} ({sum(p.met for p in points)} of {len(points)} ratio targets met)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
