"""The fusion-quality benchmark in miniature: a tiny real zoo, the script's own functions, real PEFT."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_fusion_quality as bench  # noqa: E402
from fusion_quality import report  # noqa: E402
from fusion_quality.fusers import PeftFuser, SpectralFuser  # noqa: E402
from fusion_quality.protocol import Grid, subsets  # noqa: E402
from fusion_quality.scoring import generation_hits, merged_weights, teacher_forced_hits  # noqa: E402
from fusion_quality.sources import open_zoo, peft_source, slice_of, zoo_source  # noqa: E402

from adapters_zoo.errors import InvalidConfig  # noqa: E402
from adapters_zoo.models import load_model_dir  # noqa: E402
from adapters_zoo.zoo import ZooSettings, build_zoo  # noqa: E402

torch.set_num_threads(1)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SUITE = "compatible"


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    build_zoo(ZooSettings(out=out, base="char", suites=(SUITE,), kinds=("scale",), peft_lora=True, tasks_per_suite=2,
                          rank=8,
                          steps=4, batch_size=8, n_train=32, n_eval=8, pretrain_steps=4, model_overrides=TINY,
                          threads=1), progress=False)
    return out


@pytest.fixture(scope="module")
def zoo(zoo_dir):
    return open_zoo(zoo_dir)


@pytest.fixture(scope="module")
def base(zoo):
    return load_model_dir(zoo.base_dir, "cpu")


@pytest.fixture(scope="module")
def miniature(zoo_dir, tmp_path_factory):
    """The whole script on the tiny zoo: one suite, fused-of-one and of two, every part switched on."""
    out = tmp_path_factory.mktemp("results")
    settings = bench.Settings.quick_settings(
        zoo_dir, out=out, cache=out / "cache", sizes=(1, 2), draws=2, threads=1, progress=False, distill_steps=3,
        methods=("linear", "ties", "slices", "linear+proj", "distill", "peft:cat", "peft:ties", "dense_ta",
                 "distill:lora"),
        grid=Grid(weights=(1.0,), densities=(0.5,), seeds=(0,)), interference=("scale", "peft-lora"))
    result = bench.run(settings)
    paths = bench.write(result, settings, "python benchmarks/bench_fusion_quality.py --quick")
    return settings, result, paths


def test_writes_json_markdown_and_plots(miniature):
    settings, result, paths = miniature
    names = {p.name for p in paths}
    assert names == {f"{settings.stem}{suffix}" for suffix in (".json", ".md", ".png", "_bytes.png")}
    for p in paths:
        assert p.stat().st_size > 0
    on_disk = json.loads((settings.out / f"{settings.stem}.json").read_text())
    assert on_disk["suites"] == [SUITE] and on_disk["tasks_per_suite"] == {SUITE: 2}
    md = (settings.out / f"{settings.stem}.md").read_text()
    assert md == report.markdown(on_disk)  # the report is rebuilt from the JSON alone
    for needle in ("--quick", "Hardware:", "torch threads", "## Where the goals stand", "normalized acc.",
                   "Pairwise interference", "Per-request mixtures"):
        assert needle in md


def test_every_source_method_and_size_has_a_summary_row(miniature):
    _, result, _ = miniature
    names = [s["name"] for s in result["sources"]]
    assert names == ["scale", "additive@slice+kl", "peft-lora"]
    expected = {("scale", m) for m in ("linear", "ties", "distill")}  # nothing outside the basis: no +proj
    expected |= {("additive@slice+kl", m) for m in ("linear", "ties", "slices", "linear+proj")}  # distill: plain only
    expected |= {("peft-lora", m) for m in ("peft:cat", "peft:ties", "dense_ta", "distill:lora")}
    rows = {(r["source"], r["method"], r["n"]): r for r in result["summary"]}
    assert set(rows) == {(s, m, n) for s, m in expected for n in (1, 2)}
    for (_, _, n), row in rows.items():
        assert row["runs"] == (2 if n == 1 else 1)  # two single-task draws cover both tasks; one pair
        assert row["params"] > 0 and row["bytes"] > 0 and row["fusion_ms"] >= 0
        assert set(row["per_task_normalized"]) <= {"reverse_upper", "sort_digits"}
    for r in result["runs"]:
        assert r["chosen"]["weight"] == 1.0
        assert (r["chosen"]["density"] is not None) == (r["method"] in ("ties", "peft:ties"))
        assert r["candidates"] and all("validation_accuracy" in c for c in r["candidates"])
    full = [r for r in result["runs"] if r["n"] == 2]
    assert all(r["test_generation"] is not None and r["disagree"] is not None for r in full)
    proj, exact = (rows[("additive@slice+kl", m, 2)] for m in ("linear+proj", "linear"))
    assert proj["bytes"] < exact["bytes"]  # k×k cores only: the residual factors are gone
    core, lora = rows[("scale", "distill", 2)], rows[("peft-lora", "distill:lora", 2)]
    assert core["params"] == 14 * 8 * 8  # one dense 8×8 core on each of the 14 layers
    assert lora["params"] == rows[("peft-lora", "peft:ties", 2)]["params"]  # a LoRA of the PEFT rank
    assert core["chosen"] == lora["chosen"] == "λ=1"  # nothing to choose: uniform shares


def test_fused_of_one_equals_the_individual_accuracy(miniature):
    _, result, _ = miniature
    alone = {s["name"]: s["individual"] for s in result["sources"]}
    singles = [r for r in result["runs"] if r["n"] == 1 and r["method"] in ("linear", "slices", "peft:cat",
                                                                            "dense_ta")]
    assert len(singles) == 2 * 5  # two tasks × (scale, sliced linear, sliced slices, peft cat, dense)
    for r in singles:
        (task,) = r["tasks"]
        assert r["test"][task] == alone[r["source"]][task]["test_forward"], (r["source"], r["method"], task)


def test_per_request_and_interference_structure(miniature):
    _, result, _ = miniature
    per_request = result["per_request"][SUITE]
    assert set(per_request) == {"scale", "additive@slice+kl", "peft-lora"}
    for v in per_request.values():
        assert v["tasks"] == 2 and 0 <= v["tasks_equal"] <= 2 and set(v["per_task"]) == {"reverse_upper",
                                                                                          "sort_digits"}
    matrices = result["interference"][SUITE]
    assert set(matrices) == {"scale (linear)", "peft-lora (peft:cat)"}
    for matrix in matrices.values():
        assert set(matrix) == {"reverse_upper", "sort_digits"}
        assert all(set(row) == set(matrix) for row in matrix.values())


def test_second_run_reads_everything_from_the_cache(miniature):
    settings, first, _ = miniature
    again = bench.run(settings)
    assert again["cost"]["generated"] == 0 and again["cost"]["forwarded"] == 0 and again["cost"]["trained"] == 0
    assert again["cost"]["cached_scores"] > 0
    assert [r["test"] for r in again["runs"]] == [r["test"] for r in first["runs"]]


def test_cached_only_writes_the_report_from_the_cache(miniature, tmp_path):
    settings, first, _ = miniature
    again = bench.run(dataclasses.replace(settings, cached_only=True))
    assert again["runs"] == first["runs"] and again["not_measured"] == 0 and again["cost"]["generated"] == 0
    empty = dataclasses.replace(settings, cached_only=True, cache=tmp_path / "empty", out=tmp_path / "out")
    nothing = bench.run(empty)
    assert nothing["runs"] == nothing["sources"] == [] and nothing["not_measured"] == 3  # each source's scores
    assert nothing["cost"]["generated"] == nothing["cost"]["forwarded"] == nothing["cost"]["trained"] == 0
    paths = bench.write(nothing, empty, "python benchmarks/bench_fusion_quality.py --cached-only")
    text = paths[1].read_text()
    assert "**Partial results**: 3 measurements" in text
    assert "Rerunning the command without `--cached-only` completes it" in text


def test_subset_kinds_limit_the_smaller_fusions_only(miniature, tmp_path):
    settings, first, _ = miniature
    cut_settings = dataclasses.replace(settings, cached_only=True, subset_kinds=("scale",), out=tmp_path)
    cut = bench.run(cut_settings)
    assert cut["not_measured"] == 0
    ran = {(r["source"], r["n"]) for r in cut["runs"]}
    assert ("additive@slice+kl", 2) in ran and ("additive@slice+kl", 1) not in ran  # all tasks only
    assert {("scale", 1), ("peft-lora", 1)} <= ran  # the kind asked for, and PEFT always
    kept = [r for r in first["runs"] if r["source"] != "additive@slice+kl" or r["n"] == 2]
    assert cut["runs"] == kept
    md = bench.write(cut, cut_settings, "python benchmarks/bench_fusion_quality.py --subset-kinds scale")[1]
    assert "(sources fused in them: scale and the PEFT LoRAs)." in md.read_text()


# --------------------------------------------------------------------------- the pieces, on real adapters


def test_merged_fused_of_one_generates_what_the_adapter_generates(zoo, base):
    model, tokenizer = base
    fuser = SpectralFuser(model, tokenizer, zoo.basis)
    source = zoo_source(zoo, SUITE, "scale")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = [ex["prompt"] for ex in zoo.split(SUITE, "sort_digits", "test")]
    with fuser.individual(source, "sort_digits") as m:
        alone = generation_hits(m, tokenizer, zoo.split(SUITE, "sort_digits", "test"))
        alone_text = bench_generate(m, tokenizer, prompts)
    with fuser.fused(source, ["sort_digits"], "linear", 1.0) as (m, info):
        assert bench_generate(m, tokenizer, prompts) == alone_text
        assert generation_hits(m, tokenizer, zoo.split(SUITE, "sort_digits", "test")) == alone
        assert info.params == len(zoo.basis.layers) * zoo.basis.rank  # one diagonal core per layer
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored"


def bench_generate(model, tokenizer, prompts):
    from adapters_zoo.tasks import generate_answers

    return generate_answers(model, tokenizer, prompts, max_new_tokens=16)


def test_teacher_forced_scoring_agrees_with_generation(zoo, base):
    model, tokenizer = base
    source = zoo_source(zoo, SUITE, "scale")
    with merged_weights(model, source.adapters["reverse_upper"], zoo.basis):
        prompts = [ex["prompt"] for ex in zoo.split(SUITE, "reverse_upper", "test")]
        own = bench_generate(model, tokenizer, prompts)  # what greedy decoding says: a hit by construction
        right = [{"prompt": p, "completion": g + tokenizer.eos_token} for p, g in zip(prompts, own)]
        wrong = [{"prompt": p, "completion": g + "#" + tokenizer.eos_token} for p, g in zip(prompts, own)]
        short = [{"prompt": p, "completion": g[:-1] + tokenizer.eos_token} for p, g in zip(prompts, own) if g]
        for examples, expected in ((right, True), (wrong, False), (short, False)):
            assert teacher_forced_hits(model, tokenizer, examples) == [expected] * len(examples)
            assert generation_hits(model, tokenizer, examples) == [expected] * len(examples)
        real = zoo.split(SUITE, "reverse_upper", "test")
        assert teacher_forced_hits(model, tokenizer, real) == generation_hits(model, tokenizer, real)


def test_peft_cat_equals_dense_task_arithmetic(zoo, base):
    model, tokenizer = base
    source = peft_source(zoo, SUITE)
    peft_fuser = PeftFuser(load_model_dir(zoo.base_dir, "cpu")[0], tokenizer)
    spectral = SpectralFuser(model, tokenizer, zoo.basis)
    batch = tokenizer([ex["prompt"] for ex in zoo.split(SUITE, "sort_digits", "test")], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        with peft_fuser.fused(source, source.tasks, "peft:cat", 1.0) as (m, info):
            peft_logits = m(**batch).logits
            assert info.rank == 8  # two rank-4 LoRAs side by side
        with spectral.fused(source, source.tasks, "dense_ta", 1.0) as (m, _):
            dense_logits = m(**batch).logits
        with peft_fuser.individual(source, "sort_digits") as m:
            alone_logits = m(**batch).logits
    torch.testing.assert_close(peft_logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(peft_logits, alone_logits, atol=1e-6)  # the second LoRA did change something
    assert len(peft_fuser.peft.peft_config) == 2  # the merged adapter was deleted after use


def test_subsets_slices_and_grid():
    tasks = [f"t{i}" for i in range(8)]
    assert subsets(tasks, 8, 3, 0, "s") == [tasks]
    drawn = subsets(tasks, 2, 3, 0, "s")
    assert len(drawn) == 3 and all(len(d) == 2 and d == sorted(d, key=tasks.index) for d in drawn)
    assert drawn == subsets(tasks, 2, 3, 0, "s") and drawn != subsets(tasks, 2, 3, 1, "s")
    assert [slice_of(i, 8, 32) for i in (0, 1, 7)] == [(0, 4), (4, 8), (28, 32)]
    with pytest.raises(InvalidConfig):
        slice_of(0, 8, 4)
    grid = Grid(weights=(0.5, 1.0), densities=(0.2, 0.5))
    assert len(grid.candidates("linear")) == 2 and len(grid.candidates("ties")) == 4
    assert len(grid.candidates("peft:ties_svd")) == 4 and len(grid.candidates("peft:svd")) == 2
    assert grid.candidates("distill") == grid.candidates("distill:lora") == [{"weight": 1.0, "density": None}]


def test_goals_read_the_numbers():
    def row(source, family, method, norm, size, training="plain"):
        return {"suite": "compatible", "n": 8, "source": source, "family": family, "training": training,
                "method": method, "mean_normalized": norm, "std_normalized": 0.01, "mean_accuracy": norm,
                "bytes": size, "chosen": "λ=1"}

    summary = [row("peft-lora", "peft", "peft:cat", 0.5, 20_000), row("peft-lora", "spectral", "dense_ta", 0.55,
                                                                      40_000),
               row("scale", "spectral", "linear", 0.6, 5_000), row("additive", "spectral", "ties", 0.9, 90_000)]
    goals = report.goals(summary, ["compatible"], {"compatible": 8})
    beat, keep = goals
    assert beat["met"] and beat["best_lora"]["method"] == "dense_ta"
    assert beat["lora_distilled"] is None and beat["best_spectral_data_free"]["source"] == "additive"
    assert beat["best_spectral_not_larger"]["source"] == "scale"  # 0.6 > 0.55 at 5 KB ≤ 40 KB
    assert beat["best_spectral"]["source"] == "additive"
    assert keep["met"]  # additive ties keeps 90%
    summary[2]["mean_normalized"] = 0.5
    assert not report.goals(summary, ["compatible"], {"compatible": 8})[0]["met"]
    # the LoRA distillation control is reported beside the LoRA merges, never as one of them
    summary.append(row("peft-lora", "peft", "distill:lora", 0.95, 20_000))
    beat = report.goals(summary, ["compatible"], {"compatible": 8})[0]
    assert beat["best_lora"]["method"] == "dense_ta" and beat["lora_distilled"]["mean_normalized"] == 0.95


def test_bad_inputs_are_typed_errors(tmp_path, capsys):
    with pytest.raises(InvalidConfig, match="not a finished zoo"):
        open_zoo(tmp_path)
    with pytest.raises(SystemExit):
        bench.parse_args(["--zoo", str(tmp_path), "--methods", "linear,nope"])
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert bench.main(["--zoo", str(tmp_path), "--quick", "--no-cache"]) == 2
    assert "not a finished zoo" in capsys.readouterr().err


# --------------------------------------------------------------------------- chat scoring (the real base's path)


@pytest.fixture(scope="module")
def replies_42(tiny_llama_dir):
    """The tiny llama merged with a LoRA trained to reply "42" (then end of turn) to every chat prompt."""
    from adapters_zoo.basis import basis_from_model
    from adapters_zoo.tasks.chat import chat_task, make_chat_split
    from adapters_zoo.train import train_adapter
    from adapters_zoo.train_config import TrainConfig

    model, tokenizer = load_model_dir(tiny_llama_dir, "cpu")
    basis = basis_from_model(model, 8)
    task = chat_task("phone_digits")
    test = make_chat_split(task, "test", 6)
    examples = _answering(make_chat_split(task, "train", 10) + test, "42")
    cfg = TrainConfig(kind="lora", kind_config={"rank": 8}, steps=100, lr=0.02, batch_size=16, signature=False)
    adapter, _ = train_adapter(model, tokenizer, basis, examples, cfg, progress=False)
    with merged_weights(model, adapter, basis):
        yield model, tokenizer, task, test


def _answering(examples, answer):
    return [{"messages": [ex["messages"][0], {"role": "assistant", "content": answer}]} for ex in examples]


def test_chat_forced_scorer_agrees_with_generation(replies_42):
    from fusion_quality.scoring import chat_forced_hits, chat_generation_hits

    model, tokenizer, task, test = replies_42
    says_42 = chat_generation_hits(model, tokenizer, task, _answering(test, "42"))
    assert sum(says_42) >= 4  # the adapter learnt its reply (a prompt or two may still escape a tiny model)
    for answer in ("42", "43", "4", "421"):
        examples = _answering(test, answer)
        generated = chat_generation_hits(model, tokenizer, task, examples, max_new_tokens=8)
        assert generated == (says_42 if answer == "42" else [False] * 6), answer  # a wrong answer scores 0
        assert chat_forced_hits(model, tokenizer, examples, max_new_tokens=8) == generated, answer
    assert chat_forced_hits(model, tokenizer, test) == chat_generation_hits(model, tokenizer, task, test) == [False] * 6
    # a budget of exactly the answer's tokens: generation stops there without the end of turn, still a hit
    right = _answering(test, "42")
    assert chat_forced_hits(model, tokenizer, right, max_new_tokens=2) == says_42
    assert chat_generation_hits(model, tokenizer, task, right, max_new_tokens=2) == says_42
    assert chat_forced_hits(model, tokenizer, right, max_new_tokens=1) == [False] * 6


def test_chat_evaluator_scores_with_the_checker_and_caches(replies_42, tmp_path):
    from fusion_quality.protocol import Evaluator, ResultCache
    from fusion_quality.scoring import chat_generation_hits

    model, tokenizer, task, test = replies_42
    examples = _answering(test[:3], "42") + _answering(test[3:], "41")
    expected = sum(chat_generation_hits(model, tokenizer, task, examples))
    assert expected >= 1
    splits = {("skills", task.name, "test"): examples}
    cache = ResultCache(tmp_path / "scores.json")
    evaluator = Evaluator(tokenizer, splits, cache, chat_tasks={task.name: task})
    state = {"individual": task.name}
    wanted = [(task.name, "test", "generation+forward"), (task.name, "test", "forward")]
    scores, _ = evaluator.score_state(state, lambda: _Yield(model), wanted, "skills")
    both, forward = scores[wanted[0]], scores[wanted[1]]
    assert (both.hits, both.n, both.disagree) == (expected, 6, 0) and forward.hits == expected
    again = Evaluator(tokenizer, splits, ResultCache(tmp_path / "scores.json"), chat_tasks={task.name: task},
                      cached_only=True)
    cached, _ = again.score_state(state, lambda: pytest.fail("a cached state was built again"), wanted, "skills")
    assert cached == scores and again.generated == again.forwarded == 0


class _Yield:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        return False


def test_low_precision_twin_follows_merges_and_peft(zoo, base):
    from fusion_quality.scoring import LowPrecisionTwin

    model, tokenizer = base
    twin = LowPrecisionTwin(model)
    batch = tokenizer([ex["prompt"] for ex in zoo.split(SUITE, "sort_digits", "test")], return_tensors="pt",
                      padding=True)
    source = peft_source(zoo, SUITE)
    peft_fuser = PeftFuser(load_model_dir(zoo.base_dir, "cpu")[0], tokenizer)
    with torch.no_grad():
        for enter in (lambda: merged_weights(model, zoo_source(zoo, SUITE, "scale").adapters["sort_digits"],
                                             zoo.basis),
                      lambda: peft_fuser.individual(source, "sort_digits")):
            with enter() as m:
                exact = m(**batch).logits
                low = twin.of(m)(**batch).logits
            assert low.dtype == torch.bfloat16
            torch.testing.assert_close(low.float(), exact, rtol=0.05, atol=0.05)
        plain = twin.of(model)(**batch).logits.float()
    assert not torch.allclose(plain, low.float(), atol=1e-3)  # the twin reads the weights now, not a stale copy


def test_chat_goals_read_the_numbers():
    def row(source, family, method, norm, size):
        return {"suite": "records", "n": 4, "source": source, "family": family, "training": "plain",
                "method": method, "mean_normalized": norm, "std_normalized": 0.0, "mean_accuracy": norm,
                "bytes": size, "chosen": "λ=1"}

    summary = [row("peft-lora", "peft", "peft:ties", 0.40, 5_000_000), row("peft-lora", "spectral", "dense_ta", 0.7,
                                                                            20_000_000),
               row("scale", "spectral", "ties", 0.40, 60_000), row("scale", "spectral", "distill", 0.96, 400_000),
               row("peft-lora", "spectral", "distill:lora", 0.90, 5_000_000)]
    keep, beat = report.goals(summary, ["records"], {"records": 4}, chat=True)
    assert keep["met"] and keep["distill"]["mean_normalized"] == 0.96
    assert beat["met"] and beat["best_spectral_not_larger"]["method"] == "ties"  # equal accuracy, fewer bytes
    assert beat["best_peft"]["method"] == "peft:ties" and beat["dense_task_arithmetic"]["mean_normalized"] == 0.7
    summary[-1]["mean_normalized"] = 0.97  # the LoRA control beats distill
    summary[2]["mean_normalized"] = 0.39
    keep, beat = report.goals(summary, ["records"], {"records": 4}, chat=True)
    assert not keep["met"] and not beat["met"] and keep["measured"]
    assert "**not met**. distill: scale + distill" in report.goals_markdown({"goals": [keep], "suites": []})[2]
    without = [r for r in summary if r["method"] not in ("distill", "distill:lora")]
    keep, _ = report.goals(without, ["records"], {"records": 4}, chat=True)  # a run that did not distill
    assert not keep["met"] and not keep["measured"]
    assert "**not measured** (`distill` is not among" in report.goals_markdown({"goals": [keep], "suites": []})[2]


# --------------------------------------------------------------------------- fusion-ready variants by name, on chat


def test_variant_names_parse_and_bad_names_are_rejected(tmp_path, capsys):
    from fusion_quality.sources import VARIANTS, variant

    assert variant("additive@slice+kl") == VARIANTS["additive@slice+kl"]
    sliced = variant("scale@slice")
    assert (sliced.kind, sliced.slices, sliced.preserve, sliced.training) == ("scale", True, False, "slices")
    kept = variant("rotation@slice+kl0.1")
    assert (kept.kind, kept.slices, kept.preserve, kept.kl_weight) == ("rotation", True, True, 0.1)
    assert variant("scale+kl").kl_weight == 1.0 and variant("scale+kl").training == "preserve"
    for bad, why in (("lora@slice", "kind 'lora'"), ("scale@top", "'@top'"), ("scale+l2", "'+l2'"),
                     ("scale+klx", "'x' is not a number"), ("scale+kl0", "must be > 0"), ("scale", "neither")):
        with pytest.raises(InvalidConfig, match=re.escape(why)):
            variant(bad)
    with pytest.raises(SystemExit):
        bench.parse_args(["--zoo", str(tmp_path), "--variants", "scale@slice,rotation@top"])
    assert "'@top' is not '@slice'" in capsys.readouterr().err
    assert bench.parse_args(["--zoo", str(tmp_path), "--variants", "scale@slice,scale+kl0.3"]).variants == (
        "scale@slice", "scale+kl0.3")


@pytest.fixture(scope="module")
def chat_zoo(tiny_llama_dir, tmp_path_factory):
    """A chat zoo's files (report, basis, data of two records tasks) on the tiny llama: what trained_source reads."""
    from fusion_quality.sources import Zoo

    from adapters_zoo.basis import basis_from_model, save_basis
    from adapters_zoo.tasks.chat import chat_suite_tasks, make_chat_split

    root = tmp_path_factory.mktemp("chat-zoo")
    model, tokenizer = load_model_dir(tiny_llama_dir, "cpu")
    basis = basis_from_model(model, 8)
    save_basis(basis, root / "basis.safetensors")
    tasks = chat_suite_tasks("records")[:2]
    for task in tasks:
        (root / "data" / "records").mkdir(parents=True, exist_ok=True)
        rows = make_chat_split(task, "train", 8)
        (root / "data" / "records" / f"{task.name}.train.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    report_ = {"settings": {"base": "smollm2-135m-instruct", "seed": 0, "steps": 2, "batch_size": 4},
               "kind_settings": {"scale": {"config": {"rank": 8}, "lr": 0.05}},
               "entries": [{"suite": "records", "task": t.name, "kind": "scale"} for t in tasks],
               "base_fingerprint": basis.fingerprint}
    return Zoo(root, report_, basis), model, tokenizer


