"""Training on the hardware: precision, gradient accumulation and checkpointing give the adapter they should."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_zoo.basis import basis_from_model
from adapters_zoo.errors import InvalidConfig
from adapters_zoo.format import new_adapter
from adapters_zoo.inject import SpectralLinear, attach, detach
from adapters_zoo.loop import eval_loss
from adapters_zoo.models import attached
from adapters_zoo.tasks import read_jsonl
from adapters_zoo.train import train_adapter
from adapters_zoo.train_config import TrainConfig
from adapters_zoo.train_runtime import precision_dtype
from serving.cli import main

FAST = {"kind": "scale", "kind_config": {"rank": 8}, "steps": 6, "lr": 0.05, "signature": False}


@pytest.fixture()
def llama(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True).eval()
    return model, basis_from_model(model, 8)


@pytest.fixture(scope="module")
def examples(reverse_task):
    return read_jsonl(reverse_task["train"])[:32]


def _train(model, basis, tokenizer, examples, preserve=None, **cfg):
    adapter, stats = train_adapter(model, tokenizer, basis, examples, TrainConfig(**(FAST | cfg)),
                                   preserve_examples=preserve, progress=False, verify_basis=False)
    return adapter, stats


def _max_diff(a, b) -> float:
    return max(float((a.params[layer][n] - b.params[layer][n]).abs().max())
               for layer in a.layers for n in a.params[layer])


def test_grad_accum_of_two_micro_batches_equals_one_batch_twice_the_size(llama, tokenizer, examples):
    model, basis = llama
    preserve = [{"prompt": ex["prompt"]} for ex in examples[:16]]
    whole, s1 = _train(model, basis, tokenizer, examples, preserve, batch_size=8)
    accum, s2 = _train(model, basis, tokenizer, examples, preserve, batch_size=4, grad_accum=2)
    assert _max_diff(whole, accum) <= 1e-5
    assert s1.first_loss == pytest.approx(s2.first_loss, abs=1e-5)
    assert s1.final_kl == pytest.approx(s2.final_kl, abs=1e-6)
    single, _ = _train(model, basis, tokenizer, examples, preserve, batch_size=4)  # the check can fail
    assert _max_diff(whole, single) > 1e-4


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_adapter(llama, tokenizer, examples):
    model, basis = llama
    calls = []
    forward = SpectralLinear.forward

    def counted(self, x):
        calls.append(torch.is_grad_enabled())
        return forward(self, x)

    plain, _ = _train(model, basis, tokenizer, examples, batch_size=8, steps=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SpectralLinear, "forward", counted)
        _train(model, basis, tokenizer, examples, batch_size=8, steps=2)
        without = len(calls)
        calls.clear()
        checkpointed, _ = _train(model, basis, tokenizer, examples, batch_size=8, steps=2, gradient_checkpointing=True)
    assert len(calls) == 2 * without  # every wrapped layer runs again in backward
    assert _max_diff(plain, checkpointed) <= 1e-6
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # switched off after


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_base_trains_a_float32_adapter(llama, tokenizer, examples, reverse_task, precision, dtype):
    held_out = read_jsonl(reverse_task["validation"])[:16]
    model, basis = llama
    adapter, stats = _train(model, basis, tokenizer, examples, batch_size=8, steps=20, precision=precision)
    assert next(model.parameters()).dtype == dtype  # the base was held in the low precision
    assert all(t.dtype == torch.float32 for layer in adapter.layers for t in adapter.params[layer].values())
    assert stats.final_loss < stats.first_loss - 0.3
    fp32 = AutoModelForCausalLM.from_pretrained(model.name_or_path, local_files_only=True).eval()
    before = eval_loss(fp32, tokenizer, held_out)
    with attached(fp32, adapter, basis):  # what was learnt in low precision holds in float32
        assert eval_loss(fp32, tokenizer, held_out) < before - 0.1


def test_spectral_core_stays_float32_under_autocast(llama, monkeypatch):
    model, basis = llama
    layer = basis.layer_names()[0]
    adapter = new_adapter("scale", {"rank": 8}, basis, [layer])
    adapter.params[layer] = {n: torch.randn_like(t) for n, t in adapter.params[layer].items()}
    x = torch.randn(2, 3, basis[layer].V.shape[0])
    with attached(model, adapter, basis):
        reference = model.get_submodule(layer)(x)  # float32 throughout
    model.to(torch.bfloat16)
    (wrapper,) = attach(model, adapter, basis)  # the adapter stays float32 over a bf16 base
    try:
        cores = []
        kind = wrapper.kind
        monkeypatch.setattr(wrapper, "kind", SimpleNamespace(
            core=lambda *a: cores.append(kind.core(*a)) or cores[-1], residual=kind.residual))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = wrapper(x.to(torch.bfloat16))
        assert wrapper.base_layer.weight.dtype == torch.bfloat16 and wrapper.V.dtype == torch.float32
        assert cores[0].dtype == torch.float32 and y.dtype == torch.bfloat16
        assert torch.allclose(y.float(), reference, atol=0.05, rtol=0.02)
    finally:
        detach(model)


def test_bad_precision_and_accumulation_are_config_errors(monkeypatch):
    with pytest.raises(InvalidConfig, match=r"unknown precision 'fp8' \(use fp32, bf16, fp16\)"):
        TrainConfig(precision="fp8").validate()
    with pytest.raises(InvalidConfig, match=r"grad_accum must be ≥ 1, got 0"):
        TrainConfig(grad_accum=0).validate()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(InvalidConfig, match=r"precision bf16 asked for, but Tesla V100 has no bfloat16 support"):
        precision_dtype("bf16", torch.device("cuda"))
    assert precision_dtype("fp16", torch.device("cuda")) == torch.float16


@pytest.mark.parametrize("flags,message", [
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--grad-accum", "0"], "grad_accum must be ≥ 1, got 0"),
])
def test_train_cli_names_a_bad_flag_in_one_line(tiny_llama_dir, reverse_task, tmp_path, capsys, flags, message):
    rc = main(["train", str(tiny_llama_dir), "--kind", "scale", "--data", str(reverse_task["train"]),
               "--out", str(tmp_path / "a.safetensors"), "--home", str(tmp_path / "home"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
