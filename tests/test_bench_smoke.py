"""The benchmark's report: ratios per repeat, targets on the medians, valid JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import Figure, Target, percentile, render, to_json, write


def _latency(values: list[float]) -> Figure:
    return Figure(
        "latency.grpc.median",
        "latency gRPC median",
        "ms",
        values,
        "bare spawn median",
        "ms",
        [1.0, 2.0, 1.0],
        target=Target("<= 3x", "ratio", 3.0),
    )


def test_ratios_pair_repeats_and_targets_use_medians(tmp_path: Path) -> None:
    passing = _latency([2.0, 5.0, 2.5])
    missing = _latency([4.0, 8.0, 3.5])
    memory = Figure(
        "memory.per_result",
        "RSS per held result",
        "B",
        [4000.0],
        "output bytes held",
        "B",
        [1024.0],
        target=Target("<= +2 KiB", "excess", 2048),
    )
    absent = Figure.missing("exec_delay", "submit to exec", "no runner without cgroups")

    assert passing.ratios == [2.0, 2.5, 2.5]
    assert (passing.result, missing.result) == ("PASS", "MISS")
    assert memory.result == "MISS"  # 4000 - 1024 > 2048
    assert absent.result == "n/a"

    out = tmp_path / "results" / "bench.json"
    write(out, to_json([passing, memory, absent], {"repeats": 3}))
    data = json.loads(out.read_text())
    first = data["figures"][0]
    assert first["ratio"] == {"min": 2, "median": 2.5, "max": 2.5, "all": [2, 2.5, 2.5]}
    assert first["baseline"]["median"] == 1.0
    assert [f["result"] for f in data["figures"]] == ["PASS", "MISS", "n/a"]
    assert data["figures"][2]["unavailable"] == "no runner without cgroups"

    table = render([passing, absent], "heading")
    assert "2.50x [2.00-2.50]" in table
    assert "no runner without cgroups" in table


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 301)]
    assert percentile(values, 99) == 297.0
    assert percentile(values, 50) == 150.0
    assert percentile([5.0], 99) == 5.0
