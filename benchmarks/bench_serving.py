"""Serving cost at real shapes: every request its own adapter mixture vs the base model, PEFT and merging.

Side by side in one process, on one base (the real SmolLM2-135M-Instruct from
``specfuse base fetch``, or a random-weight Llama shape), the same requests (P prompt
tokens, exactly T generated tokens, greedy, eos ignored), all arriving at t = 0, served by
the server's own Service + Scheduler + Engine with the server's defaults:

  step:*     one decode step of a full batch, base rows vs every row on its own resident
             mixture (diagonal cores: the elementwise path; dense k×k cores: the gathered
             path), interleaved step by step: the adapter math alone, paired ratios
  base       every row on slot -1; run again after every two adapter runs, and each run's
             ratio is to the base runs just before and after it (the load drifts)
  one        every request on the same cached mixture (one slot); as for ``cached``, the requests'
             mixtures are resolved (cache hits, timed apart) before t = 0 and all submitted together,
             as base requests are, so both share one prefill
  new        every request a distinct mixture of m of the N registered adapters, resolved
             in the registry and fused in the submitting thread (as HTTP workers do) while
             earlier requests decode; the fusion cost is reported per mixture
  cached     the same mixtures again, all in device slots: flat in N and m by construction
  step:cached  the decode step of each ``cached`` run's mixtures paired with a base step
  prefill:*  the prefill of every prompt together, base vs the step rows' mixtures, paired
  http:*     the same requests streamed over HTTP to ``specfuse serve`` (its own process) from
             concurrent clients: base runs and cached 2-adapter mixtures, interleaved
  hf:base    plain transformers ``generate``, one static batch: the library's own floor
  peft       PEFT mixed-batch LoRA (``adapter_names=``), the registered adapters exported as
             LoRA of the same rank, one adapter per row (PEFT has no per-row mixtures)
  merge      dense W + Σ w ΔW per request, generated alone, weights restored; serial

Reported: tokens/s, p50/p99 latency (t = 0 to a request's last token), p50/p99 time to
first token, CPU milliseconds per token of the thread that runs the model (the scheduler's;
resolving and fusing new mixtures run in the submitting thread, as in the server, and are
reported per mixture), which other jobs on a shared machine disturb less than wall time,
the ratio to base (time per token over base's, wall and CPU), torch
threads and the load average. Results: ``benchmarks/results/{base}/serving_{device}.{json,md,png}``.

    python benchmarks/bench_serving.py --base smollm2              # ~15 min on 2 CPU cores
    python benchmarks/bench_serving.py --base smollm2 --quick      # a few minutes
    python benchmarks/bench_serving.py --base 1b --device cuda     # ~1.1B Llama shape, bf16
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the serving CLI does, before torch loads OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import RESULTS, SCRATCH, environment, set_threads, stop_process, write_results  # noqa: E402
from serving_report import FETCHED, KIND_CORES, goals, markdown, plot  # noqa: E402

SHAPES = {  # random-weight Llama shapes (speed does not depend on the weight values)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),  # TinyLlama-1.1B shape
}


@dataclass
class Settings:
    base: str
    device: str
    k: int
    requests: int  # concurrent, all at t = 0
    prompt_tokens: int
    max_tokens: int
    adapter_counts: tuple[int, ...]  # N registered (scale)
    mixture_sizes: tuple[int, ...]  # m per mixture (scale)
    dense_counts: tuple[int, ...]  # N and m for the dense-core kind (rotation): a shorter sweep
    dense_sizes: tuple[int, ...]
    peft_counts: tuple[int, ...]
    merge_requests: int
    merge_sizes: tuple[int, ...]
    steps: int  # decode steps per step row
    threads: int
    http_rounds: int = 4  # base / scale / rotation runs through `specfuse serve`
    seed: int = 0


@dataclass
class Row:
    config: str
    kind: str  # scale | rotation | "" (base)
    n_adapters: int
    m: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    p50_s: float
    p99_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    cpu_ms_per_token: float
    ratio: float = 1.0  # time per token over base's (wall)
    cpu_ratio: float = 1.0  # the same on CPU time
    load_average: float = 0.0  # 1-minute, at the end of the run
    fuse_ms_per_mixture: float | None = None
    ready_ms_p50: float | None = None  # new mixtures: reduced + written to a slot (the server's histogram)
    ready_buckets: dict[str, float] | None = None  # that histogram's counts during the run (upper bound -> count)
    note: str = ""
    base_runs: list[int] = field(default_factory=list)  # indices of the base rows it is compared to


@dataclass
class Run:
    """One timed run: what every row is made of."""

    latencies: list[float]
    ttft: list[float]
    tokens: int
    seconds: float
    cpu_seconds: float
    prepare_seconds: float = 0.0
    new_mixtures: int = 0
    mixtures: int = 0  # requests that named a mixture (resolved, a cache hit or fused)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def make_row(config: str, kind: str, n: int, m: int, run: Run, note: str = "") -> Row:
    ttft = run.ttft or None
    return Row(config, kind, n, m, len(run.latencies), run.tokens, round(run.seconds, 3),
               round(run.tokens / run.seconds, 1), round(statistics.median(run.latencies), 3),
               round(percentile(run.latencies, 0.99), 3),
               None if ttft is None else round(statistics.median(ttft), 3),
               None if ttft is None else round(percentile(ttft, 0.99), 3),
               round(1000 * run.cpu_seconds / run.tokens, 2), load_average=round(os.getloadavg()[0], 1),
               fuse_ms_per_mixture=round(1000 * run.prepare_seconds / run.new_mixtures, 1) if run.new_mixtures
               else None, note=note)


# --------------------------------------------------------------------------- the base and its adapters


def load_base(settings: Settings, home: str | None):
    """(model float32 on the host, tokenizer, model dir or None, basis cache key)."""
    if settings.base in FETCHED:
        from adapters_zoo.bases import fetch_base
        from serving.engine import load_model_dir

        fetched = fetch_base(FETCHED[settings.base], home, progress=False)
        model, tokenizer = load_model_dir(fetched.path)
        return model.float().eval(), tokenizer, str(fetched.path), fetched.fingerprint
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    cfg = LlamaConfig(**SHAPES[settings.base], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), word_tokenizer(cfg.vocab_size), None, None


def word_tokenizer(vocab: int):
    """A word-level tokenizer with one token per id (the model's whole vocabulary decodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<3>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<0>", bos_token="<1>", eos_token="<2>",
                                   unk_token="<3>", padding_side="left")


def basis_of(model, k: int, cache_key: str | None):
    """The model's basis, cached in benchmarks/results/tmp for a fetched base (the SVD takes a minute)."""
    from adapters_zoo.basis import basis_from_model, load_basis, save_basis

    path = SCRATCH / f"basis_{cache_key}_k{k}.safetensors" if cache_key else None
    if path is not None and path.is_file():
        return load_basis(path)
    basis = basis_from_model(model, k)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_basis(basis, path)
    return basis


def make_adapters(kind: str, basis, count: int, seed: int) -> list:
    """``count`` distinct adapters of ``kind`` over every layer (random, off the identity)."""
    from adapters_zoo.format import new_adapter

    out = []
    for i in range(count):
        adapter = new_adapter(kind, {"rank": basis.rank}, basis, meta={"name": f"{kind}{i}"})
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        for params in adapter.params.values():
            for name, t in params.items():
                params[name] = t + 0.05 * torch.randn(t.shape, generator=gen)
        out.append(adapter)
    return out


def make_prompts(settings: Settings, vocab: int) -> list[list[int]]:
    rng = random.Random(settings.seed)
    return [[rng.randrange(4, vocab) for _ in range(settings.prompt_tokens)] for _ in range(settings.requests)]


