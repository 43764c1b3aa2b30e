"""The spectra benchmark in miniature: a full fine-tune of a tiny Llama on a chat task, analysed, cached."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_spectra as bench  # noqa: E402

LAYERS = 2 * len(bench.MODULES)  # the tiny Llama: 2 blocks × q,k,v,o,gate,up,down


def _settings(model_dir: Path, tmp: Path, **overrides) -> bench.Settings:
    fields = dict(tasks=("phone_digits",), lrs=(3e-3,), steps=4, batch_size=4, n_train=16, n_test=4, top=4,
                  threads=1, max_new_tokens=8, model_dir=model_dir, work=tmp / "work", out=tmp / "out",
                  note="partial: one task")
    return bench.Settings.for_base(bench.REAL_BASE, False, **(fields | overrides))


@pytest.fixture(scope="module")
def miniature(tiny_llama_dir, tmp_path_factory):
    settings = _settings(tiny_llama_dir, tmp_path_factory.mktemp("spectra"))
    return settings, bench.run(settings, "python benchmarks/bench_spectra.py (test)")


def test_writes_json_markdown_plot_and_the_run_report(miniature):
    settings, record = miniature
    for suffix in (".json", ".md", ".png"):
        assert (settings.out / f"spectra{suffix}").stat().st_size > 0
    assert (settings.out / "spectra" / "phone_digits-lr0.003" / "report.md").is_file()
    on_disk = json.loads((settings.out / "spectra.json").read_text())
    assert on_disk["runs"] == record["runs"]
    md = (settings.out / "spectra.md").read_text()
    assert md == bench.markdown(on_disk)  # the report is rebuilt from the JSON alone
    for needle in ("> partial: one task", "## Verdict", "Amplification", "phone_digits-lr0.003", "By module type",
                   "torch threads"):
        assert needle in md


def test_every_linear_layer_is_analysed_and_every_parameter_trained(miniature, tiny_llama_dir):
    settings, record = miniature
    (r,) = record["runs"]
    assert r["n_layers"] == LAYERS
    assert set(r["summary"]["by_type"]) == set(bench.MODULES)
    base = load_file(tiny_llama_dir / "model.safetensors")
    tuned = load_file(settings.work / "tuned-phone_digits-lr0.003" / "model.safetensors")
    assert set(base) == set(tuned)
    assert all(not torch.equal(base[name], tuned[name]) for name in base)  # AdamW moved every tensor
    assert 0 <= r["accuracy"]["before"] <= 1 and 0 <= r["accuracy"]["after"] <= 1
    assert r["train"]["seconds_per_step"] > 0


def test_sigma_ratios_match_an_independent_svd(miniature, tiny_llama_dir):
    settings, record = miniature
    base = load_file(tiny_llama_dir / "model.safetensors")
    tuned = load_file(settings.work / "tuned-phone_digits-lr0.003" / "model.safetensors")
    top = settings.top
    ratios = []
    for name in base:
        if name.rsplit(".", 2)[-2] in bench.MODULES:
            s, s2 = (torch.linalg.svdvals(w[name].double()) for w in (base, tuned))
            ratios.append((s2[:top] / s[:top]).mean().item())
    assert len(ratios) == LAYERS
    (r,) = record["runs"]
    assert r["summary"]["all"]["sigma.top_ratio_mean"]["mean"] == pytest.approx(sum(ratios) / LAYERS, rel=1e-9)


def test_a_rerun_reuses_every_finished_run(miniature, monkeypatch):
    settings, record = miniature

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was computed again")

    monkeypatch.setattr(bench, "full_finetune", forbidden)
    monkeypatch.setattr(bench, "analyze", forbidden)
    again = bench.run(settings, "python benchmarks/bench_spectra.py (test)")
    assert again["runs"] == record["runs"]
    changed = _settings(settings.model_dir, settings.work.parent, lrs=(1e-3,))
    with pytest.raises(AssertionError, match="computed again"):  # another learning rate is another run
        bench.run(changed, "python benchmarks/bench_spectra.py (test)")


def test_the_verdict_is_grouped_by_learning_rate(miniature):
    _, record = miniature
    (r,) = record["runs"]
    assert bench.verdict_lines([r], 4) == [f"- {v}" for v in bench.verdict([r], 4)]  # one lr: no headings
    stronger = json.loads(json.dumps(r)) | {"lr": 3e-2}
    stronger["summary"]["all"]["sigma.top_ratio_mean"]["mean"] = 1.5
    lines = bench.verdict_lines([stronger, r], 4)
    headings = [line for line in lines if line.startswith("At lr")]
    assert [h.split(" (")[0] for h in headings] == ["At lr 0.003", "At lr 0.03"]
    first, second = lines.index(headings[0]), lines.index(headings[1])
    assert "factor 1.5," in "".join(lines[second:]) and "factor 1.5," not in "".join(lines[first:second])


def test_blocks_select_the_layers_analysed(tiny_llama_dir):
    names = bench.analysed_targets(tiny_llama_dir, (0, -1))
    assert names == [f"layers.{b}.{m}" for b in (0, 1) for m in bench.MODULES]
    assert bench.analysed_targets(tiny_llama_dir, (1, -1)) == [f"layers.1.{m}" for m in bench.MODULES]
    assert bench.analysed_targets(tiny_llama_dir, None) is None


def test_quick_is_one_task_few_steps_two_blocks():
    s = bench.Settings.for_base(bench.REAL_BASE, True)
    assert (len(s.tasks), len(s.lrs), s.steps, s.blocks, s.stem) == (1, 1, 6, (0, -1), "spectra_quick")
    assert s.n_train == s.steps * s.batch_size
