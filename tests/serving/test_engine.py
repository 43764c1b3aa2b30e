"""The engine and the scheduler against the plain reference (dense W + ΔW, one request at a time)."""

from __future__ import annotations

import copy

import pytest
import torch

from serving.engine import Engine, EngineConfig, MixtureSpec
from serving.generation import SamplingParams
from serving.reference import reference_generate, reference_logits
from serving.scheduler import GenerationRequest, Scheduler, SchedulerConfig, generate

KINDS = ["scale", "scale_lora", "svft", "rotation", "additive", "lora", "scale_q"]


@pytest.fixture(scope="module")
def engine(model, tokenizer, basis):
    return Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=8, residual_slots=4))


def single(engine, adapters, name):
    return engine.prepare(MixtureSpec.of([(name, 1.0)]), lambda: [(adapters[name], 1.0)])


def prompts_for(tokenizer, n):
    words = ["hello", "a", "the quick brown fox", "spectral", "zz", "adapters in a batch", "x=1+2", "ok"]
    return [tokenizer(words[i % len(words)] * (1 + i // len(words)))["input_ids"] for i in range(n)]


def test_prefill_logits_match_reference_per_row(engine, model, tokenizer, basis, adapters):
    names = KINDS + ["base"]
    mixtures = {n: single(engine, adapters, n) for n in KINDS}
    slots = {n: engine.slots.acquire(m) for n, m in mixtures.items()}
    prompts = prompts_for(tokenizer, len(names))
    try:
        logits, _, _ = engine.prefill(prompts, [slots.get(n, -1) for n in names])
    finally:
        for s in slots.values():
            engine.slots.release(s)
    for i, name in enumerate(names):
        mixture = [] if name == "base" else [(adapters[name], 1.0)]
        ref = reference_logits(model, basis, prompts[i], mixture)
        torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4, msg=f"row {i} ({name})")
    assert not torch.allclose(logits[0], logits[-1]), "the adapters change the logits"


def test_batched_greedy_generation_equals_solo_reference(engine, model, tokenizer, basis, adapters):
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=16)).start()
    try:
        names = KINDS + ["base"] + KINDS[:3]
        prompts = prompts_for(tokenizer, len(names))
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        requests = [GenerationRequest(p, params, None if n == "base" else single(engine, adapters, n))
                    for p, n in zip(prompts, names)]
        results = generate(scheduler, requests)
    finally:
        scheduler.stop()
    for prompt, name, result in zip(prompts, names, results):
        mixture = [] if name == "base" else [(adapters[name], 1.0)]
        expected = reference_generate(model, basis, prompt, mixture, max_tokens=12)
        assert result.token_ids == expected, name
        assert result.finish_reason == "length" and result.completion_tokens == 12
        assert result.output == tokenizer.decode(expected, skip_special_tokens=True)
    assert engine.slots.pinned == 0, "finished requests unpin their slots"