def mixture_strings(names: list[str], m: int, count: int, rng: random.Random) -> list[str]:
    """``count`` mixtures of m of ``names``, random weights: every one distinct (a new cache key)."""
    out = []
    for _ in range(count):
        chosen = rng.sample(names, min(m, len(names)))
        out.append(",".join(f"{n}:{round(rng.uniform(0.1, 1.0), 4)}" for n in chosen))
    return out


# --------------------------------------------------------------------------- the engine


def run_engine(service, prompts: list[list[int]], mixtures: list[str | None], max_tokens: int,
               resolve_first: bool = False) -> Run:
    """Submit every request at t = 0, resolving and fusing its mixture first (off the decode thread).

    ``resolve_first``: resolve every mixture (cache hits) before the clock starts, then submit all together,
    so the requests share one prefill as base requests do; else each is resolved just before its submission
    while the earlier ones already run (new mixtures: their fusing overlaps decoding)."""
    from serving.generation import SamplingParams
    from serving.scheduler import GenerationRequest

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    done_at: dict[int, float] = {}
    first_at: dict[int, float] = {}
    tokens = [0]
    errors: list[Exception] = []
    finished = threading.Event()
    lock = threading.Lock()

    def on_event(event, i):
        now = time.perf_counter()
        with lock:
            first_at.setdefault(i, now)
            if event.kind == "text":
                return
            if event.kind == "error":
                errors.append(event.error)
            done_at[i] = now
            tokens[0] += event.completion_tokens
            if len(done_at) == len(prompts):
                finished.set()

    misses = service.engine.mixtures.misses
    clock = scheduler_clock()
    preparing = 0.0
    resolved: dict[int, object] = {}
    if resolve_first:
        t = time.perf_counter()
        resolved = {i: None if model is None else service.prepare_mixture(model) for i, model in enumerate(mixtures)}
        preparing = time.perf_counter() - t
    start, cpu = time.perf_counter(), time.clock_gettime(clock)
    for i, (ids, model) in enumerate(zip(prompts, mixtures)):
        if resolve_first:
            mixture = resolved[i]
        else:
            t = time.perf_counter()
            mixture = None if model is None else service.prepare_mixture(model)
            preparing += time.perf_counter() - t
        service.scheduler.submit(GenerationRequest(ids, params, mixture), lambda ev, i=i: on_event(ev, i))
    if not finished.wait(3600):
        raise TimeoutError("the engine did not finish")
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")
    seconds, cpu_seconds = time.perf_counter() - start, time.clock_gettime(clock) - cpu
    return Run([done_at[i] - start for i in range(len(prompts))], [first_at[i] - start for i in range(len(prompts))],
               tokens[0], seconds, cpu_seconds, preparing, service.engine.mixtures.misses - misses,
               sum(model is not None for model in mixtures))


def scheduler_clock() -> int:
    """The CPU-time clock of the scheduler's thread (the one that runs the model; fusion runs elsewhere)."""
    thread = next(t for t in threading.enumerate() if t.name == "specfuse-scheduler")
    return time.pthread_getcpuclockid(thread.ident)


