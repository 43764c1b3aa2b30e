"""The training benchmark in miniature: a tiny char zoo read back, probes in subprocesses, LoRA at equal time."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_training as bench  # noqa: E402

from adapters_zoo.zoo import ZooSettings, build_zoo  # noqa: E402

torch.set_num_threads(1)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[ZooSettings, dict]:
    settings = ZooSettings(out=tmp_path_factory.mktemp("zoo"), base="char", suites=("compatible",),
                           kinds=("scale",), peft_lora=True, tasks_per_suite=2, rank=8, steps=4, batch_size=8,
                           n_train=32, n_eval=8, pretrain_steps=4, model_overrides=TINY, threads=1)
    return settings, build_zoo(settings, progress=False)


@pytest.fixture(scope="module")
def miniature(zoo, tmp_path_factory):
    zoo_settings, report = zoo
    tmp = tmp_path_factory.mktemp("training")
    task = report["entries"][0]["task"]
    settings = bench.Settings(zoo=zoo_settings, kinds=("scale",), timed_tasks=(task,), probe_steps=2, step_multiple=1,
                              work=tmp / "work", out=tmp / "out", stem="training_quick", note="partial: one task")
    return settings, bench.run(settings, "python benchmarks/bench_training.py --quick (test)")


def test_equal_steps_are_the_zoos_own_rows(zoo, miniature):
    _, report = zoo
    _, record = miniature
    trained = {(e["task"], e["kind"]): e for e in report["entries"]}
    read = {(r["task"], r["kind"]): r for r in record["equal_steps"] if r["kind"] != "base"}
    assert read == trained  # every finished adapter, nothing retrained, nothing else
    assert {r["task"] for r in record["equal_steps"] if r["kind"] == "base"} == {t for t, _ in trained}


def test_rows_of_other_settings_are_not_read(zoo, tmp_path):
    zoo_settings, _ = zoo
    other = dataclasses.replace(zoo_settings, steps=5)  # what a zoo with 5 steps would hold: not these rows
    rows = bench.equal_steps(bench.Settings(zoo=other, work=tmp_path, out=tmp_path))
    assert {r["kind"] for r in rows} == {"base"}  # the base's accuracy does not depend on training settings


def test_probes_measure_each_kind_in_its_own_process(zoo, miniature):
    _, report = zoo
    settings, record = miniature
    params = {e["kind"]: e["params"] for e in report["entries"] if e["task"] == settings.timed_tasks[0]}
    probes = {p["kind"]: p for p in record["probes"]}
    assert set(probes) == {"scale", bench.LORA}
    for kind, p in probes.items():
        assert p["params"] == params[kind]  # the same adapter the zoo trained
        assert p["seconds_per_step"] > 0 and p["cpu_seconds_per_step"] > 0 and p["steps"] == 2 and p["threads"] == 1
        assert p["rss_peak_mb"] > 0


def test_lora_gets_the_steps_of_each_kinds_wall_time(zoo, miniature):
    zoo_settings, report = zoo
    settings, record = miniature
    probes = {p["kind"]: p["cpu_seconds_per_step"] for p in record["probes"]}
    task = settings.timed_tasks[0]
    lora_24 = next(e["accuracy"] for e in report["entries"] if e["task"] == task and e["kind"] == bench.LORA)
    assert [r["kind"] for r in record["equal_time"]] == ["scale"]
    for r in record["equal_time"]:
        own = next(e["accuracy"] for e in report["entries"] if e["task"] == task and e["kind"] == r["kind"])
        assert r["kind_accuracy"] == own and r["lora_accuracy_equal_steps"] == lora_24
        m = settings.step_multiple
        assert r["lora_steps"] == max(m, m * round(zoo_settings.steps * probes[r["kind"]] / probes[bench.LORA] / m))
        assert r["cpu_seconds"] == round(zoo_settings.steps * probes[r["kind"]], 1)
        assert 0 <= r["lora_accuracy"] <= 1
        if r["lora_steps"] == zoo_settings.steps:
            assert r["lora_accuracy"] == lora_24


def test_lora_for_steps_trains_that_many_steps(zoo, miniature):
    settings, _ = miniature
    task = settings.timed_tasks[0]
    entry = bench.lora_for_steps(settings, task, 3)
    assert entry["kind"] == bench.LORA and entry["params"] > 0 and 0 <= entry["accuracy"] <= 1
    assert (settings.work / "lora-3" / "peft" / "compatible" / task / "adapter_model.safetensors").is_file()
    assert not (settings.zoo.out / "lora-3").exists()  # nothing written into the zoo


def test_writes_the_report_and_a_rerun_reuses_everything(miniature, monkeypatch):
    settings, record = miniature
    for suffix in (".json", ".md", ".png"):
        assert (settings.out / f"training_quick{suffix}").stat().st_size > 0
    on_disk = json.loads((settings.out / "training_quick.json").read_text())
    assert on_disk["equal_steps"] == record["equal_steps"] and on_disk["equal_time"] == record["equal_time"]
    md = (settings.out / "training_quick.md").read_text()
    assert md == bench.markdown(on_disk)
    for needle in ("> partial: one task", "## Where the claim holds", "## Equal wall time", "high-water",
                   "torch threads"):
        assert needle in md

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished probe or LoRA run was computed again")

    monkeypatch.setattr(bench, "probe_in_subprocess", forbidden)
    monkeypatch.setattr(bench, "_build_peft", forbidden)
    again = bench.run(settings, "python benchmarks/bench_training.py --quick (test)")
    assert again["probes"] == record["probes"] and again["equal_time"] == record["equal_time"]


def test_summary_counts_tasks_near_lora():
    rows = [{"task": t, "kind": k, "accuracy": a, "params": p, "bytes": 10, "seconds": 1.0}
            for t, k, a, p in [("a", "scale", 0.9, 10), ("a", bench.LORA, 0.92, 100), ("b", "scale", 0.5, 10),
                               ("b", bench.LORA, 0.9, 100), ("c", "scale", 1.0, 10)]]
    (scale, lora) = bench.summary(rows, ("scale",))
    assert scale["tasks"] == 2 and scale["near_lora"] == ["a"]  # "c" has no LoRA row to compare with
    assert scale["accuracy"] == pytest.approx(0.7) and scale["lora_accuracy"] == pytest.approx(0.91)
    assert scale["params_vs_lora"] == pytest.approx(0.1) and lora["near_lora"] == ["a", "b"]
