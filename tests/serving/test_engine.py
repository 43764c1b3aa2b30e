"""The engine and the scheduler against the plain reference (dense W + ΔW, one request at a time)."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from serving.engine import Engine, EngineConfig, Mixture
from serving.generation import SamplingParams
from serving.reference import reference_generate, reference_logits
from serving.scheduler import GenerationRequest, Scheduler, SchedulerConfig, generate

KINDS = ["scale", "scale_lora", "svft", "rotation", "additive", "lora", "scale_q"]


@pytest.fixture(scope="module")
def engine(model, tokenizer, basis):
    return Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=8, residual_slots=4))


def single(engine, adapters, name):
    return engine.prepare(Mixture.of([(name, 1.0)]), lambda _: adapters[name])


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


def test_fused_mixtures_match_reference(engine, model, tokenizer, basis, adapters):
    from fusion.fuse import fuse

    prompt = prompts_for(tokenizer, 3)[2]
    linear = Mixture.of([("scale", 0.6), ("lora", 0.3), ("rotation", 0.5)])
    pairs = [(adapters["scale"], 0.6), (adapters["lora"], 0.3), (adapters["rotation"], 0.5)]
    ties = Mixture.of([("scale", 0.6), ("svft", 0.4)], "ties", {"density": 0.5})
    ties_pairs = [(adapters["scale"], 0.6), (adapters["svft"], 0.4)]
    misses = engine.mixtures.misses
    cores = {spec: engine.prepare(spec, lambda c: adapters[c.ref]) for spec in (linear, ties)}
    assert engine.prepare(linear, lambda _: pytest.fail("a cached mixture is not fused again")) is cores[linear]
    assert engine.mixtures.misses == misses + 2
    slots = [engine.slots.acquire(cores[linear]), engine.slots.acquire(cores[ties])]
    try:
        logits, _, _ = engine.prefill([prompt, prompt], slots)
    finally:
        for s in slots:
            engine.slots.release(s)
    # linear: against Σ w ΔW of the sources (no fusion code involved); ties: against its fused adapter's dense ΔW
    torch.testing.assert_close(logits[0], reference_logits(model, basis, prompt, pairs), rtol=1e-4, atol=1e-4)
    fused = fuse([a for a, _ in ties_pairs], [w for _, w in ties_pairs], basis, method="ties", density=0.5)
    torch.testing.assert_close(logits[1], reference_logits(model, basis, prompt, [(fused, 1.0)]), rtol=1e-4,
                               atol=1e-4)


def test_staggered_arrivals_and_slot_eviction_equal_reference(model, tokenizer, basis, adapters):
    """Requests join while others decode, through a slot table smaller than the mixtures in flight."""
    engine = Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=3, residual_slots=2))
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=8)).start()
    names = ["scale", "svft", "lora", "rotation", "additive", "scale_q", "base", "svft"]
    prompts = prompts_for(tokenizer, len(names))
    lengths = [20, 5, 9, 14, 3, 11, 7, 6]
    results: dict[int, object] = {}
    try:
        for wave in (range(0, 3), range(3, 6), range(6, 8)):
            requests = [GenerationRequest(prompts[i], SamplingParams(max_tokens=lengths[i], temperature=0,
                                                                     ignore_eos=True),
                                          None if names[i] == "base" else single(engine, adapters, names[i]))
                        for i in wave]
            done = threading.Event()
            waiting = {"n": len(requests)}

            def on_event(event, i, done=done, waiting=waiting):
                if event.kind != "text":
                    results[i] = event
                    waiting["n"] -= 1
                    if waiting["n"] == 0:
                        done.set()

            for i, request in zip(wave, requests):
                scheduler.submit(request, lambda ev, i=i, cb=on_event: cb(ev, i))
            steps = scheduler.steps
            while scheduler.steps < steps + 2 and not done.is_set():  # the next wave arrives mid-decode
                time.sleep(0.001)
        deadline = time.time() + 60
        while len(results) < len(names) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert engine.slots.evictions > 0, "more mixtures than slots: some were evicted and written again"
    for i, name in enumerate(names):
        mixture = [] if name == "base" else [(adapters[name], 1.0)]
        expected = reference_generate(model, basis, prompts[i], mixture, max_tokens=lengths[i])
        assert results[i].token_ids == expected, (i, name)


def test_sampling_is_seeded_and_batch_independent(engine, tokenizer, adapters):
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=8)).start()
    try:
        prompt = prompts_for(tokenizer, 1)[0]
        params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.8, seed=123, ignore_eos=True)
        alone = generate(scheduler, [GenerationRequest(prompt, params, single(engine, adapters, "svft"))])[0]
        crowd = [GenerationRequest(prompt, params, single(engine, adapters, "svft"))] + [
            GenerationRequest(p, SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
            for p in prompts_for(tokenizer, 5)]
        together = generate(scheduler, crowd)[0]
        other_seed = generate(scheduler, [GenerationRequest(prompt, SamplingParams(
            max_tokens=10, temperature=0.9, top_p=0.8, seed=124, ignore_eos=True), single(engine, adapters, "svft"))])
    finally:
        scheduler.stop()
    assert together.token_ids == alone.token_ids
    assert other_seed[0].token_ids != alone.token_ids


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma3"])
def test_other_architectures(arch, tokenizer, make_adapter):
    """GPT-2 (Conv1D layers, weights stored transposed), Qwen2 (q/k/v biases) and Gemma 3 (sliding-window
    layers, served up to the window) route the same way."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from adapters_zoo.basis import basis_from_model

    torch.manual_seed(0)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)).eval()
    elif arch == "gemma3":
        base = Gemma3ForCausalLM(Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, sliding_window=24, layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=128, **ids)).eval()
    else:
        base = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, **ids)).eval()
    basis = basis_from_model(base, rank=8)
    adapter = make_adapter("rotation", {"rank": 6}, basis, 11)
    engine = Engine(copy.deepcopy(base), tokenizer, basis, EngineConfig(slots=2, residual_slots=0))
    assert (engine.max_positions, engine.context_name) == ((24, "sliding window") if arch == "gemma3" else
                                                           (128, "context") if arch == "gpt2" else (32768, "context"))
    mixture = engine.prepare(Mixture.of([("rot", 1.0)]), lambda _: adapter)
    scheduler = Scheduler(engine).start()
    try:
        prompts = prompts_for(tokenizer, 2)
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        results = generate(scheduler, [GenerationRequest(prompts[0], params, mixture),
                                       GenerationRequest(prompts[1], params)])
    finally:
        scheduler.stop()
    assert results[0].token_ids == reference_generate(base, basis, prompts[0], [(adapter, 1.0)], 6)
    assert results[1].token_ids == reference_generate(base, basis, prompts[1], [], 6)