def paired_steps(engine, prompts: list[list[int]], variants: dict[str, list[int]], steps: int,
                 device: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of ``steps`` decode steps of the whole batch for each variant (label -> the
    rows' slots), the variants interleaved step by step, their order alternating, so load hits all alike."""
    from serving.generation import RowKV

    state = {}
    sdpa = engine.model.config._attn_implementation == "sdpa"
    for label, slots in variants.items():
        logits, cache, mask = engine.prefill(prompts, slots)
        kv = RowKV(mask_4d=sdpa)
        for row, token in zip(kv.join(cache, mask, list(range(len(prompts)))), logits.argmax(-1).tolist()):
            kv.set_next(row, token)
        state[label] = kv
    wall: dict[str, list[float]] = {label: [] for label in variants}
    cpu: dict[str, list[float]] = {label: [] for label in variants}
    labels = list(variants)
    for step in range(steps):
        for label in labels if step % 2 == 0 else labels[::-1]:
            kv = state[label]
            _sync(device)
            t, c = time.perf_counter(), time.thread_time()
            ids, mask, positions, cache = kv.step_inputs()
            tokens = engine.forward(ids, mask, positions, cache, variants[label]).argmax(-1).tolist()
            kv.advance()
            for row, token in enumerate(tokens):
                kv.set_next(row, token)
            _sync(device)
            wall[label].append(time.perf_counter() - t)
            cpu[label].append(time.thread_time() - c)
    return wall, cpu


def paired_row(config: str, kind: str, n: int, m: int, rows: int, steps: int, wall: list[float], cpu: list[float],
               base_wall: list[float], base_cpu: list[float], note: str) -> Row:
    """A step row: ratio = the median of per-step ratios to the base step beside it."""
    run = Run(wall, [], rows * len(wall), sum(wall), sum(cpu))
    row = make_row(config, kind, n, m, run, note=f"{rows} rows, {steps} steps; p50/p99 are step times; {note}")
    row.requests = rows
    row.ratio = round(statistics.median(a / b for a, b in zip(wall, base_wall)), 3)
    row.cpu_ratio = round(statistics.median(a / b for a, b in zip(cpu, base_cpu)), 3)
    return row


def step_rows(engine, basis, prompts: list[list[int]], settings: Settings) -> list[Row]:
    """One decode step of the whole batch: base rows, then every row its own resident diagonal / dense
    mixture, interleaved step by step."""
    from serving.engine import Mixture

    variants: dict[str, list[int]] = {"base": [-1] * len(prompts)}
    for kind in KIND_CORES:
        adapters = make_adapters(kind, basis, len(prompts), settings.seed + 7)
        mixtures = [engine.prepare(Mixture.of([(f"step-{kind}{i}", 1.0)]), lambda _, a=a: a)
                    for i, a in enumerate(adapters)]
        variants[kind] = [engine.slots.acquire(m) for m in mixtures]
    wall, cpu = paired_steps(engine, prompts, variants, settings.steps, settings.device)
    reps = max(2, settings.steps // 4)
    pre_wall, pre_cpu = paired_prefills(engine, prompts, variants, reps, settings.device)
    for slots in list(variants.values())[1:]:
        for slot in slots:
            engine.slots.release(slot)
    rows = [paired_row(f"step:{label}", "" if label == "base" else label, 0 if label == "base" else len(prompts),
                       0 if label == "base" else 1, len(prompts), settings.steps, wall[label], cpu[label],
                       wall["base"], cpu["base"], "ratio: median of per-step ratios to the base step beside it")
            for label in variants]
    for label in variants:
        row = paired_row(f"prefill:{label}", "" if label == "base" else label, 0 if label == "base" else len(prompts),
                         0 if label == "base" else 1, len(prompts), reps, pre_wall[label], pre_cpu[label],
                         pre_wall["base"], pre_cpu["base"], "prefills of every prompt together (the steps "
                         "column: prefills); ratio: median of per-prefill ratios to the base prefill beside it")
        tokens = len(prompts) * settings.prompt_tokens * reps  # prompt tokens, not generated ones
        row.tokens, row.tokens_per_s = tokens, round(tokens / sum(pre_wall[label]), 1)
        row.cpu_ms_per_token = round(1000 * sum(pre_cpu[label]) / tokens, 2)
        rows.append(row)
    return rows


def paired_prefills(engine, prompts: list[list[int]], variants: dict[str, list[int]], reps: int,
                    device: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of ``reps`` prefills of every prompt together per variant, interleaved as the steps."""
    wall: dict[str, list[float]] = {label: [] for label in variants}
    cpu: dict[str, list[float]] = {label: [] for label in variants}
    labels = list(variants)
    for rep in range(reps):
        for label in labels if rep % 2 == 0 else labels[::-1]:
            _sync(device)
            t, c = time.perf_counter(), time.thread_time()
            engine.prefill(prompts, variants[label])
            _sync(device)
            wall[label].append(time.perf_counter() - t)
            cpu[label].append(time.thread_time() - c)
    return wall, cpu


def cached_step_row(service, prompts: list[list[int]], mixtures: list[str], kind: str, n: int, m: int,
                    settings: Settings) -> Row:
    """The decode step of a ``cached`` run's mixtures (each row its own, resident in a slot) paired with a base
    step: flat in N and m means these rows agree, and pairing takes the machine's load out of the comparison."""
    engine = service.engine
    cores = [service.prepare_mixture(mixture) for mixture in mixtures]  # cache hits: reduced already
    slots = [engine.slots.acquire(c) for c in cores]
    try:
        wall, cpu = paired_steps(engine, prompts, {"base": [-1] * len(prompts), "mix": slots}, 2 * settings.steps,
                                 settings.device)
    finally:
        for slot in slots:
            engine.slots.release(slot)
    return paired_row("step:cached", kind, n, m, len(prompts), 2 * settings.steps, wall["mix"], cpu["mix"],
                      wall["base"], cpu["base"], "the cached run's mixtures, one per row; ratio: median of per-step "
                      "ratios to the base step beside it")


def engine_plan(settings: Settings) -> list[tuple[str, str, int, int]]:
    """(config, kind, N, m) of every engine run in order; a base run after every two others."""
    jobs: list[tuple[str, str, int, int]] = []
    for kind, counts, sizes in (("scale", settings.adapter_counts, settings.mixture_sizes),
                                ("rotation", settings.dense_counts, settings.dense_sizes)):
        jobs.append(("one", kind, 1, 1))
        for n in counts:
            for m in sizes:
                if m <= n:
                    jobs += [("new", kind, n, m), ("cached", kind, n, m)]
    plan = [("base", "", 0, 0)]
    for i, job in enumerate(jobs):
        plan.append(job)
        if i % 2 == 1 or i == len(jobs) - 1:
            plan.append(("base", "", 0, 0))
    return plan


def engine_rows(service, prompts: list[list[int]], settings: Settings,
                rng: random.Random) -> tuple[list[Row], list[Row]]:
    """(whole runs through the scheduler, the cached runs' paired decode steps)."""
    rows: list[Row] = []
    steps: list[Row] = []
    last: dict[tuple[str, int, int], list[str]] = {}  # the mixtures of the last "new" run, for "cached"
    for config, kind, n, m in engine_plan(settings):
        names = [f"{kind}{i}" for i in range(n)]
        if config == "base":
            mixtures: list[str | None] = [None] * len(prompts)
        elif config == "one":
            mixtures = [f"{kind}0"] * len(prompts)
            service.prepare_mixture(mixtures[0])  # reduced before the clock starts: this row is the cached one
        elif config == "new":
            mixtures = last[(kind, n, m)] = mixture_strings(names, m, len(prompts), rng)
        else:
            mixtures = last[(kind, n, m)]
        slot_hits = service.engine.slots.hits
        run = run_engine(service, prompts, mixtures, settings.max_tokens, resolve_first=config in ("one", "cached"))
        resolved = (f"; resolved (cache hits) before t = 0: {1000 * run.prepare_seconds / max(1, run.mixtures):.2f} "
                    "ms per request")
        note = {"base": "every row on slot -1", "one": "one mixture for every request (one slot)" + resolved,
                "new": f"{run.new_mixtures} new mixtures resolved + fused while earlier requests decode",
                "cached": f"the last run's mixtures again: {service.engine.slots.hits - slot_hits} slot hits"
                + resolved}[config]
        rows.append(make_row(config, kind, n, m, run, note))
        print(line(rows[-1]), flush=True)
        if config == "cached":
            steps.append(cached_step_row(service, prompts, mixtures, kind, n, m, settings))
            print(line(steps[-1]) + f"  ratio {steps[-1].ratio}", flush=True)
    bases = [i for i, r in enumerate(rows) if r.config == "base"]
    for i, row in enumerate(rows):  # each run against the base runs just before and after it
        if row.config == "base":
            near = [j for j in bases if abs(j - i) <= 3 and j != i] or [i]
        else:
            near = [max((j for j in bases if j < i), default=bases[0]), min((j for j in bases if j > i),
                                                                             default=bases[-1])]
        row.base_runs = sorted(set(near))
        base_tps = statistics.mean(rows[j].tokens_per_s for j in row.base_runs)
        base_cpu = statistics.mean(rows[j].cpu_ms_per_token for j in row.base_runs)
        row.ratio = round(base_tps / row.tokens_per_s, 3)
        row.cpu_ratio = round(row.cpu_ms_per_token / base_cpu, 3)
    return rows, steps


# --------------------------------------------------------------------------- over HTTP


class Served:
    """``specfuse serve`` on 127.0.0.1 in its own process (the server a user starts, default settings), and
    timed runs of concurrent streamed HTTP requests against it."""

    def __init__(self, settings: Settings, model_dir: str, home: Path, prompts: list[list[int]],
                 extra: tuple[str, ...] = ()):
        import socket
        import subprocess

        import httpx

        self.settings, self.prompts, self.httpx = settings, prompts, httpx
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-c", "import sys; from serving.cli import main; sys.exit(main())", "serve",
               model_dir, "--home", str(home), "--host", "127.0.0.1", "--port", str(port), "--device",
               settings.device, *extra]
        env = os.environ | {"OMP_NUM_THREADS": str(settings.threads), "PYTHONPATH": str(Path(__file__).parents[1])}
        env.pop("SPECFUSE_API_KEY", None)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> Served:
        deadline = time.time() + 600
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}: "
                                       f"{self.proc.stderr.read().decode()[-2000:]}")
                try:
                    if self.httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except self.httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("the server did not start in 600 s")
                time.sleep(0.5)
        except BaseException:
            stop_process(self.proc)
            raise

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)

    def cpu_seconds(self) -> float:
        fields_ = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def metric_buckets(self, name: str) -> dict[float, float]:
        """A histogram's cumulative buckets from /metrics: upper bound -> count."""
        out = {}
        for text in self.httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if text.startswith(name + "_bucket{"):
                le = text.split('le="', 1)[1].split('"', 1)[0]
                out[float("inf") if le == "+Inf" else float(le)] = float(text.rsplit(" ", 1)[1])
        return out

    def run(self, models: list[str]) -> Run:
        import asyncio

        return asyncio.run(self._run(models))

    async def _run(self, models: list[str]) -> Run:
        import asyncio

        httpx, settings, prompts = self.httpx, self.settings, self.prompts
        start, cpu = time.perf_counter(), self.cpu_seconds()
        first: dict[int, float] = {}

        async def request(client, i: int, model: str) -> tuple[float, int]:
            body = {"model": model, "prompt": prompts[i], "max_tokens": settings.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            tokens = 0
            async with client.stream("POST", self.url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
                async for line_ in response.aiter_lines():
                    if not line_.startswith("data: ") or line_ == "data: [DONE]":
                        continue
                    chunk = json.loads(line_[6:])
                    if chunk.get("choices"):
                        first.setdefault(i, time.perf_counter() - start)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            return time.perf_counter() - start, tokens

        limits = httpx.Limits(max_connections=len(models) + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            done = await asyncio.gather(*(request(client, i, model) for i, model in enumerate(models)))
        return Run([t for t, _ in done], [first.get(i, done[i][0]) for i in range(len(models))],
                   sum(n for _, n in done), time.perf_counter() - start, self.cpu_seconds() - cpu)


def bucket_median(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The median of the observations between two scrapes of a histogram, interpolated within its bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    half, low, below = counts[-1] / 2, 0.0, 0.0
    for bound, cum in zip(bounds, counts):
        if cum >= half:
            if bound == float("inf"):
                return low
            return low + (bound - low) * (half - below) / max(cum - below, 1e-12)
        low, below = bound, cum
    return None


def pair_with_bases(rows: list[Row], window: int) -> None:
    """Each run's ratio to the base runs just before and after it (base runs: to their neighbours)."""
    bases = [i for i, r in enumerate(rows) if r.config == "http:base"]
    for i, row in enumerate(rows):
        near = [j for j in bases if abs(j - i) <= window and j != i] if row.config == "http:base" else \
            [max(j for j in bases if j < i), min(j for j in bases if j > i)]
        row.base_runs = sorted(set(near or [i]))
        row.ratio = round(statistics.mean(rows[j].tokens_per_s for j in row.base_runs) / row.tokens_per_s, 3)
        row.cpu_ratio = round(row.cpu_ms_per_token / statistics.mean(rows[j].cpu_ms_per_token for j in row.base_runs),
                              3)


def http_rows(settings: Settings, model_dir: str, home: Path, prompts: list[list[int]],
              rng: random.Random) -> list[Row]:
    """The same requests through ``specfuse serve`` from concurrent HTTP clients: base runs and every request
    its own cached 2-adapter mixture, interleaved; each mixture run against the base runs just before and after it."""
    mixtures = {kind: mixture_strings([f"{kind}{i}" for i in range(len(prompts))], 2, len(prompts), rng)
                for kind in KIND_CORES}
    with Served(settings, model_dir, home, prompts) as served:
        base = ["base"] * len(prompts)
        for models in (base, *mixtures.values()):  # warm up: the first use of each mixture resolves and fuses it
            served.run(models)
        plan = [("base", "")]
        for _ in range(settings.http_rounds):
            plan += [("cached", kind) for kind in KIND_CORES] + [("base", "")]
        rows: list[Row] = []
        for config, kind in plan:
            run_ = served.run(base if config == "base" else mixtures[kind])
            note = ("every request the base model" if config == "base" else
                    f"every request its own cached 2-adapter mixture of {len(prompts)} `{kind}` adapters")
            rows.append(make_row(f"http:{config}", kind, 0 if config == "base" else len(prompts),
                                 0 if config == "base" else 2, run_, note + "; streamed, from concurrent clients; "
                                 "CPU: the server process's"))
            print(line(rows[-1]), flush=True)
    pair_with_bases(rows, len(KIND_CORES) + 1)
    return rows


NEW_COUNTS, NEW_SIZES = (16, 256), (2, 4, 8)
SERVE_FLAGS = ("--adapter-cache-mb", "1024")  # 256 dense-core adapters of SmolLM2 are ~450 MB parsed
READY_GOAL_MS = {"scale": 2.0, "rotation": 10.0}
RATIO_GOAL = {"scale": 1.15, "rotation": 1.25}


def new_mixture_rows(served: Served, prompts: list[list[int]], rng: random.Random, counts: tuple[int, ...],
                     sizes: tuple[int, ...], rounds: int) -> list[Row]:
    """Every request a mixture never seen before, of m of N registered adapters (random weights), base runs
    in between, the whole plan ``rounds`` times (new mixtures each time); then, per kind, the first N's m=2
    mixtures again (cached) between base runs, ``rounds`` times."""
    base = ["base"] * len(prompts)
    served.run(base)  # warm up; then every adapter once (parsed and evaluated: the mixtures below are new, the
    for kind in KIND_CORES:  # adapters are not)
        names = [f"{kind}{i}" for i in range(max(counts))]
        warm = [",".join(f"{n}:0.5" for n in names[i:i + 8]) for i in range(0, len(names), 8)]
        for i in range(0, len(warm), len(prompts)):
            served.run((warm[i:i + len(prompts)] * len(prompts))[:len(prompts)])
    rows: list[Row] = []

    def record(config: str, kind: str, n: int, m: int, models: list[str], note: str) -> None:
        before = served.metric_buckets("specfuse_mixture_ready_seconds")
        run_ = served.run(models)
        row = make_row(f"http:{config}", kind, n, m, run_, note + "; streamed, 16 concurrent clients; CPU: the "
                       "server process's")
        after = served.metric_buckets("specfuse_mixture_ready_seconds")
        median = bucket_median(before, after)
        row.ready_ms_p50 = None if median is None else round(1000 * median, 3)
        row.ready_buckets = {str(b): after[b] - before.get(b, 0.0) for b in sorted(after)}
        rows.append(row)
        print(line(row), f"ready p50 {row.ready_ms_p50} ms", flush=True)

    record("base", "", 0, 0, base, "every request the base model")
    again = {}
    for _ in range(rounds):
        for kind in KIND_CORES:
            for n in counts:
                for m in sizes:
                    models = mixture_strings([f"{kind}{i}" for i in range(n)], m, len(prompts), rng)
                    again.setdefault(kind, models)
                    record("new", kind, n, m, models,
                           f"every request a new {m}-adapter mixture of {n} `{kind}` adapters")
                    record("base", "", 0, 0, base, "every request the base model")
    for _ in range(rounds):
        for kind, models in again.items():
            record("cached", kind, counts[0], sizes[0], models,
                   f"the first new {sizes[0]}-adapter mixtures again, cached")
            record("base", "", 0, 0, base, "every request the base model")
    pair_with_bases(rows, 1)
    return rows


def new_summary(rows: list[Row]) -> list[dict]:
    """Per (run, kind, N, m) over its rounds: the median ratio and its range, and the ready median of every
    new mixture of every round (the rounds' histograms added up), against the goals."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.config != "http:base":
            groups.setdefault((r.config, r.kind, r.n_adapters, r.m), []).append(r)
    out = []
    for (config, kind, n, m), runs in groups.items():
        pooled: dict[float, float] = {}
        for r in runs:
            for bound, count in (r.ready_buckets or {}).items():
                pooled[float(bound)] = pooled.get(float(bound), 0.0) + count
        ready = bucket_median({}, pooled) if pooled else None
        ratio = statistics.median(r.ratio for r in runs)
        ready_ms = None if ready is None else round(1000 * ready, 3)
        met = ratio <= RATIO_GOAL[kind] and (config == "http:cached" or (
            ready_ms is not None and ready_ms <= READY_GOAL_MS[kind]))
        out.append({"config": config, "kind": kind, "n": n, "m": m, "runs": len(runs), "ratio": round(ratio, 3),
                    "ratio_min": min(r.ratio for r in runs), "ratio_max": max(r.ratio for r in runs),
                    "cpu_ratio": round(statistics.median(r.cpu_ratio for r in runs), 3),
                    "tokens_per_s": round(statistics.median(r.tokens_per_s for r in runs), 1),
                    "ready_ms_p50": ready_ms, "mixtures": int(pooled.get(float("inf"), 0)), "goal_met": met})
    return out


def run_new_mixtures(settings: Settings, home: str | None, counts: tuple[int, ...], sizes: tuple[int, ...],
                     rounds: int) -> dict:
    """``--new-mixtures-only``: the real server over HTTP, every request a new mixture (``new_mixture_rows``)."""
    from adapters_zoo.registry import Registry

    started, load_at_start = time.perf_counter(), [round(x, 1) for x in os.getloadavg()]
    rng = random.Random(settings.seed)
    model, tokenizer, model_dir, cache_key = load_base(settings, home)
    basis = basis_of(model, settings.k, cache_key)
    prompts = make_prompts(settings, model.config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if model_dir is None:
            from adapters_zoo.demo_model import save_model

            model_dir = str(save_model(model, tokenizer, workdir / "base"))
        with Registry(workdir / "home") as registry:
            registry.add_basis(basis)
            t = time.perf_counter()
            for kind in KIND_CORES:
                for i, adapter in enumerate(make_adapters(kind, basis, max(counts), settings.seed)):
                    registry.add(adapter, f"{kind}{i}")
            register_s = time.perf_counter() - t
        del model
        with Served(settings, model_dir, workdir / "home", prompts, SERVE_FLAGS) as served:
            rows = new_mixture_rows(served, prompts, rng, counts, sizes, rounds)
    return {"settings": asdict(settings), "command": None, "environment": environment(),
            "counts": list(counts), "sizes": list(sizes),
            "machine": {"threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
                        "load_average_at_start": load_at_start,
                        "load_average_at_end": [round(x, 1) for x in os.getloadavg()], "device": settings.device},
            "setup_seconds": {"register_adapters": round(register_s, 1)}, "serve_flags": list(SERVE_FLAGS),
            "rounds": rounds, "summary": new_summary(rows), "rows": [asdict(r) for r in rows],
            "total_seconds": round(time.perf_counter() - started, 1)}


def new_markdown(result: dict) -> str:
    from common import environment_line

    rows = [Row(**r) for r in result["rows"]]
    summary = result.get("summary") or new_summary(rows)
    rounds = result.get("rounds", 1)
    out = ["# Every request a new mixture, over HTTP", "",
           f"`{result['command']}`", "", environment_line(result["environment"]), "",
           f"{result['settings']['requests']} concurrent streamed requests to `specfuse serve "
           f"{' '.join(result.get('serve_flags', []))}`, "
           f"{result['settings']['prompt_tokens']} prompt tokens, {result['settings']['max_tokens']} generated; "
           "each run's ratio is its time per token over the base runs just before and after it; "
           f"{rounds} round(s) of the whole plan. "
           f"Load average {result['machine']['load_average_at_start']} at start, "
           f"{result['machine']['load_average_at_end']} at end (a shared machine: other jobs move every figure).", "",
           "## Goals", "",
           "Ratio: the median over the rounds (range in brackets); ready: the median of every new mixture of every "
           "round (reduced on the host and written into a device slot, from the server's histogram).", "",
           "| run | kind | N | m | runs | × base (wall) | range | × base (CPU) | ready p50 ms | mixtures | goal |",
           "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for g in summary:
        ready = "" if g["ready_ms_p50"] is None or g["config"] == "http:cached" else f"{g['ready_ms_p50']:.2f}"
        goal = ("met" if g["goal_met"] else "missed") + f" (≤{RATIO_GOAL[g['kind']]}×" + (
            f", ≤{READY_GOAL_MS[g['kind']]:g} ms)" if g["config"] == "http:new" else ")")
        out.append(f"| {g['config']} | {g['kind']} | {g['n']} | {g['m']} | {g['runs']} | {g['ratio']:.3f} | "
                   f"{g['ratio_min']:.3f}–{g['ratio_max']:.3f} | {g['cpu_ratio']:.3f} | {ready} | "
                   f"{g['mixtures'] if g['config'] == 'http:new' else ''} | {goal} |")
    out += ["", "## Every run", "",
            "| run | kind | N | m | tok/s | × base (wall) | × base (CPU) | ready p50 ms | load |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ready = "" if r.ready_ms_p50 is None or r.config != "http:new" else f"{r.ready_ms_p50:.2f}"
        out.append(f"| {r.config} | {r.kind or '-'} | {r.n_adapters} | {r.m} | {r.tokens_per_s:.1f} | {r.ratio:.3f} | "
                   f"{r.cpu_ratio:.3f} | {ready} | {r.load_average:.1f} |")
    bases = [r.tokens_per_s for r in rows if r.config == "http:base"]
    out += ["", f"Base runs: {min(bases):.1f}–{max(bases):.1f} tok/s (spread {max(bases) / min(bases):.2f}×: the "
            "noise floor of a single run's ratio).", ""]
    return "\n".join(out) + "\n"


def run_steps(settings: Settings, home: str | None) -> dict:
    """``--steps-only``: the engine's decode steps and prefills of 16 rows, base vs every row its own resident
    diagonal / dense mixture, interleaved (``step_rows``): the cached-mixture cost without the HTTP stack."""
    from serving.engine import Engine, EngineConfig

    started, load_at_start = time.perf_counter(), [round(x, 1) for x in os.getloadavg()]
    model, tokenizer, _, cache_key = load_base(settings, home)
    basis = basis_of(model, settings.k, cache_key)
    prompts = make_prompts(settings, model.config.vocab_size)
    dtype = "float32" if settings.device == "cpu" else None
    engine = Engine(model, tokenizer, basis, EngineConfig(device=settings.device, dtype=dtype))
    rows = step_rows(engine, basis, prompts, settings)
    for row in rows:
        print(line(row), flush=True)
    return {"settings": asdict(settings), "command": None, "environment": environment(),
            "machine": {"threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
                        "load_average_at_start": load_at_start,
                        "load_average_at_end": [round(x, 1) for x in os.getloadavg()], "device": settings.device},
            "adapter_flops": flop_ratio(basis, model), "rows": [asdict(r) for r in rows],
            "total_seconds": round(time.perf_counter() - started, 1)}


def steps_markdown(result: dict) -> str:
    from common import environment_line

    flops = result["adapter_flops"]
    out = ["# Decode steps and prefills, every row its own cached mixture", "", f"`{result['command']}`", "",
           environment_line(result["environment"]), "",
           f"{result['settings']['requests']} rows, {result['settings']['prompt_tokens']} prompt tokens each, "
           f"{result['settings']['steps']} decode steps per variant, the variants interleaved step by step (their "
           "order alternating); ratio: the median of per-step ratios to the base step beside it. Load average "
           f"{result['machine']['load_average_at_start']} at start, {result['machine']['load_average_at_end']} at "
           f"end. The adapter path adds {100 * flops['ratio_to_model']:.1f}% to the model's FLOPs per token.", "",
           "| run | kind | × base (wall) | × base (CPU) | p50 ms |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        out.append(f"| {r['config']} | {r['kind'] or '-'} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} | "
                   f"{1000 * r['p50_s']:.0f} |")
    return "\n".join(out) + "\n"


def steps_plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["kind"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(rows)), [r["ratio"] for r in rows],
           color=["tab:blue" if r["kind"] == "scale" else "tab:orange" for r in rows])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['config']}\n{r['kind']}" for r in rows], fontsize=7)
    ax.set_ylabel("time / base (wall, median of pairs)")
    ax.set_title("every row its own cached mixture")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def new_plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.get("summary") or new_summary([Row(**r) for r in result["rows"]])
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{g['config'][5:]} {g['kind']}\nN={g['n']} m={g['m']}" for g in summary]
    colors = ["tab:blue" if g["kind"] == "scale" else "tab:orange" for g in summary]
    ax.bar(range(len(summary)), [g["ratio"] for g in summary], color=colors,
           yerr=[[g["ratio"] - g["ratio_min"] for g in summary], [g["ratio_max"] - g["ratio"] for g in summary]],
           capsize=2)
    for kind, goal in RATIO_GOAL.items():
        ax.axhline(goal, ls="--", color="tab:blue" if kind == "scale" else "tab:orange", lw=1,
                   label=f"goal {kind} ≤{goal}×")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(summary)), labels, fontsize=6)
    ax.set_ylabel("time per token / base (wall), median of rounds")
    ax.set_title("specfuse serve, every request a new mixture (16 clients)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- transformers, PEFT, merge


class FirstToken:
    """A logits processor that notes when ``generate`` has its first logits (time to first token)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def hf_generate(model, prompts: list[list[int]], max_tokens: int, device: str, **kwargs) -> Run:
    """One static batch through ``model.generate`` (prompts of one length: no padding)."""
    from transformers import LogitsProcessorList

    first = FirstToken()
    ids = torch.tensor(prompts, device=device)
    start, cpu = time.perf_counter(), time.thread_time()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([first]), **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    n = len(prompts)
    return Run([seconds] * n, [first.at - start] * n, (out.shape[1] - ids.shape[1]) * n, seconds,
               time.thread_time() - cpu)


def peft_run(model, basis, adapters: list, prompts, settings: Settings, workdir: Path) -> Run:
    """PEFT mixed-batch LoRA: the adapters exported as LoRA, one per row (cycling), one static batch."""
    from peft import PeftModel

    from fusion.lora_io import export_peft_lora

    names = [f"lora{i}" for i in range(len(adapters))]
    dirs = []
    for name, adapter in zip(names, adapters):
        out = workdir / "peft" / f"{len(adapters)}" / name
        export_peft_lora(adapter, basis, out, base_model_name_or_path="bench-base")
        dirs.append(out)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(dirs[0]), adapter_name=names[0])
    for name, path in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model = peft_model.to(settings.device).eval()
    chosen = [names[i % len(names)] for i in range(len(prompts))]
    return hf_generate(peft_model, prompts, settings.max_tokens, settings.device, adapter_names=chosen)


def merge_run(model, basis, adapters: list, prompts, settings: Settings, m: int, rng: random.Random) -> Run:
    """Per request: W + Σ w ΔW into the dense weights, generate alone, restore; one request after another."""
    from serving.reference import merged

    latencies, ttft, tokens = [], [], 0
    start, cpu = time.perf_counter(), time.thread_time()
    for ids in prompts[: settings.merge_requests]:
        mixture = [(a, rng.uniform(0.1, 1.0)) for a in rng.sample(adapters, min(m, len(adapters)))]
        with merged(model, basis, mixture):
            merged_at = time.perf_counter()
            run = hf_generate(model, [ids], settings.max_tokens, settings.device)
        latencies.append(time.perf_counter() - start)
        ttft.append(merged_at - start + run.ttft[0])  # from t = 0: the requests before it, its merge, its prefill
        tokens += run.tokens
    return Run(latencies, ttft, tokens, time.perf_counter() - start, time.thread_time() - cpu)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- long generations (decode loop)

DECODE_CONCURRENCY = (16, 64)
DECODE_TOKENS = 256
DECODE_REQUESTS_PER_CLIENT = 1  # 2 (the committed results) doubles the ≈ 13 min on a loaded 2-core box


def decode_worker(base: str, home: str | None, concurrency: int, tokens: int, threads: int,
                  per_client: int = DECODE_REQUESTS_PER_CLIENT, seed: int = 0) -> dict:
    """One closed-loop run of the serving scheduler, as imported from ``sys.path`` (this tree or an export of
    another commit): ``concurrency`` clients, each sending ``per_client`` requests of ``tokens`` generated
    tokens back to back (greedy, eos ignored, text streamed as the server makes it), client i starting at
    decode step i * tokens / concurrency, so rows join and leave all along, as under steady load. Uses only
    what every commit compared offers."""
    import serving
    from serving.engine import Engine, EngineConfig
    from serving.generation import SamplingParams
    from serving.scheduler import GenerationRequest, Scheduler, SchedulerConfig, SchedulerObserver, generate

    class Steps(SchedulerObserver):
        def __init__(self) -> None:
            self.decode: list[tuple[int, float]] = []

        def on_step(self, phase: str, rows: int, seconds: float) -> None:
            if phase == "decode":
                self.decode.append((rows, seconds))

    set_threads(threads)
    settings = settings_for(base, "cpu", False, threads)
    model, tokenizer, _, cache_key = load_base(settings, home)
    engine = Engine(model, tokenizer, basis_of(model, settings.k, cache_key), EngineConfig(device="cpu",
                                                                                           dtype="float32"))
    steps = Steps()
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=max(32, concurrency)), steps).start()
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(4, vocab) for _ in range(16 + (7 * i) % 48)] for i in range(concurrency)]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    try:
        generate(scheduler, [GenerationRequest(prompts[0], SamplingParams(max_tokens=4, temperature=0))])  # warm up
        steps.decode.clear()
        counts = {"tokens": 0, "texts": 0, "ended": 0}
        errors: list[Exception] = []
        lock, finished = threading.Lock(), threading.Event()

        def client(i: int, left: list[int]):
            def on_event(event) -> None:
                with lock:
                    if event.kind == "text":
                        counts["texts"] += 1
                        return
                    if event.kind == "error":
                        errors.append(event.error)
                    counts["tokens"] += event.completion_tokens
                    counts["ended"] += 1
                    if counts["ended"] == concurrency * per_client or errors:
                        finished.set()
                        return
                    left[0] -= 1
                if left[0]:  # the client's next request, at once (from the scheduler's thread, as a callback)
                    scheduler.submit(GenerationRequest(prompts[i], params), on_event)
            return on_event

        clock = scheduler_clock()
        start, cpu = time.perf_counter(), time.clock_gettime(clock)
        first = scheduler.steps
        for i, prompt in enumerate(prompts):
            while scheduler.steps - first < i * tokens // concurrency:
                time.sleep(0.0005)
            scheduler.submit(GenerationRequest(prompt, params), client(i, [per_client]))
        if not finished.wait(3600):
            raise TimeoutError("the engine did not finish")
        seconds, cpu_seconds = time.perf_counter() - start, time.clock_gettime(clock) - cpu
    finally:
        scheduler.stop()
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")
    if counts["tokens"] != concurrency * per_client * tokens:
        raise RuntimeError(f"{counts['tokens']} tokens generated, expected {concurrency * per_client * tokens}")
    full = [s for rows, s in steps.decode if rows == concurrency]
    return {"code": str(Path(serving.__file__).resolve().parent.parent), "concurrency": concurrency,
            "tokens_per_request": tokens, "requests_per_client": per_client, "tokens": counts["tokens"],
            "text_events": counts["texts"],
            "seconds": round(seconds, 2), "tokens_per_s": round(counts["tokens"] / seconds, 1),
            "cpu_ms_per_token": round(1000 * cpu_seconds / counts["tokens"], 3),
            "decode_steps": len(steps.decode), "full_batch_steps": len(full),
            "full_batch_step_ms_p50": round(1000 * statistics.median(full), 2) if full else None,
            "load_average": round(os.getloadavg()[0], 2)}