def test_sliced_and_preserve_variants_train_on_a_chat_zoo(chat_zoo, tmp_path):
    from fusion_quality.sources import PRESERVE_PER_TASK, chat_preserve_examples, trained_source, variant

    from adapters_zoo.tasks.chat import CHAT_SUITES, chat_suite_tasks

    zoo, model, tokenizer = chat_zoo
    names = [t.name for t in zoo.tasks("records")]
    source, trained = trained_source(zoo, "records", variant("scale@slice+kl0.5"), model, tokenizer, tmp_path)
    assert trained == 2 and source.tasks == names and source.training == "slices+preserve"
    n_suite = len(chat_suite_tasks("records"))  # slices are cut for the whole suite: k=8, 4 tasks → 2 each
    for i, name in enumerate(names):
        adapter = source.adapters[name]
        assert adapter.meta["bench_settings"]["kind_config"]["slice"] == list(slice_of(i, n_suite, 8)) == [2 * i,
                                                                                                           2 * i + 2]
        assert adapter.meta["bench_settings"]["kl_weight"] == 0.5
        assert adapter.meta["train"]["stats"]["final_kl"] is not None  # the KL term was trained
    # the preserve set: the other task's training conversations, then the other chat suites' tasks
    preserve = chat_preserve_examples(zoo, "records", names[0])
    others = [t for s in CHAT_SUITES if s != "records" for t in chat_suite_tasks(s)]
    own = zoo.split("records", names[1], "train")[:PRESERVE_PER_TASK]
    assert preserve[:len(own)] == own and len(preserve) > len(own) and others
    assert all(ex not in preserve for ex in zoo.split("records", names[0], "train"))
    again, trained = trained_source(zoo, "records", variant("scale@slice+kl0.5"), model, tokenizer, tmp_path)
    assert trained == 0 and again.digest == source.digest  # read back from the cache
    other, trained = trained_source(zoo, "records", variant("scale@slice+kl0.25"), model, tokenizer, tmp_path)
    assert trained == 2 and other.digest != source.digest  # the KL weight is part of the cache key


