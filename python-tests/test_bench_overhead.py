"""The pairing and quantile math of bench/overhead.py (pure; no server, no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import overhead  # noqa: E402


def test_rotation_starts_each_round_with_the_next_variant() -> None:
    assert [overhead.rotation(3, r) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_quantile_interpolates_between_ranks_like_the_rust_side() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert overhead.quantile(xs, 0.5) == 2.5
    assert overhead.quantile(xs, 0.25) == 1.75
    assert overhead.quantile(xs, 0.75) == 3.25
    assert overhead.quantile(xs, 0.0) == 1.0
    assert overhead.quantile(xs, 1.0) == 4.0
    assert overhead.quantile([5.0, 1.0, 3.0], 0.5) == 3.0
    assert overhead.quantile([7.0], 0.25) == 7.0  # one round works (statistics.quantiles would raise)
    assert overhead.quantile(xs, 2.0) == 4.0
    with pytest.raises(ValueError):
        overhead.quantile([], 0.5)


def test_paired_ratio_ignores_load_that_hits_both_sides_of_a_round() -> None:
    bare = [10.0, 20.0, 30.0]
    p = overhead.paired([10.5, 21.0, 45.0], bare)
    assert p["ratio"] == pytest.approx(0.05)
    assert p["ratio_q1"] == pytest.approx(0.05)
    assert p["ratio_q3"] == pytest.approx(0.275)
    assert p["added"] == pytest.approx(1.0)


def test_summarise_rows_carry_medians_and_spread() -> None:
    # (wall, cpu) per round; the bare transport first.
    bare = [(10e-6, 5e-6), (20e-6, 10e-6), (30e-6, 15e-6)]
    variant = [(11e-6, 6e-6), (21e-6, 11e-6), (33e-6, 16e-6)]
    rows = overhead.summarise(["bare", "v"], [bare, variant])
    assert [r["variant"] for r in rows] == ["bare", "v"]
    assert rows[0]["overhead_ratio"] == rows[0]["cpu_overhead_ratio_q3"] == 0.0
    v = rows[1]
    assert v["us_per_request"] == pytest.approx(21.0)
    assert v["added_us"] == pytest.approx(1.0)
    assert (v["overhead_ratio_q1"], v["overhead_ratio"], v["overhead_ratio_q3"]) == pytest.approx((0.075, 0.1, 0.1))
    assert v["cpu_overhead_ratio"] == pytest.approx(0.1)
    text = overhead.table(rows)
    assert "10.0 % (7.5–10.0)" in text
    assert "0.0 % (0.0–0.0)" in text


def test_table_reads_rows_without_quartiles() -> None:
    row = {"variant": "old", "us_per_request": 30.0, "requests_per_s": 33333.0, "added_us": 1.5, "overhead_ratio": 0.041}
    line = overhead.table([row]).splitlines()[1]
    assert "4.1 %" in line and "(" not in line