def export_tree(ref: str) -> tuple[Path, str]:
    """``git archive`` of ``ref`` into a scratch folder (once per commit): (its root, its short commit)."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=repo, capture_output=True, text=True,
                            check=True).stdout.strip()
    root = SCRATCH / f"tree-{commit}"
    if not (root / "serving").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=repo, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root, commit


def decode_compare(base: str, home: str | None, against: str, threads: int, concurrency: tuple[int, ...],
                   tokens: int, rounds: int, after: str = "HEAD",
                   per_client: int = DECODE_REQUESTS_PER_CLIENT) -> dict:
    """The same closed-loop runs over the code of commit ``after`` and of ``against``, each exported and run
    in its own process, alternating (ABBA per concurrency, ``rounds`` times) so the shared machine's load
    hits both alike."""
    import subprocess

    trees = {}
    for label, ref in (("before", against), ("after", after)):
        root, commit = export_tree(ref)
        trees[label] = (root, f"{ref}@{commit}")
    runs: list[dict] = []
    for n in concurrency:
        order = ["before", "after"] * rounds
        for r in range(rounds):
            if r % 2:
                order[2 * r], order[2 * r + 1] = order[2 * r + 1], order[2 * r]
        for label in order:
            root, name = trees[label]
            env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads)}
            cmd = [sys.executable, __file__, "--decode-worker", str(n), "--decode-tokens", str(tokens),
                   "--decode-per-client", str(per_client),
                   "--base", base, "--threads", str(threads), *(["--home", home] if home else [])]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            run_ = json.loads(out.strip().splitlines()[-1])
            if Path(run_["code"]) != root.resolve():
                raise RuntimeError(f"the {label} run imported {run_['code']}, not {root}")
            run_.update(label=label, tree=name)
            runs.append(run_)
            print(f"{label:6s} {name:24s} n={n:<3d} {run_['tokens_per_s']:7.1f} tok/s "
                  f"{run_['cpu_ms_per_token']:7.2f} CPU ms/token  step p50 {run_['full_batch_step_ms_p50']} ms  "
                  f"load {run_['load_average']}", flush=True)
    summary = []
    for n in concurrency:
        row = {"concurrency": n}
        for label in trees:
            mine = [r for r in runs if r["concurrency"] == n and r["label"] == label]
            row[f"{label}_tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in mine), 1)
            row[f"{label}_cpu_ms_per_token"] = round(statistics.median(r["cpu_ms_per_token"] for r in mine), 3)
            row[f"{label}_step_ms_p50"] = statistics.median(r["full_batch_step_ms_p50"] for r in mine)
        row["speedup"] = round(row["after_tokens_per_s"] / row["before_tokens_per_s"], 3)
        row["cpu_ratio"] = round(row["after_cpu_ms_per_token"] / row["before_cpu_ms_per_token"], 3)
        summary.append(row)
    return {"trees": {k: v[1] for k, v in trees.items()}, "tokens_per_request": tokens,
            "requests_per_client": per_client, "rounds": rounds,
            "summary": summary, "runs": runs, "environment": environment(),
            "machine": {"threads": threads, "logical_cpus": os.cpu_count(), "device": "cpu",
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}}


def decode_markdown(result: dict) -> str:
    t = result["trees"]
    lines = [
        "# Long generations: the decode loop before and after",
        "",
        f"`{result['command']}`",
        "",
        f"Before: {t['before']}; after: {t['after']}. Each run: N clients, each sending "
        f"{result['requests_per_client']} requests of {result['tokens_per_request']} generated tokens back to back "
        "(greedy, eos ignored, text streamed as the server does), "
        f"client i starting at decode step i·{result['tokens_per_request']}/N, so rows join and leave throughout; "
        "base model rows, SmolLM2-135M-Instruct float32. The two trees run alternately (ABBA), each in its own "
        "process; figures are medians over the rounds. CPU ms/token: the scheduler thread's CPU time "
        "(the thread that owns the model). Step p50: decode steps with all N rows running.",
        "",
        f"Machine: {result['environment'].get('cpu')}, {result['machine']['logical_cpus']} logical CPUs (shared), "
        f"{result['machine']['threads']} torch thread(s), device {result['machine']['device']}.",
        "",
        "| N | before tok/s | after tok/s | speedup | before CPU ms/tok | after CPU ms/tok | before step ms "
        "| after step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        lines.append(f"| {r['concurrency']} | {r['before_tokens_per_s']} | {r['after_tokens_per_s']} | "
                     f"{r['speedup']}× | {r['before_cpu_ms_per_token']} | {r['after_cpu_ms_per_token']} | "
                     f"{r['before_step_ms_p50']} | {r['after_step_ms_p50']} |")
    lines += ["", "Every run:", "", "| tree | N | tok/s | CPU ms/tok | step ms p50 | seconds | load |",
              "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['tree']} | {r['concurrency']} | {r['tokens_per_s']} | {r['cpu_ms_per_token']} | "
                     f"{r['full_batch_step_ms_p50']} | {r['seconds']} | {r['load_average']} |")
    return "\n".join(lines) + "\n"


def decode_plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(summary))
    ax.bar([i - 0.2 for i in x], [r["before_tokens_per_s"] for r in summary], 0.4, color="#999",
           label=result["trees"]["before"])
    ax.bar([i + 0.2 for i in x], [r["after_tokens_per_s"] for r in summary], 0.4, color="#4c72b0",
           label=result["trees"]["after"])
    for i, r in zip(x, summary):
        ax.text(i + 0.2, r["after_tokens_per_s"], f"{r['speedup']}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f"{r['concurrency']} concurrent" for r in summary])
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"Long generations ({result['tokens_per_request']} tokens), cpu, "
                 f"{result['machine']['threads']} thread(s)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def decode_main(args) -> int:
    concurrency = tuple(int(n) for n in args.decode_concurrency.split(","))
    result = decode_compare(args.base, args.home, args.decode_against, args.threads, concurrency,
                            args.decode_tokens, args.decode_rounds, args.decode_after, args.decode_per_client)
    result["command"] = " ".join(["python benchmarks/bench_serving.py", *sys.argv[1:]])
    out = Path(args.out_dir) if args.out_dir else RESULTS / args.base
    paths = write_results("serving_decode", result, decode_markdown(result), out=out)
    paths.append(decode_plot(result, out / "serving_decode.png"))
    print(decode_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- main


def run(settings: Settings, home: str | None = None) -> dict:
    from adapters_zoo.registry import Registry
    from serving.engine import Engine, EngineConfig
    from serving.scheduler import Scheduler, SchedulerConfig
    from serving.services import Service

    started, load_at_start = time.perf_counter(), [round(x, 1) for x in os.getloadavg()]
    rng = random.Random(settings.seed)
    model, tokenizer, model_dir, cache_key = load_base(settings, home)
    t = time.perf_counter()
    basis = basis_of(model, settings.k, cache_key)
    basis_s = time.perf_counter() - t
    vocab = model.config.vocab_size
    prompts = make_prompts(settings, vocab)
    counts = {"scale": max(settings.adapter_counts + settings.peft_counts),
              "rotation": max(settings.dense_counts)}
    adapters = {kind: make_adapters(kind, basis, n, settings.seed) for kind, n in counts.items()}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        registry = Registry(workdir / "home")
        registry.add_basis(basis)
        t = time.perf_counter()
        for kind, items in adapters.items():
            for i, adapter in enumerate(items):
                registry.add(adapter, f"{kind}{i}")
        register_s = time.perf_counter() - t
        dtype = "float32" if settings.device == "cpu" else None
        engine = Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(device=settings.device, dtype=dtype))
        scheduler = Scheduler(engine, SchedulerConfig()).start()  # the server's defaults
        service = Service(engine, scheduler, registry)
        try:
            run_engine(service, prompts, [None] * len(prompts), 2)  # warm up
            for row in step_rows(engine, basis, prompts, settings):
                rows.append(row)
                print(line(row), flush=True)
            runs, cached_steps = engine_rows(service, prompts, settings, rng)
            rows += cached_steps
            first = len(rows)
            for row in runs:
                row.base_runs = [first + j for j in row.base_runs]  # engine_rows counts from its first row
                rows.append(row)
        finally:
            scheduler.stop()
        engine_dtype = engine.dtype
        del engine, scheduler, service
        if settings.http_rounds:
            served_dir = model_dir
            if served_dir is None:  # a random-weight shape: saved for the server process
                from adapters_zoo.demo_model import save_model

                served_dir = str(save_model(model, tokenizer, workdir / "base"))
            first = len(rows)
            for row in http_rows(settings, served_dir, workdir / "home", prompts, rng):
                row.base_runs = [first + j for j in row.base_runs]
                rows.append(row)
        hf_model = copy.deepcopy(model).to(settings.device, engine_dtype)  # as the engine runs it
        rows.append(make_row("hf:base", "", 0, 0, hf_generate(hf_model, prompts, settings.max_tokens, settings.device),
                             "transformers generate, one static batch, no adapter"))
        print(line(rows[-1]), flush=True)
        for n in settings.peft_counts:
            run_ = peft_run(hf_model, basis, adapters["scale"][:n], prompts, settings, workdir)
            rows.append(make_row("peft", "scale", n, 1, run_, f"rank-{settings.k} LoRA per row "
                                 f"({min(n, len(prompts))} distinct in the batch), one static batch"))
            print(line(rows[-1]), flush=True)
        dense_basis = basis.to(settings.device, hf_model.dtype)
        for m in settings.merge_sizes:
            pool = adapters["scale"][: max(settings.adapter_counts)]
            run_ = merge_run(hf_model, dense_basis, pool, prompts, settings, m, rng)
            rows.append(make_row("merge", "scale", len(pool), m, run_, f"{settings.merge_requests} requests, "
                                 "one at a time (merge, generate, restore)"))
            print(line(rows[-1]), flush=True)
        registry.close()
    engine_base = [r for r in rows if r.config == "base"]
    base_tps = statistics.mean(r.tokens_per_s for r in engine_base)
    base_cpu = statistics.mean(r.cpu_ms_per_token for r in engine_base)
    for row in rows:  # outside the engine: against every engine base run
        if not row.config.startswith(("step:", "prefill:", "http:")) and row.config not in ("base", "one", "new",
                                                                                              "cached"):
            row.ratio = round(base_tps / row.tokens_per_s, 3)
            row.cpu_ratio = round(row.cpu_ms_per_token / base_cpu, 3)
    return {
        "settings": asdict(settings),
        "command": None,  # main fills it in
        "environment": environment(),
        "model": {"base": settings.base, "model_dir": model_dir, "fingerprint": basis.fingerprint,
                  "parameters": sum(p.numel() for p in model.parameters()), "target_layers": len(basis.layers),
                  "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                  "vocab_size": vocab},
        "machine": {"threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_at_start": load_at_start,
                    "load_average_at_end": [round(x, 1) for x in os.getloadavg()], "device": settings.device,
                    "python": platform.python_version()},
        "setup_seconds": {"basis": round(basis_s, 1), "register_adapters": round(register_s, 1)},
        "adapter_flops": flop_ratio(basis, model),
        "goals": goals(rows),
        "rows": [asdict(r) for r in rows],
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def flop_ratio(basis, model) -> dict[str, float]:
    """The cost model: per token the adapter path adds 2k(in+out) FLOPs to a target layer's 2·in·out."""
    target = sum(2 * lb.in_features * lb.out_features for lb in basis.layers.values())
    extra = sum(2 * lb.k * (lb.in_features + lb.out_features) for lb in basis.layers.values())
    head = 2 * model.config.hidden_size * model.config.vocab_size
    return {"target_layers": target, "adapter_extra": extra, "ratio_to_target_layers": round(extra / target, 4),
            "ratio_to_model": round(extra / (target + head), 4)}


