"""Iteration-level batching: requests join the running batch at the next step and leave when done.

One thread owns the engine. Each iteration it

0. runs the base-model probes routing asked for (``model: "auto"``), up to a prompt-token
   budget, each on its own (so a probe's result never depends on other traffic); the
   thread that asked waits for its result. The probe is a phase of the loop, not a holder
   of the engine's lock that a decode step would wait on at an arbitrary moment,
1. drops rows whose client went away (their slot is unpinned at once),
2. admits waiting requests while there is room (``max_batch`` rows, a prefill token
   budget, a free slot for the request's mixture), prefills them together and samples
   their first token,
3. runs one decode step for every running row (each row its own mixture and sampling),
4. hands every row its new text; a row that hit eos, a stop string or ``max_tokens``
   leaves the batch and unpins its slot, the others go on.

One request's failure is its own: a row whose logits are NaN or infinite (a mixture
that blew the model's numbers up), or whose sampling fails, gets an error event and
leaves; the other rows never see it. Every accepted request ends with exactly one
``done`` or ``error`` event, and its slot is unpinned when it does, whatever fails.

The waiting queue is bounded (``ServerBusy`` past ``max_queue``). Events reach the
caller through the ``on_event`` callback given at submit time, from the scheduler
thread; the HTTP layer forwards them to its event loop.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapters_zoo.errors import NumericalFailure, ServerBusy, ServiceUnavailable
from fusion.mixture import mixture_label
from serving.config import SchedulerConfig
from serving.engine import Engine, PromptProbe
from serving.generation import BatchKV, SamplingParams, TextStream, choose_tokens, make_generator
from serving.heap import HeapTrimmer
from serving.slots import MixtureCores, NoFreeSlot

_ids = itertools.count()


@dataclass
class GenerationRequest:
    prompt: list[int]  # token ids
    params: SamplingParams
    mixture: MixtureCores | None = None  # None: the base model
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class Event:
    kind: str  # "text" (a delta), "done" (the last delta and the totals) or "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    output: str = ""  # on "done": the whole generated text
    token_ids: list[int] = field(default_factory=list)  # on "done": every generated token (eos excluded)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None


class RequestHandle:
    def __init__(self, request: GenerationRequest, on_event: Callable[[Event], None]):
        self.request = request
        self._on_event = on_event
        self.cancelled = False
        self.finished = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """The client is gone: the scheduler drops the request at its next iteration."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        if event.kind != "text":
            self.finished = True
        try:
            self._on_event(event)
        except Exception:  # a consumer that cannot take events any more has gone away
            self.cancelled = True


@dataclass
class _Probe:
    prompts: list[list[int]]
    projections: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: PromptProbe | None = None
    error: Exception | None = None


