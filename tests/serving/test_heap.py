"""Freed host memory goes back to the OS: the trimmer's schedule, its effect on glibc, and the scheduler's use."""

from __future__ import annotations

import copy
import platform
import threading

import pytest

from adapters_zoo.errors import InvalidConfig
from serving.engine import Engine, EngineConfig
from serving.generation import SamplingParams
from serving.heap import HeapTrimmer, _malloc_trim
from serving.scheduler import GenerationRequest, Scheduler, SchedulerConfig, generate


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trims_at_most_every_interval_and_only_after_work():
    clock, calls = Clock(), []
    heap = HeapTrimmer(10.0, clock, trim=lambda pad: calls.append(pad) or 1)
    assert not heap.maybe_trim()  # nothing done yet
    heap.worked()
    clock.now += 9.9
    assert not heap.maybe_trim()  # the interval has not passed
    clock.now += 0.2
    assert heap.maybe_trim() and calls == [0]
    assert not heap.maybe_trim()  # nothing freed since: no work done
    heap.worked()
    assert not heap.maybe_trim()  # work, but within the interval
    assert heap.maybe_trim(idle=True)  # falling idle after work trims at once
    assert not heap.maybe_trim(idle=True)  # once per idle period
    assert heap.trims == 2 and calls == [0, 0]


def test_interval_zero_never_trims():
    calls = []
    heap = HeapTrimmer(0.0, Clock(), trim=lambda pad: calls.append(pad) or 1)
    heap.worked()
    assert not heap.maybe_trim(idle=True) and calls == []


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_trim_returns_memory_freed_inside_an_arena():
    """56 MB freed in holes between live blocks of a thread's arena stays resident until the trim."""
    trim = _malloc_trim()
    assert trim is not None
    result = {}

    def fragment():
        blocks = [bytearray(16 << 10) for _ in range(4096)]  # 64 MB of 16 KB blocks: malloc'd, not mmap'd
        keep = blocks[7::8]  # every eighth stays: the freed 112 KB holes are never at an arena's top
        result["allocated"] = _rss_kb()
        del blocks
        result["freed"] = _rss_kb()
        trim(0)
        result["trimmed"] = _rss_kb()
        del keep

    thread = threading.Thread(target=fragment)
    thread.start()
    thread.join()
    assert result["freed"] > result["allocated"] - (16 << 10), f"free() returned the holes by itself: {result}"
    assert result["trimmed"] < result["freed"] - (32 << 10), result


def test_heap_trim_setting_is_checked():
    for bad in (-1.0, float("nan")):
        with pytest.raises(InvalidConfig, match="heap_trim_s"):
            SchedulerConfig(heap_trim_s=bad).validate()


def test_the_scheduler_trims_when_it_falls_idle(model, tokenizer, basis):
    engine = Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=2, residual_slots=1))
    scheduler = Scheduler(engine, SchedulerConfig(heap_trim_s=3600.0))
    calls = []
    scheduler.heap = HeapTrimmer(3600.0, trim=lambda pad: calls.append(pad) or 1)
    scheduler.start()
    try:
        prompt = tokenizer("hello there")["input_ids"]
        generate(scheduler, [GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0))])
        for _ in range(200):  # the loop falls idle right after the request ends
            if calls:
                break
            threading.Event().wait(0.01)
        assert calls == [0] and scheduler.heap.trims == 1
    finally:
        scheduler.stop()
    off = Scheduler(engine, SchedulerConfig(heap_trim_s=0.0))
    assert off.heap.interval_s == 0.0


FAULT_LOOP = """
import resource, sys, torch
from serving.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
sizes = [2**21, 3 * 2**19, 2**20, 5 * 2**20]  # float32: 8, 6, 4 and 20 MiB, below the kept-block bound
def cycle():
    for n in sizes:
        a = torch.ones(n); b = torch.ones(n // 2); del a; c = torch.ones(n // 3); del b, c
for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
pages = 10 * sum(n + n // 2 + n // 3 for n in sizes) * 4 // 4096
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, pages)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_freed_memory_is_reused_without_page_faults():
    """After keep_freed_memory, a steady cycle of multi-MiB tensors (a forward's activations) reuses freed
    blocks: under 5% of the pages it writes fault in (glibc's defaults fault in a large share of them)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FAULT_LOOP, "keep"], capture_output=True, text=True, check=True)
    faults, pages = map(int, run.stdout.split())
    assert faults < 0.05 * pages, (faults, pages)


def test_a_cpu_engine_keeps_freed_memory(model, tokenizer, basis, monkeypatch):
    import serving.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append(1) or True)
    Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(device="cpu", slots=2, residual_slots=1))
    assert calls == [1]
