"""The bridge from the scheduler's thread to an HTTP request's event loop.

:class:`Generation` queues ``len(prompts) * n`` generations for one request and yields
their events, in the loop, as (choice index, event). Leaving early (a client that went
away) or ``cancel`` cancels whatever still runs, which frees its row and unpins its slot
at the scheduler's next iteration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from fusion.mixture import MixtureCores
from serving.generation import SamplingParams
from serving.metrics import Metrics
from serving.scheduler import Event, GenerationRequest, RequestHandle, Scheduler


class Generation:
    """Generations queued for one HTTP request, read back as (choice index, event).

    Built inside the event loop. ``cancel`` (or leaving ``events`` early: a client that
    went away) cancels whatever still runs, which frees its row and unpins its slot at
    the scheduler's next iteration.
    """

    def __init__(self, scheduler: Scheduler, metrics: Metrics, prompts: list[list[int]], params: SamplingParams,
                 n: int, mixture: MixtureCores | None | list[MixtureCores | None]):
        self.metrics = metrics
        mixtures = mixture if isinstance(mixture, list) else [mixture] * len(prompts)  # a list: one per prompt
        self.count = len(prompts) * n
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._handles: list[RequestHandle] = []
        self._start = time.perf_counter()
        try:
            for i, ids in enumerate(prompts):
                for j in range(n):
                    p = params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)
                    request = GenerationRequest(ids, p, mixtures[i])
                    self._handles.append(scheduler.submit(request, self._callback(i * n + j)))
        except BaseException:
            self.cancel()
            raise

    def _callback(self, index: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))
        return on_event

    async def events(self, disconnected: Callable[[], Awaitable[bool]] | None = None,
                     poll_s: float = 0.5) -> AsyncIterator[tuple[int, Event]]:
        remaining, first = self.count, True
        checked = time.perf_counter()
        try:
            while remaining:
                try:
                    index, event = await asyncio.wait_for(self._queue.get(), timeout=poll_s)
                except asyncio.TimeoutError:
                    index, event = -1, None
                if disconnected is not None and time.perf_counter() - checked >= poll_s:
                    checked = time.perf_counter()  # checked between events too: a busy stream still notices
                    if await disconnected():
                        return
                if event is None:
                    continue
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - self._start)
                    first = False
                if event.kind != "text":
                    remaining -= 1
                yield index, event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for handle in self._handles:
            if not handle.finished:
                handle.cancel()
