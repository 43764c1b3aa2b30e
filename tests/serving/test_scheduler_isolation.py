"""One request's numerical failure ends that request alone; every accepted request gets its final event."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from adapters_zoo.errors import NumericalFailure
from serving.engine import Engine, EngineConfig, Mixture
from serving.generation import SamplingParams
from serving.scheduler import Event, GenerationRequest, Scheduler, SchedulerConfig, generate
from serving.slots import MixtureCores

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(model, tokenizer, basis):
    return Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=4, residual_slots=2))


def mixture(engine, adapters, name: str) -> MixtureCores:
    return engine.prepare(Mixture.of([(name, 1.0)]), lambda _: adapters[name])


def poisoned(engine, adapters, tag: int, value: float) -> MixtureCores:
    """A mixture whose cores are ``value`` everywhere: built past every bound, as a bug would."""
    good = mixture(engine, adapters, "scale")
    cores = {layer: None if c is None else torch.full_like(c, value) for layer, c in good.cores.items()}
    return MixtureCores(Mixture.of([(f"poison{tag}", 1.0)]), cores, {}, False, 0)


class Collector:
    """Every event of every submitted request, and a way to wait for all final ones."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.final: dict[int, Event] = {}
        self.count = 0
        self.done = threading.Condition()

    def submit(self, request: GenerationRequest) -> int:
        index = self.count
        self.count += 1

        def on_event(event: Event) -> None:
            if event.kind != "text":
                with self.done:
                    assert index not in self.final, "one final event per request"
                    self.final[index] = event
                    self.done.notify_all()

        self.scheduler.submit(request, on_event)
        return index

    def wait(self, timeout: float = 60.0) -> dict[int, Event]:
        with self.done:
            assert self.done.wait_for(lambda: len(self.final) == self.count, timeout), \
                f"{self.count - len(self.final)} accepted requests never ended"
        return self.final


def solo(engine, prompt, params, mix) -> list[int]:
    scheduler = Scheduler(engine).start()
    try:
        return generate(scheduler, [GenerationRequest(prompt, params, mix)])[0].token_ids
    finally:
        scheduler.stop()


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_a_row_whose_logits_blow_up_fails_alone(engine, adapters, tokenizer, value):
    prompt = tokenizer("hello there")["input_ids"]
    good = mixture(engine, adapters, "rotation")
    expected = {"base": solo(engine, prompt, GREEDY, None), "rotation": solo(engine, prompt, SAMPLED, good)}
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=8)).start()
    try:
        events = Collector(scheduler)
        base = events.submit(GenerationRequest(prompt, GREEDY, None))
        adapter = events.submit(GenerationRequest(prompt, SAMPLED, good))
        # poisoned rows, greedy and sampled, prefilled together with the two healthy ones
        bad = [events.submit(GenerationRequest(prompt, params, poisoned(engine, adapters, i, value)))
               for i, params in enumerate([GREEDY, SAMPLED])]
        final = events.wait()
    finally:
        scheduler.stop()
    for i in bad:
        assert final[i].kind == "error" and isinstance(final[i].error, NumericalFailure)
        assert "NaN or infinite" in str(final[i].error)
    assert final[base].kind == "done" and final[base].token_ids == expected["base"]
    assert final[adapter].kind == "done" and final[adapter].token_ids == expected["rotation"]
    assert engine.slots.pinned == 0


def test_poison_joining_a_running_batch_leaves_the_running_rows_alone(engine, adapters, tokenizer):
    prompt = tokenizer("a long one")["input_ids"]
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    expected = solo(engine, prompt, long, None)
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=8)).start()
    try:
        events = Collector(scheduler)
        running = events.submit(GenerationRequest(prompt, long, None))
        while scheduler.steps < 3:
            threading.Event().wait(0.005)
        bad = [events.submit(GenerationRequest(prompt, SAMPLED, poisoned(engine, adapters, 10 + i, float("nan"))))
               for i in range(3)]
        final = events.wait()
    finally:
        scheduler.stop()
    assert all(final[i].kind == "error" for i in bad)
    assert final[running].kind == "done" and final[running].token_ids == expected


def test_more_poisoned_mixtures_than_slots_never_pin_them(engine, adapters, tokenizer):
    """Pre-fix, each failed prefill left its slot pinned: slots+1 bad requests stopped adapter serving."""
    prompt = tokenizer("pin")["input_ids"]
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=2)).start()
    try:
        events = Collector(scheduler)
        bad = [events.submit(GenerationRequest(prompt, SAMPLED, poisoned(engine, adapters, 20 + i, float("nan"))))
               for i in range(2 * engine.slots.num_slots)]
        events.wait()
        assert all(events.final[i].kind == "error" for i in bad)
        assert engine.slots.pinned == 0
        after = generate(scheduler, [GenerationRequest(prompt, GREEDY, mixture(engine, adapters, "svft"))], 30)
        assert after[0].kind == "done" and after[0].completion_tokens == 10
    finally:
        scheduler.stop()


def test_sampling_that_fails_for_one_row_ends_that_row(engine, adapters, tokenizer):
    """A temperature so small that logits / T overflows: that row's sampling fails, its neighbours go on."""
    prompt = tokenizer("tiny temperature")["input_ids"]
    overflowing = SamplingParams(max_tokens=5, temperature=1e-300, seed=1, ignore_eos=True)
    expected = solo(engine, prompt, SAMPLED, None)
    scheduler = Scheduler(engine).start()
    try:
        results = generate(scheduler, [GenerationRequest(prompt, overflowing, None),
                                       GenerationRequest(prompt, SAMPLED, None)], 30)
    finally:
        scheduler.stop()
    assert results[0].kind == "error" and isinstance(results[0].error, NumericalFailure)
    assert results[1].kind == "done" and results[1].token_ids == expected


def test_a_request_cancelled_while_waiting_ends_counted_as_cancelled(engine, tokenizer):
    from serving.scheduler import SchedulerObserver

    prompt = tokenizer("queue")["input_ids"]
    finished: list[tuple[str, str, int]] = []

    class Finishes(SchedulerObserver):
        def on_finish(self, handle, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
            finished.append((handle.request.request_id, reason, prompt_tokens))

    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1), Finishes()).start()
    ended = threading.Event()
    try:
        running = scheduler.submit(GenerationRequest(prompt, SamplingParams(max_tokens=150, temperature=0,
                                                                            ignore_eos=True)), lambda e: None)
        while scheduler.running == 0:
            threading.Event().wait(0.005)
        waiting = GenerationRequest(prompt, GREEDY)
        scheduler.submit(waiting, lambda e: e.kind == "done" and ended.set()).cancel()  # the one row is taken
        assert ended.wait(60)
        running.cancel()
    finally:
        scheduler.stop()
    assert (waiting.request_id, "cancelled", 0) in finished, "nothing was prefilled, the end is counted"
