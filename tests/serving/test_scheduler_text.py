"""Text is made off the engine's thread: deltas, stop strings and final events as a solo full decode gives."""

from __future__ import annotations

import copy
import threading

import pytest

from serving.engine import Engine, EngineConfig, Mixture
from serving.generation import SamplingParams
from serving.scheduler import Event, GenerationRequest, Scheduler, SchedulerConfig, generate


@pytest.fixture(scope="module")
def engine(model, tokenizer, basis):
    return Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=4, residual_slots=2))


def run(engine, requests: list[GenerationRequest]) -> tuple[list[list[Event]], list[set[str]], list[int]]:
    """Every event of every request, the threads that sent them, and the slots pinned when each "done" came."""
    events: list[list[Event]] = [[] for _ in requests]
    threads: list[set[str]] = [set() for _ in requests]
    pinned_at_done = [-1] * len(requests)
    left = threading.Semaphore(0)
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=8)).start()
    try:
        for i, request in enumerate(requests):
            def on_event(event: Event, i=i) -> None:
                events[i].append(event)
                threads[i].add(threading.current_thread().name)
                if event.kind != "text":
                    pinned_at_done[i] = engine.slots.pinned
                    left.release()
            scheduler.submit(request, on_event)
        for _ in requests:
            assert left.acquire(timeout=60)
    finally:
        scheduler.stop()
    return events, threads, pinned_at_done


def test_stop_strings_end_rows_exactly_while_others_run_on(engine, tokenizer, adapters):
    prompts = [tokenizer(p)["input_ids"] for p in ("hello there", "the quick brown fox", "zz")]
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    scheduler = Scheduler(engine).start()
    try:
        full = [generate(scheduler, [GenerationRequest(p, long)])[0] for p in prompts]  # alone, no stop
    finally:
        scheduler.stop()
    assert all(len(f.output) >= 20 for f in full)
    stops = [(full[0].output[8:11],), (full[1].output[15:17], "\u2603never"), ()]
    requests = [GenerationRequest(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=s))
                for p, s in zip(prompts, stops)]
    events, threads, _ = run(engine, requests)
    for i, (f, stop) in enumerate(zip(full, stops)):
        final = events[i][-1]
        assert [e.kind for e in events[i][:-1]] == ["text"] * (len(events[i]) - 1) and final.kind == "done"
        streamed = "".join(e.text for e in events[i])
        assert streamed == final.output
        if stop:
            cut = min(f.output.find(s) for s in stop if s in f.output)
            n = next(n for n in range(1, len(f.token_ids) + 1)  # the token that completed the stop string
                     if any(s in tokenizer.decode(f.token_ids[:n], skip_special_tokens=True) for s in stop))
            assert (final.output, final.finish_reason) == (f.output[:cut], "stop")
            assert final.token_ids == f.token_ids[:n] and final.completion_tokens == n
        else:
            assert (final.output, final.token_ids, final.finish_reason) == (f.output, f.token_ids, "length")
        assert threads[i] == {"specfuse-text"}  # not one event from the engine's thread


def test_a_done_follows_the_release_of_its_slot(engine, tokenizer, adapters):
    mix = engine.prepare(Mixture.of([("scale", 1.0)]), lambda _: adapters["scale"])
    prompt = tokenizer("hello there")["input_ids"]
    scheduler = Scheduler(engine).start()
    try:
        full = generate(scheduler, [GenerationRequest(prompt, SamplingParams(max_tokens=30, temperature=0,
                                                                             ignore_eos=True), mix)])[0]
    finally:
        scheduler.stop()
    stop = full.output[5:8]
    for params in (SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,)),  # ends on a stop
                   SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)):  # ends on length
        events, _, pinned_at_done = run(engine, [GenerationRequest(prompt, params, mix)])
        assert events[0][-1].kind == "done" and pinned_at_done == [0]
