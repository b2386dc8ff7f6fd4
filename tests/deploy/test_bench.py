"""`kextless bench`: the summary logic (medians, spreads, paired figures, targets, the table)
without root, and one quick end-to-end run as root."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest

from kextless.deploy.bench.summary import (
    Compare,
    Op,
    Over,
    Row,
    Spec,
    Stat,
    Target,
    check,
    fmt_stat,
    paired,
    render_markdown,
    stat,
    summarise,
)
from kextless.deploy.bench.system import cpu_seconds, rss_bytes
from tests.entry import KEXTLESS


def test_stat_is_median_with_min_max_and_ignores_nan() -> None:
    assert stat([3.0, 1.0, 2.0, math.nan]) == Stat(2.0, 1.0, 3.0, 3)
    assert stat([4.0, 1.0]) == Stat(2.5, 1.0, 4.0, 2)
    assert stat([]) is None
    assert stat([math.nan]) is None


def test_paired_figures_are_per_round() -> None:
    assert paired(Compare.RATIO, [10.0, 20.0], [5.0, 30.0]) == [0.5, 1.5]
    assert paired(Compare.DIFFERENCE, [1.0, 2.0], [1.5, 1.0]) == [0.5, -1.0]
    assert paired(Compare.ABSOLUTE, [], [7.0, 8.0]) == [7.0, 8.0]
    ratio = paired(Compare.RATIO, [0.0], [1.0])
    assert len(ratio) == 1 and math.isnan(ratio[0])  # no division by a zero baseline


def test_targets_on_median_and_on_worst_round() -> None:
    assert check(Target(Op.LE, 0.5), [0.4, 0.6, 0.3]) is True  # median 0.4
    assert check(Target(Op.LE, 0.5), [0.6, 0.6, 0.3]) is False
    assert check(Target(Op.GE, 0.95, higher_is_worse=False), [0.96, 0.90, 0.97]) is True
    # A safety target: one bad round is a miss, whatever the median says.
    assert check(Target(Op.EQ, 0, Over.WORST), [0, 0, 3]) is False
    assert check(Target(Op.EQ, 0, Over.WORST), [0, 0, 0]) is True
    assert check(Target(Op.GE, 0.5, Over.WORST, higher_is_worse=False), [0.9, 0.4]) is False
    assert check(Target(Op.LT, 0.2), [0.1, 0.3, 0.19]) is True
    assert check(Target(Op.LT, 0.2), []) is None


def _spec(compare: Compare, target: Target | None = None, unit: str = "ms") -> Spec:
    return Spec("k", "a measure", unit, compare, target)


def test_summarise_fills_stats_and_verdict() -> None:
    row = summarise(
        Row(
            spec=_spec(Compare.DIFFERENCE, Target(Op.LE, 0.5)),
            baseline=[0.1, 0.2, 0.1],
            kextless=[0.5, 0.9, 0.4],
        )
    )
    assert row.figure_rounds == pytest.approx([0.4, 0.7, 0.3])
    assert row.figure_stat is not None and row.figure_stat.median == pytest.approx(0.4)
    assert row.kextless_stat == Stat(0.5, 0.4, 0.9, 3)
    assert row.met is True and row.error is None


def test_summarise_marks_a_row_without_values_failed() -> None:
    row = summarise(Row(spec=_spec(Compare.RATIO, Target(Op.GE, 0.9))))
    assert row.error == "no value measured" and row.met is None
    kept = summarise(Row(spec=_spec(Compare.RATIO), error="iperf3 is not installed"))
    assert kept.error == "iperf3 is not installed"


def test_fmt_stat() -> None:
    assert fmt_stat(Stat(1.234, 1.0, 2.0, 3), "ms") == "1.23 (1.00 to 2.00) ms"
    assert fmt_stat(Stat(0.4, 0.3, 0.7, 3), "ms", signed=True) == "+0.4 (0.3 to 0.7) ms"
    assert fmt_stat(Stat(12345.0, 12345.0, 12345.0, 1), "pkt/s") == "12,345 pkt/s"
    assert fmt_stat(None, "ms") == "—"


def test_markdown_table_rows() -> None:
    rows = [
        summarise(
            Row(
                spec=Spec(
                    "bulk",
                    "TCP bulk",
                    "Gbit/s",
                    Compare.RATIO,
                    Target(Op.GE, 0.95, higher_is_worse=False),
                ),
                baseline=[10.0, 12.0],
                kextless=[9.0, 12.0],
            )
        ),
        summarise(
            Row(
                spec=Spec("lat", "connect | p50", "ms", Compare.DIFFERENCE, Target(Op.LE, 0.5)),
                baseline=[0.1],
                kextless=[1.1],
            )
        ),
        summarise(
            Row(
                spec=Spec("lost", "lost", "pkts", Compare.ABSOLUTE, Target(Op.EQ, 0, Over.WORST)),
                kextless=[0.0, 5.0],
            )
        ),
        summarise(Row(spec=_spec(Compare.RATIO), error="RuntimeError: no iperf3\nsecond line")),
    ]
    md = render_markdown(rows, "Machine: test")
    lines = md.splitlines()
    assert lines[0] == "| measure | baseline | kextless | ratio / difference | target | met? |"
    assert lines[2] == (
        "| TCP bulk | 11.0 (10.0 to 12.0) Gbit/s | 10.5 (9.00 to 12.0) Gbit/s "
        "| 0.95 (0.9 to 1.00) x | >= 0.95x baseline | yes |"
    )
    # A `|` in a title cannot break the table; a miss is bold.
    assert lines[3] == "| connect / p50 | 0.1 ms | 1.10 ms | +1.00 ms | <= 0.5 ms | **no** |"
    assert (
        lines[4] == "| lost | n/a | 2.50 (0 to 5.00) pkts | — | == 0 pkts (every round) | **no** |"
    )
    assert lines[5] == (
        "| a measure | — | failed: RuntimeError: no iperf3 second line | — | — | failed |"
    )
    assert all(line.count("|") == 7 for line in lines[:6])
    assert md.rstrip().endswith("Machine: test")


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_bench_quick_end_to_end(tmp_path: Path) -> None:
    """`kextless bench --quick` writes JSON, Markdown and PNG; every row has a value or a
    stated failure; and it leaves no namespace behind."""
    out = tmp_path / "out"
    res = subprocess.run(
        [*KEXTLESS, "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert (out / "bench.json").is_file(), res.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    png = (out / "connect-latency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert doc["machine"]["cpus"] and doc["machine"]["kernel"]
    assert doc["elapsed_s"] < 60, doc["elapsed_s"]
    keys = {r["spec"]["key"] for r in doc["rows"]}
    for want in ("tcp_bulk", "udp_throughput", "connect_p50_v6_client", "connect_rate_policy",
                 "update_no_more_bytes", "memory_per_connection", "idle_cpu_client",
                 "udp_new_flow_p50_client", "unexamined_max"):  # fmt: skip
        assert want in keys
    for r in doc["rows"]:
        has_value = r["figure_stat"] is not None and r["kextless"]
        assert has_value or r["error"], r
        assert r["spec"]["title"] in md
        if r["error"]:
            assert "failed:" in md
    assert md in res.stdout  # the table is printed too
    assert doc["problems"] == [], doc["problems"]
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    assert "kxb-" not in leftover.stdout


def test_cpu_seconds_counts_this_process_busy_time() -> None:
    """The idle figure rests on it: schedstat nanoseconds of every thread."""
    before = cpu_seconds([os.getpid()])
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    spent = cpu_seconds([os.getpid()]) - before
    assert 0.15 < spent < 1.0, spent
    assert cpu_seconds([2**22 + 12345]) == 0.0  # a gone process counts nothing
    assert rss_bytes([os.getpid()]) > 1 << 20
