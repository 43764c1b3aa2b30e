"""Prometheus metrics in the text exposition format, without a client library.

    specfuse_requests_total{endpoint,status}          counter
    specfuse_request_seconds{endpoint}                histogram (whole request)
    specfuse_time_to_first_token_seconds              histogram
    specfuse_prompt_tokens_total / _completion_tokens_total
    specfuse_batch_rows{phase}                        histogram (rows per prefill / decode step)
    specfuse_step_seconds{phase}                      histogram
    specfuse_mixture_ready_seconds                    histogram (a new mixture: reduced + written to a slot)
    specfuse_slot_cache_{hits,misses,evictions}_total device slot table
    specfuse_mixture_cache_{hits,misses}_total        host cache of fused mixtures
    specfuse_requests_{running,waiting}, specfuse_slots_{occupied,pinned}   gauges

The scheduler reports through the :class:`serving.scheduler.SchedulerObserver` hooks;
values owned by other objects (slot table counters, queue length) are read at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

from serving.scheduler import RequestHandle, SchedulerObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
READY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            lines += [f"{self.name}{_labels(k)} {v:g}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.series: dict[Labels, list[float]] = {}  # per labels: bucket counts..., +Inf count, sum
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            s = self.series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            s[bisect.bisect_left(self.buckets, value)] += 1  # the first bucket with value <= bound
            s[-1] += value

    def count(self, **labels: str) -> int:
        s = self.series.get(tuple(sorted(labels.items())))
        return 0 if s is None else int(sum(s[:-1]))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for key, s in sorted(self.series.items()):
                cumulative = 0.0
                for bound, n in [*zip(self.buckets, s), (None, s[len(self.buckets)])]:
                    cumulative += n
                    le = 'le="+Inf"' if bound is None else f'le="{bound:g}"'
                    lines.append(f"{self.name}_bucket{_labels(key, le)} {cumulative:g}")
                lines.append(f"{self.name}_sum{_labels(key)} {s[-1]:.6g}")
                lines.append(f"{self.name}_count{_labels(key)} {cumulative:g}")
        return lines


class Gauge:
    """A value read from somewhere else when scraped."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge"):
        self.name, self.help, self.read, self.kind = name, help_text, read, kind

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", f"{self.name} {self.read():g}"]


class Metrics(SchedulerObserver):
    def __init__(self) -> None:
        self.requests = Counter("specfuse_requests_total", "HTTP requests by endpoint and status code")
        self.latency = Histogram("specfuse_request_seconds", "HTTP request latency", LATENCY_BUCKETS)
        self.ttft = Histogram("specfuse_time_to_first_token_seconds", "submit to first generated text",
                              LATENCY_BUCKETS)
        self.prompt_tokens = Counter("specfuse_prompt_tokens_total", "prompt tokens prefilled")
        self.completion_tokens = Counter("specfuse_completion_tokens_total", "tokens generated")
        self.finished = Counter("specfuse_generations_total", "generations by finish reason")
        self.batch_rows = Histogram("specfuse_batch_rows", "rows per engine step", BATCH_BUCKETS)
        self.step_seconds = Histogram("specfuse_step_seconds", "engine step duration", LATENCY_BUCKETS)
        self.mixture_ready = Histogram("specfuse_mixture_ready_seconds", "a new mixture reduced on the host and "
                                       "written into a device slot: ready for its first decode step", READY_BUCKETS)
        self.read_outs: list[Gauge] = []

    def watch(self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge") -> None:
        self.read_outs.append(Gauge(name, help_text, read, kind))

    # scheduler hooks (called from the scheduler thread)
    def on_step(self, phase: str, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows, phase=phase)
        self.step_seconds.observe(seconds, phase=phase)

    def on_finish(self, handle: RequestHandle, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.finished.inc(reason=reason)

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.latency, self.ttft, self.prompt_tokens, self.completion_tokens,
                       self.finished, self.batch_rows, self.step_seconds, self.mixture_ready, *self.read_outs):
            lines += metric.render()
        return "\n".join(lines) + "\n"
