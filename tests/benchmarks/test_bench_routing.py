"""The routing benchmark in miniature: a tiny char zoo served for real, calibration, every file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_routing as bench  # noqa: E402

from adapters_zoo.zoo import ZooSettings, build_zoo  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    build_zoo(ZooSettings(out=out, base="char", kinds=("scale",), peft_lora=False, tasks_per_suite=2, rank=8, steps=4,
                          batch_size=8, n_train=32, n_eval=8, pretrain_steps=4, model_overrides=TINY, threads=1),
              progress=False)
    return out


def test_calibrate_picks_the_middle_of_the_best_interval():
    items = [bench.Item("a", [1], "x", "")] * 2 + [bench.Item(bench.OFF, [2], None, "")] * 2
    scored = bench.Scored(items, torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.5, 0.1], [0.3, 0.2]], dtype=torch.float64),
                          torch.tensor([0.2, 0.1, 0.6, 0.1], dtype=torch.float64))
    rule, sweep = bench.calibrate(scored, {"a": 0}, False, 0.0)
    assert rule == bench.Rule(0.65) and max(s["balanced"] for s in sweep) == 1.0  # between 0.5 and 0.8
    rule, _ = bench.calibrate(scored, {"a": 0}, True, 0.0)  # leads over the base: 0.7, 0.7, -0.1, 0.2
    assert rule == bench.Rule(0.0, 0.45)
    assert bench.decide(scored, [0, 1], rule) == [0, 0, None, None]
    assert bench.decide(scored, [1], bench.Rule(0.15)) == [None, 1, None, 1]  # a subset of the candidates


def test_quick_run_on_a_tiny_zoo_writes_every_file(zoo_dir, tmp_path):
    argv = ["--zoo", str(zoo_dir), "--quick", "--n", "4", "--n-validation", "4", "--threads", "1",
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "routing_quick.json").read_text())
    assert not result["chat"] and result["command"].startswith("python benchmarks/bench_routing.py --zoo")
    [kind] = result["kinds"]
    assert kind["kind"] == "scale" and len(kind["candidates"]) == 4
    proto = kind["routers"]["prototype"]
    assert set(proto["rules"]) == {"default", "threshold only", "calibrated margin", "calibrated threshold"}
    for router in kind["routers"].values():  # decisions from the scores = what Service.route decides
        same, checked = router["offline_equals_service"].split("/")
        assert same == checked and int(checked) > 0
    calibrated = proto["rules"]["calibrated threshold"]
    assert calibrated["validation"]["balanced"] == max(s["balanced"] for s in proto["sweeps"]["threshold"])
    for suite in kind["suites"]:
        assert suite["prompts_per_task"] == 4 and len(suite["tasks"]) == 2
        assert set(suite["mean"]) >= {"oracle", "base", "static λ=1/2", "static λ=1"}
        for config, auto in suite["auto"].items():  # a prompt routed right is served exactly as the oracle
            if auto["decision_accuracy"] == 1.0:
                assert suite["accuracy"][config] == suite["accuracy"]["oracle"]
    off = kind["off_task"]
    assert off["base"]["to_base"] == 1.0 and "accuracy" in off["base"]
    md = (tmp_path / "routing_quick.md").read_text()
    assert "## Goal: auto ≥ 95% of the per-request oracle" in md and "auto/prototype" in md
    assert (tmp_path / "routing_quick.png").stat().st_size > 0
    assert bench.main(["--zoo", str(zoo_dir), "--quick", "--out", str(tmp_path), "--markdown-only"]) == 0
    assert (tmp_path / "routing_quick.md").read_text() == md


def test_a_rerun_reads_finished_kinds_from_the_cache(zoo_dir, tmp_path, monkeypatch):
    argv = ["--zoo", str(zoo_dir), "--quick", "--n", "3", "--n-validation", "3", "--threads", "1",
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    assert bench.main(argv) == 0
    first = json.loads((tmp_path / "routing_quick.json").read_text())

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished kind was measured again")

    monkeypatch.setattr(bench, "run_kind", forbidden)
    monkeypatch.setattr(bench, "open_service", forbidden)
    assert bench.main(argv) == 0
    again = json.loads((tmp_path / "routing_quick.json").read_text())
    assert again["kinds"] == first["kinds"]
    with pytest.raises(AssertionError, match="measured again"):  # other settings: another measurement
        bench.main([*argv[:4], "4", *argv[5:]])
    with pytest.raises(AssertionError, match="measured again"):
        bench.main([*argv, "--no-cache"])


def test_the_plot_takes_kinds_whose_calibrated_thresholds_differ(zoo_dir, tmp_path):
    from routing_report import plot

    argv = ["--zoo", str(zoo_dir), "--quick", "--n", "3", "--n-validation", "3", "--threads", "1",
            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "routing_quick.json").read_text())
    other = json.loads(json.dumps(result["kinds"][0]))  # a second kind, its calibrated rules relabelled
    other["kind"] = "other"
    for router in other["routers"].values():
        for name, rule in router["rules"].items():
            if name.startswith("calibrated"):
                new = rule["config"] + " (other)"
                for suite in other["suites"]:
                    suite["mean"][new] = suite["mean"].pop(rule["config"])
                rule["config"] = new
    plot({**result, "kinds": [result["kinds"][0], other]}, tmp_path / "two.png")
    assert (tmp_path / "two.png").stat().st_size > 0
