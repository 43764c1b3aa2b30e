"""The serving benchmark's quick mode end to end on a tiny random Llama: every row, the goals, the files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_serving as bench  # noqa: E402


def test_quick_run_writes_every_row_and_the_goals(tmp_path):
    assert bench.main(["--base", "tiny", "--quick", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serving_cpu_quick.json").read_text())
    rows = result["rows"]
    configs = {(r["config"], r["kind"]) for r in rows}
    for expected in [("step:base", ""), ("step:scale", "scale"), ("step:rotation", "rotation"), ("base", ""),
                     ("one", "scale"), ("new", "scale"), ("cached", "scale"), ("one", "rotation"),
                     ("new", "rotation"), ("cached", "rotation"), ("hf:base", ""), ("peft", "scale"),
                     ("merge", "scale"), ("step:cached", "scale"), ("step:cached", "rotation"), ("http:base", ""),
                     ("http:cached", "scale"), ("http:cached", "rotation"), ("prefill:base", ""),
                     ("prefill:scale", "scale"), ("prefill:rotation", "rotation")]:
        assert expected in configs, expected
    settings = result["settings"]
    for r in rows:
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["ratio"] > 0 and r["cpu_ratio"] > 0
        if not r["config"].startswith(("step:", "prefill:")):
            assert r["requests"] in (settings["requests"], settings["merge_requests"])
            assert r["ttft_p50_s"] is not None and r["ttft_p50_s"] <= r["p50_s"]
    engine_runs = [r for r in rows if r["config"] in ("one", "new", "cached")]
    for r in engine_runs:  # compared to base runs that exist, before and after it
        assert r["base_runs"] and all(rows[i]["config"] == "base" for i in r["base_runs"])
        assert r["tokens"] == settings["requests"] * settings["max_tokens"]
    assert all(r["fuse_ms_per_mixture"] is not None for r in rows if r["config"] == "new")
    for r in rows:
        if r["config"] == "http:cached":  # served by `specfuse serve`: every token generated, against base runs
            assert r["tokens"] == settings["requests"] * settings["max_tokens"]
            assert len(r["base_runs"]) == 2 and all(rows[i]["config"] == "http:base" for i in r["base_runs"])
    cached = {(r["kind"], r["n_adapters"], r["m"]) for r in rows if r["config"] == "cached"}
    assert cached == {(r["kind"], r["n_adapters"], r["m"]) for r in rows if r["config"] == "step:cached"}
    prefill = [r for r in rows if r["config"] == "prefill:scale"][0]  # paired with the base prefill, not runs
    assert result["goals"]["diagonal"]["prefill_ratio"] == prefill["ratio"] and 0.5 < prefill["ratio"] < 5
    assert set(result["goals"]["diagonal_step_by_n"]) == {"1", "4"} and result["goals"]["diagonal_step_spread_by_m"]
    assert result["goals"]["diagonal"]["http_ratio_median"] > 0 and result["goals"]["diagonal_step_spread"] is not None
    assert {"diagonal", "dense", "diagonal_cached_spread", "fuse_ms_per_mixture"} <= set(result["goals"])
    assert result["machine"]["threads"] == 1 and len(result["machine"]["load_average_at_end"]) == 3
    assert result["command"].endswith("--quick --out-dir " + str(tmp_path))
    md = (tmp_path / "serving_cpu_quick.md").read_text()
    assert "| step:scale |" in md and "Goals (issue 16)" in md
    assert (tmp_path / "serving_cpu_quick.png").stat().st_size > 0


def test_new_mixture_summary_takes_the_median_round_and_pools_the_ready_histograms():
    def row(config, kind, ratio, buckets=None):
        r = bench.Row(config, kind, 16, 2, 16, 512, 6.0, 85.0, 6.0, 6.5, 0.2, 0.3, 12.0, ratio=ratio, cpu_ratio=ratio)
        r.ready_buckets = buckets
        return r

    # cumulative counts per upper bound (s): run 1 has 4 mixtures at ≤ 1 ms, run 2 four at ≤ 3 ms, run 3 none
    one = {"0.001": 4.0, "0.003": 4.0, "inf": 4.0}
    two = {"0.001": 0.0, "0.003": 4.0, "inf": 4.0}
    rows = [row("http:base", "", 1.0), row("http:new", "scale", 1.20, one), row("http:new", "scale", 1.10, two),
            row("http:new", "scale", 1.14, {"0.001": 0.0, "0.003": 0.0, "inf": 0.0}), row("http:cached", "scale", 1.3)]
    new, cached = bench.new_summary(rows)
    assert (new["runs"], new["ratio"], new["ratio_min"], new["ratio_max"], new["mixtures"]) == (3, 1.14, 1.10, 1.20, 8)
    assert new["ready_ms_p50"] == 1.0  # 8 pooled: the 4th of them is at the top of the first bucket
    assert new["goal_met"]  # 1.14 ≤ 1.15 and 1.0 ms ≤ 2 ms
    assert cached["ratio"] == 1.3 and not cached["goal_met"]


def test_steps_only_writes_the_paired_step_and_prefill_rows(tmp_path):
    assert bench.main(["--steps-only", "--base", "tiny", "--quick", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serving_cpu_steps_quick.json").read_text())
    configs = [(r["config"], r["kind"]) for r in result["rows"]]
    assert configs == [("step:base", ""), ("step:scale", "scale"), ("step:rotation", "rotation"),
                       ("prefill:base", ""), ("prefill:scale", "scale"), ("prefill:rotation", "rotation")]
    assert all(r["ratio"] > 0 for r in result["rows"]) and result["rows"][0]["ratio"] == 1.0
    assert "| step:scale | scale |" in (tmp_path / "serving_cpu_steps_quick.md").read_text()