def line(row: Row) -> str:
    return (f"{row.config:13s} {row.kind:8s} N={row.n_adapters:<4d} m={row.m:<2d} {row.tokens_per_s:8.1f} tok/s "
            f"{row.cpu_ms_per_token:7.1f} CPU ms/token  p50 {row.p50_s:6.2f}s  load {row.load_average}")


def settings_for(base: str, device: str, quick: bool, threads: int) -> Settings:
    gpu = device == "cuda"
    if quick:
        return Settings(base=base, device=device, k=32 if base != "tiny" else 8, requests=4, prompt_tokens=8,
                        max_tokens=6, adapter_counts=(1, 4), mixture_sizes=(1, 2), dense_counts=(4,),
                        dense_sizes=(2,), peft_counts=(2,), merge_requests=1, merge_sizes=(2,), steps=4,
                        threads=threads, http_rounds=1)
    return Settings(base=base, device=device, k=64 if gpu else 32, requests=64 if gpu else 16,
                    prompt_tokens=32, max_tokens=32, adapter_counts=(1, 16, 256), mixture_sizes=(1, 2, 4, 8),
                    dense_counts=(16, 256), dense_sizes=(1, 8),
                    # a rank-32 LoRA of every SmolLM2 layer is ~37 MB in float32: 256 of them would be 9.4 GB
                    peft_counts=(1, 16), merge_requests=4, merge_sizes=(1, 8), steps=24, threads=threads)