class SchedulerObserver:
    """Hooks for metrics; the default does nothing."""

    def on_step(self, phase: str, rows: int, seconds: float) -> None:
        pass

    def on_finish(self, handle: RequestHandle, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        pass


@dataclass
class _Row:
    handle: RequestHandle
    slot: int
    stream: TextStream
    gen: torch.Generator
    last: int = -1  # the token the next step feeds
    generated: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params


class Scheduler:
    def __init__(self, engine: Engine, config: SchedulerConfig | None = None,
                 observer: SchedulerObserver | None = None):
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.config.validate()
        self.observer = observer or SchedulerObserver()
        self._pending: deque[RequestHandle] = deque()
        self._rows: list[_Row] = []
        self._newcomers: list[_Row] = []  # admitted (slot pinned), not yet in the running batch
        self._probes: deque[_Probe] = deque()
        self._kv = BatchKV()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.heap = HeapTrimmer(self.config.heap_trim_s)
        self.steps = 0

    # ------------------------------------------------------------------ API

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="specfuse-scheduler", daemon=True)
        self._thread.start()
        self.engine.prober = self.probe
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.engine.prober == self.probe:
            self.engine.prober = None
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> RequestHandle:
        handle = RequestHandle(request, on_event)
        with self._cond:
            if not self.alive:
                raise ServiceUnavailable("the generation engine is not running")
            if len(self._pending) >= self.config.max_queue:
                raise ServerBusy(f"{len(self._pending)} requests are waiting already; retry later")
            self._pending.append(handle)
            self._cond.notify_all()
        return handle

    def probe(self, prompts: list[list[int]], projections: bool = False) -> PromptProbe:
        """``Engine.run_probe`` as a phase of the loop; blocks the calling thread until it ran."""
        if threading.current_thread() is self._thread:
            return self.engine.run_probe(prompts, projections)
        job = _Probe(prompts, projections)
        with self._cond:
            if not self.alive:
                raise ServiceUnavailable("the generation engine is not running")
            if len(self._probes) >= self.config.max_queue:
                raise ServerBusy(f"{len(self._probes)} routing probes are waiting already; retry later")
            self._probes.append(job)
            self._cond.notify_all()
        job.done.wait()  # every queued probe is answered: run, failed, or failed at shutdown
        if job.error is not None:
            raise job.error
        return job.result

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._rows and not self._pending and not self._probes:
                    self.heap.maybe_trim(idle=True)
                    self._cond.wait()
                if self._stopping:
                    break
            self.heap.worked()
            self.heap.maybe_trim()
            try:
                self._run_probes()
                self._drop_cancelled()
                self._admit()
                admitted = bool(self._newcomers)
                if admitted:
                    self._prefill(self._newcomers)
                self._newcomers = []
                if self._rows:
                    self._decode()
                elif not admitted:
                    time.sleep(0.001)  # everything waiting needs a slot held by a request just ending
            except Exception as err:  # a failed shared step fails its rows; the server keeps serving
                self._fail_all(err)
        self._fail_all(ServiceUnavailable("the server is shutting down"), pending=True)

    def _run_probes(self) -> None:
        """Answer waiting probes, oldest first, up to max_prefill_tokens of prompts (at least one)."""
        budget = self.config.max_prefill_tokens
        while True:
            with self._cond:
                if not self._probes:
                    return
                tokens = sum(len(p) for p in self._probes[0].prompts)
                if budget < self.config.max_prefill_tokens and tokens > budget:
                    return  # the rest waits for the next iteration: decoding goes on meanwhile
                job = self._probes.popleft()
            budget -= tokens
            start = time.perf_counter()
            try:
                job.result = self.engine.run_probe(job.prompts, job.projections)
            except Exception as err:  # this probe's request alone fails
                job.error = err
            finally:
                job.done.set()
            self.observer.on_step("probe", len(job.prompts), time.perf_counter() - start)

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.handle.cancelled]
        if len(keep) == len(self._rows):
            return
        for row in self._rows:
            if row.handle.cancelled:
                self._finish(row, "cancelled", "")
        self._rows = [self._rows[i] for i in keep]
        self._kv.keep(keep)

    def _admit(self) -> None:
        """Move waiting requests into ``_newcomers`` (their slots pinned) while there is room."""
        rows = self._newcomers
        budget = self.config.max_prefill_tokens
        with self._cond:
            waiting = list(self._pending)
        for handle in waiting:
            request = handle.request
            if handle.cancelled:  # gone while waiting: it leaves the queue even when the batch is full
                self._remove_pending(handle)
                handle.emit(Event("done", finish_reason="cancelled", prompt_tokens=len(request.prompt)))
                self.observer.on_finish(handle, "cancelled", 0, 0)  # counted like any end; nothing was prefilled
                continue
            if len(self._rows) + len(rows) >= self.config.max_batch:
                continue
            if rows and len(request.prompt) > budget:
                continue
            try:
                slot = -1 if request.mixture is None else self.engine.slots.acquire(request.mixture)
            except NoFreeSlot:
                continue  # stays queued until a running mixture's slot is released
            except Exception as err:  # this mixture cannot take a slot: it alone fails
                self._remove_pending(handle)
                handle.emit(Event("error", error=err))
                continue
            self._remove_pending(handle)
            budget -= len(request.prompt)
            rows.append(_Row(handle, slot, TextStream(self.engine.tokenizer, request.params.stop),
                             make_generator(request.params.seed)))

    def _remove_pending(self, handle: RequestHandle) -> None:
        with self._cond:
            self._pending.remove(handle)

    def _prefill(self, rows: list[_Row]) -> None:
        start = time.perf_counter()
        try:
            logits, cache, mask = self.engine.prefill([r.handle.request.prompt for r in rows], [r.slot for r in rows])
        except Exception as err:  # the running rows' cache is untouched: only the newcomers fail
            for row in rows:
                self._fail(row, err)
            return
        tokens = self._choose(rows, logits)
        self.observer.on_step("prefill", len(rows), time.perf_counter() - start)
        alive = [i for i, (row, token) in enumerate(zip(rows, tokens)) if not self._step_row(row, token)]
        if alive:
            block = BatchKV()
            block.merge(cache, mask)
            block.keep(alive)
            self._kv.merge(block.cache, block.mask)
            self._rows.extend(rows[i] for i in alive)

    def _decode(self) -> None:
        start = time.perf_counter()
        ids = torch.tensor([[row.last] for row in self._rows], device=self.engine.device)  # (rows, 1)
        mask, positions = self._kv.step_inputs()
        logits = self.engine.forward(ids, mask, positions, self._kv.cache, [row.slot for row in self._rows])
        tokens = self._choose(self._rows, logits)
        self.steps += 1
        self.observer.on_step("decode", len(self._rows), time.perf_counter() - start)
        keep = [i for i, (row, token) in enumerate(zip(self._rows, tokens)) if not self._step_row(row, token)]
        self._rows = [self._rows[i] for i in keep]
        self._kv.keep(keep)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[int | Exception]:
        """Each row's next token, or the error that ends that row alone (non-finite logits, failed sampling)."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()  # (rows,): rows are independent, so is their NaN
        out: list[int | Exception] = [0 if f else _non_finite(row) for row, f in zip(rows, finite)]
        ok = [i for i, f in enumerate(finite) if f]
        if not ok:
            return out
        picked = logits if len(ok) == len(rows) else logits[ok]  # (ok, V)
        try:
            tokens = choose_tokens(picked, [rows[i].params for i in ok], [rows[i].gen for i in ok])
        except Exception:  # one row's sampling failed (e.g. a temperature that overflows): find it
            tokens = []
            for j, i in enumerate(ok):
                try:
                    tokens.append(choose_tokens(picked[j : j + 1], [rows[i].params], [rows[i].gen])[0])
                except Exception as err:
                    tokens.append(NumericalFailure(f"sampling failed for this request ({type(err).__name__}: "
                                                   f"{err}); it was ended, other requests are unaffected"))
        for i, token in zip(ok, tokens):
            out[i] = token
        return out

    def _step_row(self, row: _Row, token: int | Exception) -> bool:
        """Take one row's next token (or its error); True when the row is finished (and released)."""
        if isinstance(token, Exception):
            self._fail(row, token)
            return True
        return self._advance(row, token)

    def _advance(self, row: _Row, token: int) -> bool:
        """Take one sampled token; return True when the row is finished (and released)."""
        row.generated += 1
        row.last = token
        params = row.params
        if token in self.engine.eos_ids and not params.ignore_eos:
            self._finish(row, "stop", row.stream.flush())
            return True
        delta, hit_stop = row.stream.push(token)
        if hit_stop:
            self._finish(row, "stop", delta)
            return True
        at_limit = len(row.handle.request.prompt) + row.generated >= self.engine.max_positions
        if row.generated >= params.max_tokens or at_limit:
            self._finish(row, "length", delta + row.stream.flush())
            return True
        if delta:
            row.handle.emit(Event("text", text=delta))
        return False

    def _finish(self, row: _Row, reason: str, text: str) -> None:
        self.engine.slots.release(row.slot)
        prompt_tokens = len(row.handle.request.prompt)
        row.handle.emit(Event("done", text=text, finish_reason=reason, output=row.stream.text,
                              token_ids=list(row.stream.ids),
                              prompt_tokens=prompt_tokens, completion_tokens=row.generated))
        self.observer.on_finish(row.handle, reason, prompt_tokens, row.generated)

    def _fail(self, row: _Row, err: Exception) -> None:
        self.engine.slots.release(row.slot)
        row.slot = -1
        row.handle.emit(Event("error", error=err))

    def _fail_all(self, err: Exception, pending: bool = False) -> None:
        for row in [*self._rows, *self._newcomers]:
            if not row.handle.finished:
                self._fail(row, err)
        self._rows, self._newcomers = [], []
        self._kv = BatchKV()
        if pending:
            with self._cond:
                waiting, self._pending = list(self._pending), deque()
                probes, self._probes = list(self._probes), deque()
            for handle in waiting:
                handle.emit(Event("error", error=err))
            for job in probes:
                job.error = err
                job.done.set()


def _non_finite(row: _Row) -> NumericalFailure:
    mixture = row.handle.request.mixture
    label = mixture_label(mixture)
    return NumericalFailure(f"the model's logits became NaN or infinite for this request (mixture {label}); "
                            "it was ended, other requests are unaffected")


def generate(scheduler: Scheduler, requests: list[GenerationRequest], timeout: float = 300.0) -> list[Event]:
    """Submit ``requests`` together and wait for every final event (tests, benchmarks)."""
    done: dict[int, Event] = {}
    finished = threading.Event()
    lock = threading.Lock()

    def collector(i: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            if event.kind == "text":
                return
            with lock:
                done[i] = event
                if len(done) == len(requests):
                    finished.set()
        return on_event

    for i, request in enumerate(requests):
        scheduler.submit(request, collector(i))
    if requests and not finished.wait(timeout):
        raise TimeoutError(f"{len(requests) - len(done)} of {len(requests)} requests did not finish")
    return [done[i] for i in range(len(requests))]