def test_bfloat16_engine_follows_the_float32_one(model, tokenizer, basis, adapters):
    """The GPU dtype path (tables and model in bf16), checked on the CPU against float32."""
    fp32 = Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=2, residual_slots=1))
    bf16 = Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=2, residual_slots=1, dtype="bfloat16"))
    prompt = prompts_for(tokenizer, 3)[2]
    out = []
    for engine in (fp32, bf16):
        slot = engine.slots.acquire(single(engine, adapters, "scale_lora"))
        out.append(engine.prefill([prompt], [slot])[0][0].float())
    assert bf16.model.dtype == torch.bfloat16 and bf16.slots.layers[next(iter(basis.layers))].cores.dtype == \
        torch.bfloat16
    torch.testing.assert_close(out[1], out[0], rtol=0.05, atol=0.1)


def test_our_calls_into_transformers_raise_no_deprecation_warning(model, tokenizer, basis, adapters):
    """Construction (the cache check), prefill, batched decode and the routing probe, with every
    FutureWarning / DeprecationWarning recorded: transformers announces removals that way
    (the KV cache's keyword, for one), and a call that warns today breaks on a later release."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=4, residual_slots=2))
        scheduler = Scheduler(engine, SchedulerConfig(max_batch=4)).start()
        try:
            prompts = prompts_for(tokenizer, 3)
            params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
            generate(scheduler, [GenerationRequest(p, params, single(engine, adapters, "scale") if i else None)
                                 for i, p in enumerate(prompts)])
        finally:
            scheduler.stop()
        engine.run_probe(prompts, projections=True)
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []
