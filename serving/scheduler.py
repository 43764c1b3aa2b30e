"""Iteration-level batching: requests join the running batch at the next step and leave when done.

One thread owns the engine. Each iteration it

0. runs the base-model probes routing asked for (``model: "auto"``), up to a prompt-token
   budget, each on its own (so a probe's result never depends on other traffic); the
   thread that asked waits for its result. The probe is a phase of the loop, not a holder
   of the engine's lock that a decode step would wait on at an arbitrary moment,
1. drops rows whose client went away or whose text reached a stop string (their slot
   is unpinned at once),
2. admits waiting requests while there is room (``max_batch`` rows, a prefill token
   budget, a free slot for the request's mixture), prefills them together and samples
   their first token,
3. runs one decode step for every running row (each row its own mixture and sampling;
   one device -> host transfer for the step),
4. hands every row's new token id to the text thread (:class:`TextThread`); a row that
   hit eos or ``max_tokens`` leaves the batch and unpins its slot, the others go on.

Text is made on that second thread: incremental detokenizing, stop strings (exact
across token boundaries), every event of a request in order. A row whose text reached a
stop string leaves at the engine thread's next iteration; the tokens it generated in
between are discarded, so its output and counts are those of the token that completed
the stop.

One request's failure is its own: a row whose logits are NaN or infinite (a mixture
that blew the model's numbers up), or whose sampling fails, gets an error event and
leaves; the other rows never see it. Every accepted request ends with exactly one
``done`` or ``error`` event, and its slot is unpinned when it does, whatever fails.

The waiting queue is bounded (``ServerBusy`` past ``max_queue``). Events reach the
caller through the ``on_event`` callback given at submit time, from the text thread
(a request refused while waiting: from the scheduler thread); the HTTP layer forwards
them to its event loop.
"""

from __future__ import annotations

import itertools
import queue
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
from serving.generation import RowKV, SamplingParams, TextStream, make_generator, read_logits, sample_row
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


class _Text:
    """One request's text, made on the text thread from the ids the engine's thread hands it."""

    def __init__(self, handle: RequestHandle, stream: TextStream):
        self.handle, self.stream = handle, stream
        self.stop_at: int | None = None  # tokens generated when a stop string was hit (read by the engine thread)
        self.pending: Event | None = None  # the stop's "done", sent once the engine has let the row go
        self.closed = False  # the final event went out