def test_a_union_of_suites_is_one_suite_of_all_their_tasks(chat_zoo, tmp_path):
    """``records+skills``: every task of both suites, each read from its own suite's files; sliced adapters
    cut the union's k among all its tasks."""
    from fusion_quality.sources import Zoo, trained_source, variant

    from adapters_zoo.tasks.chat import chat_suite_tasks, make_chat_split

    zoo, model, tokenizer = chat_zoo
    skill = chat_suite_tasks("skills")[0]
    (zoo.root / "data" / "skills").mkdir(parents=True, exist_ok=True)
    (zoo.root / "data" / "skills" / f"{skill.name}.train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in make_chat_split(skill, "train", 8)))
    report_ = dict(zoo.report, entries=[*zoo.report["entries"], {"suite": "skills", "task": skill.name,
                                                                   "kind": "scale"}])
    union = Zoo(zoo.root, report_, zoo.basis)
    both = "records+skills"
    records = [t.name for t in zoo.tasks("records")]
    assert union.has_suite(both) and not union.has_suite("records+other") and union.kinds(both) == ["scale"]
    assert [t.name for t in union.tasks(both)] == [*records, skill.name]
    assert union.home(both, skill.name) == "skills" and union.split(both, skill.name, "train")[0]["messages"]
    everything = union.suite_task_names(both)
    assert everything == [t.name for s in ("records", "skills") for t in chat_suite_tasks(s)]
    source, trained = trained_source(union, both, variant("scale@slice"), model, tokenizer, tmp_path)
    assert trained == 3 and source.tasks == [*records, skill.name]
    width = 8 // len(everything)  # k=8 over all 8 tasks of both suites: one direction each
    index = everything.index(skill.name)
    assert source.adapters[skill.name].meta["bench_settings"]["kind_config"]["slice"] == [width * index,
                                                                                         width * (index + 1)]
