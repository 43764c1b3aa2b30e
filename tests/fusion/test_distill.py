"""``fusion.distill``: one k×k core per layer trained to match every source on its own prompts."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from fusion_helpers import load_model, moved

from adapters_zoo.errors import (
    BasisMismatch,
    IncompatibleAdapter,
    InvalidConfig,
    InvalidMixture,
    TrainingDataError,
)
from adapters_zoo.format import adapter_to_bytes, load_adapter, new_adapter, save_adapter
from adapters_zoo.inject import SpectralLinear
from adapters_zoo.registry import Registry
from fusion.distill import distill_fuse
from fusion.distill_config import DistillConfig
from fusion.fuse import fuse
from fusion.merge import merged
from serving.cli import main

ALPHABET = "abcdefghij"


def prompts(seed: int, n: int, key: str = "") -> list[dict[str, str]]:
    """Random letters after a task key: sources see different prompts (as tasks do), the key tells them apart."""
    rng = random.Random(seed)
    return [{"prompt": key + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 8))) + "="}
            for _ in range(n)]


def teacher_kl(model, tokenizer, teacher, student, basis, examples) -> float:
    """Mean KL(teacher ‖ student) of the next-token distribution after each prompt."""
    ids = [tokenizer(e["prompt"])["input_ids"] for e in examples]
    width = max(map(len, ids))
    batch = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = (torch.arange(width) >= torch.tensor([width - len(i) for i in ids])[:, None]).long()
    out = []
    for adapter in (teacher, student):
        with torch.no_grad(), merged(model, adapter, basis):
            out.append(F.log_softmax(model(input_ids=batch, attention_mask=mask).logits[:, -1], -1))
    return float(F.kl_div(out[1], out[0], log_target=True, reduction="batchmean"))


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def sources(llama_basis):
    return [moved("svft", {"pattern": "banded", "d": 1}, llama_basis, 11, name="a"),
            moved("rotation", {"rank": 6}, llama_basis, 12, name="b")]


CFG = DistillConfig(steps=150, lr=5e-2, batch_size=16, max_new_tokens=6)


@pytest.fixture(scope="module")
def distilled(model, tokenizer, llama_basis, sources):
    data = [prompts(1, 48, "up:"), prompts(2, 48, "rev:")]
    return distill_fuse(model, tokenizer, llama_basis, sources, [1.0, 1.0], data, CFG)


def test_starts_from_the_exact_mean_of_the_cores(model, tokenizer, llama_basis, sources):
    # One source at weight 1: the starting core is that source's, so the first KL is ~0.
    fused, stats = distill_fuse(model, tokenizer, llama_basis, sources[:1], [2.5], [prompts(3, 16)],
                                DistillConfig(steps=1, lr=1e-9, batch_size=8, max_new_tokens=4))
    assert stats.first_kl < 1e-5
    for layer in sources[0].layers:
        torch.testing.assert_close(fused.delta(layer, llama_basis), sources[0].delta(layer, llama_basis),
                                   rtol=1e-4, atol=1e-5)


def test_distillation_matches_each_source_better_than_the_mean(model, tokenizer, llama_basis, sources, distilled):
    fused, stats = distilled
    mean = fuse(sources, [0.5, 0.5], llama_basis, "linear")
    held_out = [prompts(101, 32, "up:"), prompts(102, 32, "rev:")]  # unseen prompts of each source
    for source, examples in zip(sources, held_out):
        after = teacher_kl(model, tokenizer, source, fused, llama_basis, examples)
        before = teacher_kl(model, tokenizer, source, mean, llama_basis, examples)
        assert after < 0.5 * before, (source.meta["name"], before, after)
    assert stats.final_kl < 0.5 * stats.first_kl


def test_result_is_one_dense_core_per_layer_with_provenance(llama_basis, sources, distilled, tmp_path):
    fused, stats = distilled
    layers = sorted(set(sources[0].layers) | set(sources[1].layers), key=llama_basis.layer_names().index)
    assert fused.kind == "core" and fused.config == {"diagonal": False} and fused.layers == layers
    k = llama_basis.rank
    assert all(set(p) == {"C"} and p["C"].shape == (k, k) for p in fused.params.values())
    assert stats.trainable_params == fused.num_params() == len(layers) * k * k
    info = fused.meta["fusion"]
    assert info["method"] == "distill" and info["weights"] == [1.0, 1.0]
    assert [s["name"] for s in info["sources"]] == ["a", "b"]
    assert info["stats"]["examples"] == [48, 48] and info["stats"]["generated"] == 96
    assert info["params"]["steps"] == CFG.steps
    path = save_adapter(fused, tmp_path / "d.safetensors")
    assert adapter_to_bytes(load_adapter(path, llama_basis)) == adapter_to_bytes(fused)


def test_model_is_left_as_it_came(model, tokenizer, llama_basis, sources):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    distill_fuse(model, tokenizer, llama_basis, sources, [1.0, 1.0], [prompts(4, 8), prompts(5, 8)],
                 DistillConfig(steps=3, batch_size=4, max_new_tokens=4))
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n


def test_same_seed_same_core_other_seed_other_core(model, tokenizer, llama_basis, sources):
    data = [prompts(6, 12), prompts(7, 12)]
    runs = [distill_fuse(model, tokenizer, llama_basis, sources, [1.0, 1.0], data,
                         DistillConfig(steps=5, batch_size=4, max_new_tokens=4, seed=s))[0] for s in (0, 0, 1)]
    layer = runs[0].layers[0]
    assert torch.equal(runs[0].params[layer]["C"], runs[1].params[layer]["C"])
    assert not torch.equal(runs[0].params[layer]["C"], runs[2].params[layer]["C"])


def test_given_completions_are_used_as_they_are(model, tokenizer, llama_basis, sources):
    data = [[{"prompt": "abc=", "completion": "cba</s>"}] * 4, prompts(8, 4)]
    _, stats = distill_fuse(model, tokenizer, llama_basis, sources, [1.0, 1.0], data,
                            DistillConfig(steps=2, batch_size=4, max_new_tokens=4))
    assert stats.generated == 4 and stats.examples == [4, 4]


def test_a_lora_student_trains_like_for_like(model, tokenizer, llama_basis, sources):
    student = new_adapter("lora", {"rank": 2}, llama_basis, layers=sources[0].layers)
    fused, stats = distill_fuse(model, tokenizer, llama_basis, sources, [1.0, 1.0], [prompts(9, 8), prompts(10, 8)],
                                DistillConfig(steps=3, batch_size=4, max_new_tokens=4), student=student)
    assert fused.kind == "lora" and stats.trainable_params == student.num_params()
    assert any(not torch.equal(fused.params[n]["B"], student.params[n]["B"]) for n in fused.layers)


def test_zero_weight_sources_need_no_prompts(model, tokenizer, llama_basis, sources):
    _, stats = distill_fuse(model, tokenizer, llama_basis, sources, [1.0, 0.0], [prompts(11, 4), []],
                            DistillConfig(steps=2, batch_size=4, max_new_tokens=4))
    assert stats.examples == [4, 0]


@pytest.mark.parametrize("weights, data, error, match", [
    ([1.0], [prompts(0, 4)], InvalidMixture, "2 adapters but 1 weights"),
    ([1.0, 1.0], [prompts(0, 4)], TrainingDataError, "2 adapters but 1 prompt sets"),
    ([1.0, -1.0], [prompts(0, 4)] * 2, InvalidMixture, "finite and ≥ 0"),
    ([1.0, float("nan")], [prompts(0, 4)] * 2, InvalidMixture, "finite and ≥ 0"),
    ([0.0, 0.0], [prompts(0, 4)] * 2, InvalidMixture, "every weight is 0"),
    ([1.0, 1.0], [prompts(0, 4), []], TrainingDataError, "has weight 1.0 but no prompts"),
    ([1.0, 1.0], [prompts(0, 4), [{"completion": "x"}]], TrainingDataError, "expected"),
])
def test_bad_mixtures_and_data_are_refused(model, tokenizer, llama_basis, sources, weights, data, error, match):
    with pytest.raises(error, match=match):
        distill_fuse(model, tokenizer, llama_basis, sources, weights, data, DistillConfig(steps=1))


@pytest.mark.parametrize("change", [{"steps": 0}, {"lr": float("nan")}, {"batch_size": True}, {"warmup_ratio": 1.0}])
def test_bad_settings_are_refused(model, tokenizer, llama_basis, sources, change):
    with pytest.raises(InvalidConfig, match="distill"):
        distill_fuse(model, tokenizer, llama_basis, sources, [1.0, 1.0], [prompts(0, 4)] * 2, DistillConfig(**change))


def test_adapters_of_another_base_and_a_wrong_model_are_refused(model, tokenizer, llama_basis, other_basis,
                                                                 other_llama_dir, sources):
    foreign = moved("scale", {"rank": 4}, other_basis, 1)
    with pytest.raises(IncompatibleAdapter, match="different base models"):
        distill_fuse(model, tokenizer, llama_basis, [sources[0], foreign], [1.0, 1.0], [prompts(0, 4)] * 2)
    with pytest.raises(BasisMismatch):
        distill_fuse(load_model(other_llama_dir), tokenizer, llama_basis, sources, [1.0, 1.0], [prompts(0, 4)] * 2)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def home(tmp_path, llama_basis, sources):
    home = tmp_path / "home"
    with Registry(home) as reg:
        reg.add_basis(llama_basis)
        reg.add(sources[0], "a")
        reg.add(sources[1], "b")
    return home


def write_prompts(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def test_cli_distills_into_the_registry(home, tiny_llama_dir, tmp_path, capsys, llama_basis):
    a = write_prompts(tmp_path / "a.jsonl", prompts(1, 8))
    b = write_prompts(tmp_path / "b.jsonl", prompts(2, 8))
    code = main(["fuse", "a:0.6,b:0.4", "--method", "distill", "--base", str(tiny_llama_dir), "--data", str(a),
                 "--data", str(b), "--steps", "4", "--batch-size", "4", "--max-new-tokens", "4", "--name", "ab",
                 "--home", str(home), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)
    assert summary["ref"] == "ab@1" and summary["method"] == "distill" and summary["params"]["steps"] == 4
    with Registry(home) as reg:
        stored = reg.load("ab")
    info = stored.meta["fusion"]
    assert [(s["name"], s["data"]) for s in info["sources"]] == [("a@1", str(a)), ("b@1", str(b))]
    assert info["weights"] == [0.6, 0.4] and stored.kind == "core"


@pytest.mark.parametrize("extra, match", [
    ([], "needs --base MODEL_DIR and one --data"),
    (["--data", "A"], "2 sources but 1 --data"),
    (["--data", "A", "--data", "A", "--density", "0.5"], "takes no --density"),
    (["--data", "A", "--data", "MISSING"], "training file not found"),
])
def test_cli_distill_errors(home, tiny_llama_dir, tmp_path, capsys, extra, match):
    a = write_prompts(tmp_path / "a.jsonl", prompts(1, 4))
    argv = ["fuse", "a,b", "--method", "distill", "--name", "x", "--home", str(home)]
    if extra:
        argv += ["--base", str(tiny_llama_dir)] + [str(a) if e == "A" else str(tmp_path / "nope.jsonl")
                                                   if e == "MISSING" else e for e in extra]
    code = main(argv)
    assert code != 0 and match in capsys.readouterr().err
    with Registry(home) as reg:
        assert [r.name for r in reg.list()] == ["a", "b"]  # nothing written


def test_fuse_points_to_the_offline_distill(llama_basis, sources):
    with pytest.raises(InvalidConfig, match="runs offline: `specfuse fuse MIXTURE --method distill"):
        fuse(sources, [1.0, 1.0], llama_basis, "distill")


def test_cli_distill_options_belong_to_distill_and_merge_points_to_fuse(home, tiny_llama_dir, tmp_path, capsys):
    code = main(["fuse", "a,b", "--steps", "3", "--name", "x", "--home", str(home)])
    assert code != 0 and "--steps: only for --method distill" in capsys.readouterr().err
    code = main(["merge", str(tiny_llama_dir), "a,b", "--method", "distill", "--out", str(tmp_path / "m"),
                 "--home", str(home)])
    assert code != 0 and "runs offline" in capsys.readouterr().err


def test_a_prompt_with_no_room_for_its_completion_is_refused(model, tokenizer, llama_basis, sources):
    long = [{"prompt": "a" * 40}]
    with pytest.raises(TrainingDataError, match="leaves no room for its completion within max_length=16"):
        distill_fuse(model, tokenizer, llama_basis, sources, [1.0, 1.0], [prompts(0, 4), long],
                     DistillConfig(steps=1, max_length=16))