class TextThread:
    """Generated ids -> text events, off the thread that owns the device.

    The engine's thread only appends ids (``token``); this thread detokenizes them
    incrementally, holds back and cuts at stop strings, and sends every event of a
    request, in order. A stop string is found here: the request's ``stop_at`` tells the
    engine's thread, which drops the row at its next iteration (the tokens it generated
    meanwhile are discarded) and then ``release``s it, so a "done" always follows the
    release of its slot, as every final event does.
    """

    def __init__(self, observer: SchedulerObserver):
        self.observer = observer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="specfuse-text", daemon=True)
        self._thread.start()

    def token(self, text: _Text, token: int, end: str | None, generated: int) -> None:
        """One generated token; ``end``: "eos" (the token is eos: not text), "length", or None (more follow)."""
        self._queue.put((self._token, text, token, end, generated))

    def release(self, text: _Text) -> None:
        """The engine dropped a row that hit a stop string: its "done" may go."""
        self._queue.put((self._release, text))

    def end(self, text: _Text, error: Exception | None, generated: int) -> None:
        """An end decided on the engine's thread: ``error``, or (None) the client went away."""
        self._queue.put((self._end, text, error, generated))

    def stop(self, timeout: float = 30.0) -> None:
        """Send what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                item[0](*item[1:])
            except Exception as err:  # a tokenizer that fails on these ids: this request alone ends
                text = item[1]
                if not text.closed:
                    text.closed = True
                    text.handle.emit(Event("error", error=err))

    def _token(self, text: _Text, token: int, end: str | None, generated: int) -> None:
        if text.closed:
            return
        if text.stop_at is not None:  # generated after the stop, before the engine saw it
            if end is not None:  # the engine ended the row on its own meanwhile: the slot is free
                self._send_pending(text)
            return
        stream = text.stream
        if end == "eos":
            self._done(text, "stop", stream.flush(), generated)
            return
        delta, hit = stream.push(token)
        if hit:
            text.stop_at = generated
            text.pending = self._final(text, "stop", delta, generated)
            if end is not None:
                self._send_pending(text)
        elif end == "length":
            self._done(text, "length", delta + stream.flush(), generated)
        elif delta:
            text.handle.emit(Event("text", text=delta))

    def _release(self, text: _Text) -> None:
        self._send_pending(text)

    def _end(self, text: _Text, error: Exception | None, generated: int) -> None:
        if text.closed:
            return
        if text.pending is None:  # (else it had finished already: that "done" goes)
            if error is not None:
                text.closed = True
                text.handle.emit(Event("error", error=error))
                return
            text.pending = self._final(text, "cancelled", "", generated)
        self._send_pending(text)

    def _final(self, text: _Text, reason: str, delta: str, generated: int) -> Event:
        return Event("done", text=delta, finish_reason=reason, output=text.stream.text,
                     token_ids=list(text.stream.ids), prompt_tokens=len(text.handle.request.prompt),
                     completion_tokens=generated)

    def _done(self, text: _Text, reason: str, delta: str, generated: int) -> None:
        text.pending = self._final(text, reason, delta, generated)
        self._send_pending(text)

    def _send_pending(self, text: _Text) -> None:
        if text.closed or text.pending is None:
            return
        text.closed = True
        event = text.pending
        text.handle.emit(event)
        self.observer.on_finish(text.handle, event.finish_reason, event.prompt_tokens, event.completion_tokens)


@dataclass
class _Row:
    handle: RequestHandle
    slot: int
    text: _Text
    gen: torch.Generator
    last: int = -1  # the token the next step feeds
    generated: int = 0
    kv_row: int = -1  # its row of the RowKV once it runs
    ended: bool = False  # released; its final event is the text thread's to send

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
        self._kv = self._new_kv()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.heap = HeapTrimmer(self.config.heap_trim_s)
        self.steps = 0
        self._text: TextThread | None = None

    def _new_kv(self) -> RowKV:
        sdpa = getattr(self.engine.model.config, "_attn_implementation", None) == "sdpa"
        return RowKV(mask_4d=sdpa)  # sdpa takes the (rows, 1, 1, span) mask view as it is: no mask build

    # ------------------------------------------------------------------ API

    def start(self) -> Scheduler:
        self._text = TextThread(self.observer)
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
        if self._text is not None:
            self._text.stop(timeout)

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
                self._drop_finished()
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

    def _drop_finished(self) -> None:
        """Drop the rows whose client went away and those the text thread found a stop string in."""
        gone = [row for row in self._rows if row.handle.cancelled or row.text.stop_at is not None]
        if not gone:
            return
        for row in gone:
            self._release(row)
            if row.text.stop_at is not None:
                self._text.release(row.text)
            else:
                self._text.end(row.text, None, row.generated)
        self._rows = [row for row in self._rows if row not in gone]
        self._leave(gone)

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
            rows.append(_Row(handle, slot, _Text(handle, TextStream(self.engine.tokenizer, request.params.stop)),
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
        tokens = self._choose(rows, logits, list(range(len(rows))))
        self.observer.on_step("prefill", len(rows), time.perf_counter() - start)
        alive = [i for i, (row, token) in enumerate(zip(rows, tokens)) if not self._step_row(row, token)]
        for i, kv_row in zip(alive, self._kv.join(cache, mask, alive)):  # only the newcomers' rows are written
            rows[i].kv_row = kv_row
            self._kv.set_next(kv_row, rows[i].last)
            self._rows.append(rows[i])

    def _decode(self) -> None:
        start = time.perf_counter()
        ids, mask, positions, cache = self._kv.step_inputs()  # KV row i: the running row whose kv_row is i
        slots = [-1] * self._kv.rows
        for row in self._rows:
            slots[row.kv_row] = row.slot
        logits = self.engine.forward(ids, mask, positions, cache, slots)  # (rows, V)
        self._kv.advance()
        tokens = self._choose(self._rows, logits, [row.kv_row for row in self._rows])
        self.steps += 1
        self.observer.on_step("decode", len(self._rows), time.perf_counter() - start)
        running, gone = [], []
        for row, token in zip(self._rows, tokens):
            if self._step_row(row, token):
                gone.append(row)
            else:
                self._kv.set_next(row.kv_row, row.last)
                running.append(row)
        self._rows = running
        self._leave(gone)

    def _leave(self, gone: list[_Row]) -> None:
        """Free the KV rows of rows that left the batch; a row that moves into a freed one follows."""
        owner = {row.kv_row: row for row in [*self._rows, *gone]}
        for row in gone:
            moved = self._kv.leave(row.kv_row)  # the last KV row moved into this one, or None
            del owner[row.kv_row]
            if moved is not None:
                mover = owner.pop(moved)
                mover.kv_row = row.kv_row
                owner[mover.kv_row] = mover
            row.kv_row = -1

    def _choose(self, rows: list[_Row], logits: torch.Tensor, index: list[int]) -> list[int | Exception]:
        """Each row's next token from its logits row ``index[i]``, or the error that ends that row alone
        (non-finite logits, failed sampling). One device -> host transfer for the whole step."""
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        greedy, finite, host = read_logits(logits, [index[i] for i in sampled])
        out: list[int | Exception] = [greedy[k] if finite[k] else _non_finite(row) for row, k in zip(rows, index)]
        for j, i in enumerate(sampled):
            if isinstance(out[i], Exception):
                continue
            try:
                out[i] = sample_row(host[j], rows[i].params, rows[i].gen)
            except Exception as err:  # e.g. a temperature that overflows: this row alone
                out[i] = NumericalFailure(f"sampling failed for this request ({type(err).__name__}: "
                                          f"{err}); it was ended, other requests are unaffected")
        return out

    def _step_row(self, row: _Row, token: int | Exception) -> bool:
        """Take one row's next token (or its error); True when the row is finished (and released)."""
        if isinstance(token, Exception):
            self._fail(row, token)
            return True
        return self._advance(row, token)

    def _advance(self, row: _Row, token: int) -> bool:
        """Take one sampled token; return True when the row is finished (and released). Its text is made
        on the text thread; a stop string found there ends the row at a later iteration."""
        row.generated += 1
        row.last = token
        params = row.params
        at_limit = len(row.handle.request.prompt) + row.generated >= self.engine.max_positions
        if token in self.engine.eos_ids and not params.ignore_eos:
            end = "eos"
        elif row.generated >= params.max_tokens or at_limit:
            end = "length"
        else:
            end = None
        if end is not None:
            self._release(row)  # before the text thread sends "done"
        self._text.token(row.text, token, end, row.generated)
        return end is not None

    def _release(self, row: _Row) -> None:
        """Unpin the row's slot, once (its final event goes out on the text thread, later)."""
        self.engine.slots.release(row.slot)
        row.slot = -1
        row.ended = True

    def _fail(self, row: _Row, err: Exception) -> None:
        self._release(row)
        self._text.end(row.text, err, row.generated)

    def _fail_all(self, err: Exception, pending: bool = False) -> None:
        for row in [*self._rows, *self._newcomers]:
            if not row.ended:
                self._fail(row, err)
        self._rows, self._newcomers = [], []
        self._kv = self._new_kv()
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
