"""The ecosystem's trainer: trl.SFTTrainer trains a prepared model; the saved file loads, registers and serves."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import specfuse
from adapters_zoo.errors import BasisMismatch, InvalidConfig
from adapters_zoo.inject import SpectralLinear
from adapters_zoo.loop import eval_loss
from adapters_zoo.models import attached
from adapters_zoo.registry import Registry
from adapters_zoo.tasks import read_jsonl
from serving.engine import Engine, EngineConfig, Mixture
from serving.reference import reference_logits

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


def test_prepare_freezes_the_base_and_trains_only_the_adapter(tiny_llama_dir, other_llama_dir):
    model = _load(tiny_llama_dir)
    basis = specfuse.basis_from_model(model, 8)
    with pytest.raises(BasisMismatch):
        specfuse.prepare_for_training(_load(other_llama_dir), basis, kind="scale", rank=8)
    with pytest.raises(InvalidConfig, match="call prepare_for_training"):
        specfuse.save_trained(model, "x.safetensors")
    specfuse.prepare_for_training(model, basis, kind="scale", rank=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = [m for m in model.modules() if isinstance(m, SpectralLinear)]
    assert len(wrapped) == len(basis.layers) and trainable
    assert {id(p) for p in trainable} == {id(p) for m in wrapped for p in m.adapter_params.values()}
    assert {id(p) for p in specfuse.trainable_parameters(model)} == {id(p) for p in trainable}
    assert all(p.dtype == torch.float32 for p in trainable)
    with pytest.raises(InvalidConfig, match="prepared already"):
        specfuse.prepare_for_training(model, basis, kind="scale", rank=8)


def test_sft_trainer_trains_an_adapter_that_loads_registers_and_serves(tiny_llama_dir, tokenizer, reverse_task,
                                                                       tmp_path):
    train = read_jsonl(reverse_task["train"])
    held_out = read_jsonl(reverse_task["validation"])[:16]
    model = _load(tiny_llama_dir)
    basis = specfuse.basis_from_model(model, 8)
    before = eval_loss(model, tokenizer, held_out)

    model = specfuse.prepare_for_training(model, basis, kind="scale", rank=8)
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=30, per_device_train_batch_size=16,
                         learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1, report_to="none",
                         save_strategy="no", use_cpu=True, seed=0, max_length=64, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train),
                             processing_class=tokenizer)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 0.5

    path = specfuse.save_trained(model, tmp_path / "reverse.safetensors", tokenizer=tokenizer,
                                 prompts=[ex["prompt"] for ex in train], meta={"task": "reverse"})
    adapter = specfuse.load_adapter(path)
    assert adapter.meta["name"] == "reverse" and adapter.meta["task"] == "reverse"
    assert len(adapter.meta["signature"]) > 0 and adapter.meta["signature_model"] == basis.fingerprint

    base = _load(tiny_llama_dir)
    with attached(base, adapter, basis):  # what SFTTrainer learnt holds on a fresh base
        assert eval_loss(base, tokenizer, held_out) < before - 0.5
    with Registry(tmp_path / "home") as registry:
        registry.add_basis(basis)
        registry.add(path, "reverse")
        served = registry.load("reverse")
    engine = Engine(copy.deepcopy(base), tokenizer, basis, EngineConfig(slots=2, residual_slots=1))
    prompt = tokenizer(held_out[0]["prompt"])["input_ids"]
    slot = engine.slots.acquire(engine.prepare(Mixture.of([("reverse", 1.0)]), lambda _: served))
    try:
        logits, _, _ = engine.prefill([prompt], [slot])
    finally:
        engine.slots.release(slot)
    torch.testing.assert_close(logits[0], reference_logits(base, basis, prompt, [(adapter, 1.0)]),
                               rtol=1e-4, atol=1e-4)