def publish(args, argv, result: dict, stem: str, render_md, render_png) -> int:
    """Write a run's JSON, Markdown and PNG (stem + ``_quick`` for a quick run) and print the table."""
    result["command"] = " ".join(["python benchmarks/bench_serving.py", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out_dir) if args.out_dir else RESULTS / args.base
    stem += "_quick" if args.quick else ""
    paths = write_results(stem, result, render_md(result), out=out)
    paths.append(render_png(result, out / f"{stem}.png"))
    print(render_md(result))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2", choices=(*FETCHED, *SHAPES),
                   help="smollm2: the real base (fetched and cached under --home); else a random-weight Llama shape")
    p.add_argument("--home", default=None, help="where `specfuse base fetch` keeps bases (default: the registry home)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on the shared 2-core box a second thread loses to the other jobs)")
    p.add_argument("--quick", action="store_true", help="a small sweep in a few minutes (and the smoke test)")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results/{base}")
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite the .md and .png of a results file")
    p.add_argument("--decode", action="store_true",
                   help="only the long-generation runs: --decode-after against --decode-against, side by side")
    p.add_argument("--decode-against", default="main", help="the commit the long-generation runs compare with")
    p.add_argument("--decode-after", default="HEAD", help="the commit compared with it (committed code only)")
    p.add_argument("--decode-concurrency", default=",".join(map(str, DECODE_CONCURRENCY)))
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    p.add_argument("--decode-rounds", type=int, default=1, help="ABBA rounds per concurrency")
    p.add_argument("--decode-per-client", type=int, default=DECODE_REQUESTS_PER_CLIENT,
                   help="requests each client sends back to back")
    p.add_argument("--decode-worker", type=int, default=None, help=argparse.SUPPRESS)  # one run, JSON on stdout
    p.add_argument("--new-mixtures-only", action="store_true",
                   help="only the HTTP runs where every request is a never-seen mixture (serving_{device}_new.*)")
    p.add_argument("--counts", default=None, help="with --new-mixtures-only: N registered per kind, e.g. 16,256")
    p.add_argument("--sizes", default=None, help="with --new-mixtures-only: m per mixture, e.g. 2,4,8")
    p.add_argument("--rounds", type=int, default=3, help="with --new-mixtures-only: times the whole plan runs")
    p.add_argument("--steps-only", action="store_true",
                   help="only the in-process decode steps and prefills, base vs cached mixtures "
                        "(serving_{device}_steps.*)")
    args = p.parse_args(argv)
    if args.decode_worker is not None:
        print(json.dumps(decode_worker(args.base, args.home, args.decode_worker, args.decode_tokens, args.threads,
                                       args.decode_per_client)))
        return 0
    if args.decode:
        return decode_main(args)
    if args.new_mixtures_only:
        set_threads(args.threads)
        settings = settings_for(args.base, args.device, args.quick, args.threads)
        counts = tuple(int(x) for x in args.counts.split(",")) if args.counts else NEW_COUNTS
        sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else NEW_SIZES
        result = run_new_mixtures(settings, args.home, counts, sizes, args.rounds)
        return publish(args, argv, result, f"serving_{args.device}_new", new_markdown, new_plot)
    if args.steps_only:
        set_threads(args.threads)
        settings = settings_for(args.base, args.device, args.quick, args.threads)
        return publish(args, argv, run_steps(settings, args.home), f"serving_{args.device}_steps", steps_markdown,
                       steps_plot)
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        result["goals"] = goals([Row(**r) for r in result["rows"]])
        path.write_text(json.dumps(result, indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(result))
        plot(result, path.with_suffix(".png"))
        return 0
    set_threads(args.threads)
    settings = settings_for(args.base, args.device, args.quick, args.threads)
    result = run(settings, args.home)
    return publish(args, argv, result, f"serving_{args.device}", markdown, plot)


if __name__ == "__main__":
    sys.exit(main())
