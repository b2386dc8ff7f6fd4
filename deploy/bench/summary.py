"""The bench's statistics and its table: pure, so they are unit-tested without root.

Every figure is paired per round (kextless round i against baseline round i, rounds alternate),
then summarised as the median with the min-max spread; a target is checked against the median,
or against the worst round where the target is about safety (a lost connection, an unexamined
packet: one bad round is a miss).
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence

import msgspec


class Compare(enum.Enum):
    """How a figure relates kextless to its baseline."""

    RATIO = "ratio"  # kextless / baseline
    DIFFERENCE = "difference"  # kextless - baseline
    ABSOLUTE = "absolute"  # kextless alone (the baseline has nothing to compare)


class Op(enum.Enum):
    LE = "<="
    GE = ">="
    LT = "<"
    EQ = "=="


class Over(enum.Enum):
    """Which per-round value a target is checked on."""

    MEDIAN = "median"
    WORST = "worst"


class Target(msgspec.Struct, frozen=True):
    op: Op
    value: float
    over: Over = Over.MEDIAN
    #: Larger is worse (latency, loss) unless False (throughput); picks the worst round.
    higher_is_worse: bool = True

    def text(self, compare: Compare, unit: str) -> str:
        what = "x baseline" if compare is Compare.RATIO else unit
        if compare is Compare.RATIO:
            return f"{self.op.value} {self.value:g}{what}"
        shown = f"{self.op.value} {_num(self.value)} {what}".rstrip()
        return shown + (" (every round)" if self.over is Over.WORST else "")


class Spec(msgspec.Struct, frozen=True):
    """One row of the table: what is measured and what it must reach."""

    key: str
    title: str
    unit: str
    compare: Compare
    target: Target | None = None


class Stat(msgspec.Struct, frozen=True):
    median: float
    low: float
    high: float
    n: int


class Row(msgspec.Struct, kw_only=True):
    """A measured row: the raw per-round values and, once summarised, the statistics."""

    spec: Spec
    baseline: list[float] = msgspec.field(default_factory=list)
    kextless: list[float] = msgspec.field(default_factory=list)
    error: str | None = None
    note: str | None = None
    baseline_stat: Stat | None = None
    kextless_stat: Stat | None = None
    figure_stat: Stat | None = None
    figure_rounds: list[float] = msgspec.field(default_factory=list)
    met: bool | None = None


def stat(values: Sequence[float]) -> Stat | None:
    """Median and min-max of the finite values; None when there are none."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return None
    return Stat(statistics.median(vals), min(vals), max(vals), len(vals))


def paired(compare: Compare, baseline: Sequence[float], kextless: Sequence[float]) -> list[float]:
    """The figure of each round: kextless round i against baseline round i."""
    if compare is Compare.ABSOLUTE:
        return list(kextless)
    out = []
    for b, k in zip(baseline, kextless, strict=False):
        if compare is Compare.DIFFERENCE:
            out.append(k - b)
        else:
            out.append(k / b if b else math.nan)
    return out


def check(target: Target, rounds: Sequence[float]) -> bool | None:
    """Whether the target holds (on the median, or on the worst round); None: no value."""
    vals = [v for v in rounds if math.isfinite(v)]
    if not vals:
        return None
    if target.over is Over.WORST:
        value = max(vals) if target.higher_is_worse else min(vals)
    else:
        value = statistics.median(vals)
    if target.op is Op.LE:
        return value <= target.value
    if target.op is Op.GE:
        return value >= target.value
    if target.op is Op.LT:
        return value < target.value
    return value == target.value


def summarise(row: Row) -> Row:
    """Fill in the statistics and the target's verdict from the raw rounds (in place)."""
    row.baseline_stat = stat(row.baseline)
    row.kextless_stat = stat(row.kextless)
    row.figure_rounds = paired(row.spec.compare, row.baseline, row.kextless)
    row.figure_stat = stat(row.figure_rounds)
    if row.error is None and row.figure_stat is None:
        row.error = "no value measured"
    row.met = (
        check(row.spec.target, row.figure_rounds)
        if row.spec.target is not None and row.error is None
        else None
    )
    return row


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 0.01:
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return f"{v:.2g}"


def fmt_stat(s: Stat | None, unit: str, signed: bool = False) -> str:
    """`median (min to max) unit`, or `—` without a value."""
    if s is None:
        return "—"
    sign = "+" if signed and s.median > 0 else ""
    med = sign + _num(s.median)
    spread = "" if s.n < 2 else f" ({_num(s.low)} to {_num(s.high)})"
    return f"{med}{spread} {unit}".rstrip()


def render_markdown(rows: Sequence[Row], rounds_note: str = "") -> str:
    """The results table: measure, baseline, kextless, ratio/difference, target, met?"""
    lines = [
        "| measure | baseline | kextless | ratio / difference | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        spec = r.spec
        title = _cell(spec.title)
        if r.error is not None:
            lines.append(
                f"| {title} | — | failed: {_cell(r.error)} | — | {_target(spec)} | failed |"
            )
            continue
        # An absolute figure shows the baseline's own value when it has one (lost connections).
        base = fmt_stat(r.baseline_stat, spec.unit) if r.baseline else "n/a"
        kext = fmt_stat(r.kextless_stat, spec.unit)
        if spec.compare is Compare.RATIO:
            fig = fmt_stat(r.figure_stat, "x")
        elif spec.compare is Compare.DIFFERENCE:
            fig = fmt_stat(r.figure_stat, spec.unit, signed=True)
        else:
            fig = "—"
        met = {True: "yes", False: "**no**", None: "—"}[r.met]
        note = f" ({_cell(r.note)})" if r.note else ""
        lines.append(f"| {title}{note} | {base} | {kext} | {fig} | {_target(spec)} | {met} |")
    table = "\n".join(lines)
    return f"{table}\n\n{rounds_note}".rstrip() + "\n"


def _target(spec: Spec) -> str:
    return "—" if spec.target is None else spec.target.text(spec.compare, spec.unit)


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "/").split())[:160]
