"""Training: loss on completions only, every kind learns, the base stays untouched, KL preserve, slices, data errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_zoo.basis import basis_from_model
from adapters_zoo.data import IGNORE_INDEX, encode_example, load_examples, pad_batch
from adapters_zoo.errors import BasisMismatch, InvalidConfig, ModelDirError, TrainingDataError, TrainingDiverged
from adapters_zoo.format import load_adapter, save_adapter
from adapters_zoo.inject import SpectralLinear
from adapters_zoo.loop import Schedule, eval_loss, kl_base_to_adapted
from adapters_zoo.models import attached, load_model_dir
from adapters_zoo.tasks import make_split, read_jsonl, suite_tasks
from adapters_zoo.train import train_adapter
from adapters_zoo.train_config import TrainConfig

KINDS = {  # kind -> config: every trainable kind, on the top 8 directions of a k = 8 basis
    "scale": {"rank": 8},
    "svft": {"pattern": "banded", "d": 1},
    "rotation": {"rank": 8},
    "additive": {"rank": 4},
    "lora": {"rank": 4},
}
FAST = {"steps": 40, "lr": 0.05, "batch_size": 16}  # a few dozen steps on a tiny model


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    return model, basis_from_model(model, 8)


@pytest.fixture(scope="module")
def data(reverse_task):
    return read_jsonl(reverse_task["train"]), read_jsonl(reverse_task["validation"])


# --------------------------------------------------------------------------- data files


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("content,message", [
    ("", r"no examples \(the file is empty\)"),
    ("\n  \n", r"no examples \(the file is empty\)"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r":2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n\n["a", "b"]\n', r":3: expected an object"),
    ('{"prompt": "a"}\n', r":1: missing key 'completion'"),
    ('{"completion": "a"}\n', r":1: missing key 'prompt'"),
    ('{"prompt": 3, "completion": "b"}\n', r":1: 'prompt' must be a string, got int"),
    ('{"prompt": "a", "completion": null}\n', r":1: 'completion' must be a string, got NoneType"),
    ('{"prompt": "a", "completion": ""}\n', r":1: 'completion' is empty"),
])
def test_bad_training_files_name_the_problem_and_line(tmp_path, content, message):
    path = _write(tmp_path / "train.jsonl", content)
    with pytest.raises(TrainingDataError, match=message):
        load_examples(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(TrainingDataError, match="training file not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(TrainingDataError, match="not UTF-8"):
        load_examples(_write(tmp_path / "bin.jsonl", b'{"prompt": "\xff\xfe"}\n'))


def test_preserve_files_need_only_prompts(tmp_path):
    path = _write(tmp_path / "keep.jsonl", '{"prompt": "a=", "extra": 1}\n{"prompt": "b=", "completion": "c"}\n')
    assert load_examples(path, need_completion=False) == [{"prompt": "a="}, {"prompt": "b=", "completion": "c"}]
    with pytest.raises(TrainingDataError, match="missing key 'completion'"):
        load_examples(path)


def test_labels_cover_the_completion_only(tokenizer):
    ids, labels, cut = encode_example(tokenizer, {"prompt": "flip:ab=", "completion": "ba</s>"}, 64)
    prompt = tokenizer("flip:ab=")["input_ids"]
    completion = tokenizer("ba</s>", add_special_tokens=False)["input_ids"]
    assert ids == prompt + completion and not cut
    assert labels == [IGNORE_INDEX] * len(prompt) + completion
    assert completion[-1] == tokenizer.eos_token_id
    ids, labels, cut = encode_example(tokenizer, {"prompt": "ab=", "completion": "abcdefgh"}, 8)
    assert cut and len(ids) == len(labels) == 8 and labels[:4] == [IGNORE_INDEX] * 4
    with pytest.raises(TrainingDataError, match="no room for its completion"):
        encode_example(tokenizer, {"prompt": "x" * 20, "completion": "y"}, 8)
    batch = pad_batch([(ids, labels), ([5, 6], [IGNORE_INDEX, 6])], pad_id=0, device="cpu")
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * 6
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 6] + [IGNORE_INDEX] * 6


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    steps, ratio = 100, 0.1
    factors = [Schedule.with_warmup_ratio(steps, 1.0, ratio).factor(s) for s in range(steps)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and 0 < factors[-1] < 0.001
    assert Schedule.with_warmup_ratio(10, 1.0, 0.0).factor(0) == 1.0


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_lowers_held_out_loss_and_leaves_base_untouched(llama, data, tokenizer, tmp_path, kind):
    model, basis = llama
    train, held_out = data
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = eval_loss(model, tokenizer, held_out)

    cfg = TrainConfig(kind=kind, kind_config=KINDS[kind], **FAST)
    adapter, stats = train_adapter(model, tokenizer, basis, train, cfg, progress=False)

    # the model is handed back as it came: same weights bit for bit, no wrappers, no gradients
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert eval_loss(model, tokenizer, held_out) == before

    with attached(model, adapter, basis):
        after = eval_loss(model, tokenizer, held_out)
    print(f"\n{kind}: held-out loss {before:.4f} -> {after:.4f} ({stats.trainable_params} params)")
    assert after < before - 0.05, f"{kind}: held-out loss {before:.4f} -> {after:.4f}"
    assert stats.final_loss < stats.first_loss
    assert stats.steps == FAST["steps"] and stats.examples == len(train) and stats.device == "cpu"
    assert stats.trainable_params == adapter.num_params() > 0
    recorded = adapter.meta["train"]
    assert recorded["stats"]["final_loss"] == stats.final_loss and recorded["settings"]["lr"] == FAST["lr"]

    # the trained adapter survives its file bit for bit, and still gives the same loss
    loaded = load_adapter(save_adapter(adapter, tmp_path / f"{kind}.safetensors"), basis)
    for layer, params in adapter.params.items():
        for name, t in params.items():
            assert torch.equal(loaded.params[layer][name], t), (layer, name)
    assert loaded.meta == json.loads(json.dumps(adapter.meta))
    with attached(model, loaded, basis):
        assert eval_loss(model, tokenizer, held_out) == after


@pytest.mark.parametrize("arch,kind", [("gpt2", "rotation"), ("gpt2", "lora"), ("qwen2", "scale")])
def test_training_works_on_other_architectures(model_dirs, tokenizer, data, arch, kind):
    model = _load(model_dirs[arch])
    basis = basis_from_model(model, 8)
    train, held_out = data
    before = eval_loss(model, tokenizer, held_out)
    adapter, _ = train_adapter(model, tokenizer, basis, train, TrainConfig(kind=kind, kind_config=KINDS[kind], **FAST),
                               progress=False)
    with attached(model, adapter, basis):
        after = eval_loss(model, tokenizer, held_out)
    assert after < before - 0.05, f"{arch}/{kind}: {before:.4f} -> {after:.4f}"


def test_training_is_seeded(llama, data, tokenizer):
    model, basis = llama
    train = data[0]
    run = dict(kind="lora", kind_config={"rank": 2}, steps=5, lr=0.05, batch_size=8)
    a, _ = train_adapter(model, tokenizer, basis, train, TrainConfig(seed=1, **run), progress=False)
    b, _ = train_adapter(model, tokenizer, basis, train, TrainConfig(seed=1, **run), progress=False)
    c, _ = train_adapter(model, tokenizer, basis, train, TrainConfig(seed=2, **run), progress=False)
    layer = a.layers[0]
    assert all(torch.equal(a.params[layer][n], b.params[layer][n]) for n in a.params[layer])
    assert not torch.equal(a.params[layer]["B"], c.params[layer]["B"])


def test_slice_trains_only_its_directions(llama, data, tokenizer):
    model, basis = llama
    cfg = TrainConfig(kind="scale", kind_config={"slice": "2:5"}, targets="q_proj,down_proj", steps=10, lr=0.05)
    adapter, _ = train_adapter(model, tokenizer, basis, data[0], cfg, progress=False)
    assert adapter.layers == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    for layer in adapter.layers:
        assert adapter.params[layer]["lam"].shape == (3,)
        core = adapter.core(layer, basis)  # (8, 8), nonzero only on directions 2, 3, 4
        outside = core.clone()
        outside[2:5, 2:5] = 0
        assert torch.count_nonzero(outside) == 0 and torch.count_nonzero(core.diagonal()[2:5]) == 3


def test_preserve_term_keeps_other_prompts_close_to_the_base(llama, data, tokenizer):
    model, basis = llama
    upper = next(t for t in suite_tasks("conflicting") if t.name == "upper")
    keep = [{"prompt": ex["prompt"]} for ex in make_split(upper, "train", 32)]
    check = [{"prompt": ex["prompt"]} for ex in make_split(upper, "validation", 32)]
    batch = pad_batch([encode_example(tokenizer, ex, 64)[:2] for ex in check], tokenizer.pad_token_id, "cpu")

    def kl_on_check(adapter) -> float:
        with torch.no_grad():
            base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with attached(model, adapter, basis):
                adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(kl_base_to_adapted(base, adapted, batch["attention_mask"]))

    free, _ = train_adapter(model, tokenizer, basis, data[0], TrainConfig(kind="lora", kind_config={"rank": 4},
                                                                            kl_weight=0.0, **FAST),
                            preserve_examples=keep, progress=False)
    kept, stats = train_adapter(model, tokenizer, basis, data[0], TrainConfig(kind="lora", kind_config={"rank": 4},
                                                                              kl_weight=5.0, **FAST),
                                preserve_examples=keep, progress=False)
    assert stats.final_kl is not None and stats.final_kl >= 0
    assert kl_on_check(kept) < 0.5 * kl_on_check(free)


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.long)
    assert float(kl_base_to_adapted(logits, logits, mask)) == pytest.approx(0.0, abs=1e-6)
    p, q = torch.log_softmax(logits, -1), torch.log_softmax(logits + torch.randn(2, 5, 11), -1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    assert float(kl_base_to_adapted(logits, q, mask)) == pytest.approx(float(expected), rel=1e-5)


def test_training_refuses_bad_setups(llama, data, tokenizer, other_llama_dir):
    model, basis = llama
    train = data[0]
    with pytest.raises(BasisMismatch, match="another base model"):
        train_adapter(_load(other_llama_dir), tokenizer, basis, train, TrainConfig(steps=1), progress=False)
    small = basis_from_model(model, 8, "q_proj")
    with pytest.raises(BasisMismatch, match="compute the basis with these targets"):
        train_adapter(model, tokenizer, small, train, TrainConfig(targets="v_proj", steps=1), progress=False)
    for bad in ({"steps": 0}, {"lr": -1.0}, {"batch_size": 0}, {"warmup_ratio": 1.0}, {"kl_weight": -1.0}):
        with pytest.raises(InvalidConfig):
            train_adapter(model, tokenizer, basis, train, TrainConfig(**bad), progress=False)
    with pytest.raises(TrainingDataError, match="no training examples"):
        train_adapter(model, tokenizer, basis, [], TrainConfig(steps=1), progress=False)
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        train_adapter(model, tokenizer, basis, train, TrainConfig(kind="scale", lr=1e30, steps=5), progress=False)
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())  # restored after the failure


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda(tiny_llama_dir, data, tokenizer):
    model = _load(tiny_llama_dir)
    basis = basis_from_model(model, 8)
    train, held_out = data
    before = eval_loss(model, tokenizer, held_out)
    adapter, stats = train_adapter(model, tokenizer, basis, train, TrainConfig(kind="rotation", device="cuda", **FAST),
                                   progress=False)
    assert stats.device.startswith("cuda") and next(model.parameters()).is_cuda
    assert all(t.device.type == "cpu" for p in adapter.params.values() for t in p.values())
    with attached(model, adapter, basis):
        after = eval_loss(model, tokenizer, held_out)
    assert after < before - 0.05


def test_asking_for_a_missing_device_is_a_config_error(llama, data, tokenizer):
    model, basis = llama
    with pytest.raises(InvalidConfig, match="CUDA device"):
        train_adapter(model, tokenizer, basis, data[0], TrainConfig(steps=1, device="cuda:99"), progress=False)
    with pytest.raises(InvalidConfig, match="unknown device"):
        train_adapter(model, tokenizer, basis, data[0], TrainConfig(steps=1, device="tpu9"), progress=False)


def test_load_model_dir(tiny_llama_dir, tmp_path):
    model, tok = load_model_dir(tiny_llama_dir, "cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training and tok.eos_token == "</s>"
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ModelDirError, match="no config.json"):
        load_model_dir(tmp_path, "cpu")
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ModelDirError):
        load_model_dir(tmp_path, "cpu")  # a config without tokenizer or weights
