"""Serving cost: per-request adapter mixtures vs the base model, PEFT mixed-batch LoRA, and merging.

Side by side in one process, on one random-weight Llama-shaped model, the same requests
(prompt of P tokens, exactly T generated tokens, greedy), all arriving at t = 0:

  (a) base        the engine with no adapter (every row slot -1): the physical floor
  (b) mixtures    every request its own mixture of m adapters out of N registered
                  (random weights, so every request is a distinct mixture: each one
                  is resolved in the registry, fused and written to a slot), batched
                  by the iteration-level scheduler
  (c) peft        PEFT mixed-batch LoRA: N LoRA adapters loaded in a PeftModel (the
                  registered adapters exported with ``export_peft_lora``), one adapter
                  per row (``adapter_names=``), static batches of the same size
  (d) merge       merging per request: W + Σ w ΔW into the dense weights, generate alone
                  (KV cache), restore

Reported: generated tokens/s, p50/p99 request latency (t = 0 to last token), and the
overhead of each as a ratio to (a). Results go to ``benchmarks/results/serving_{tag}.json``
and ``.md``.

    python benchmarks/bench_serving.py                        # CPU, small shape (~4 min, 1 thread)
    python benchmarks/bench_serving.py --device cuda --shape 1b   # ~1.1B Llama shape, bf16
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from common import write_results  # benchmarks/ is the script folder: first on sys.path

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),  # TinyLlama-1.1B shape
}


@dataclass
class Settings:
    device: str
    shape: str
    k: int
    requests: int
    prompt_tokens: int
    max_tokens: int
    max_batch: int
    adapter_counts: tuple[int, ...]
    mixture_sizes: tuple[int, ...]
    peft_counts: tuple[int, ...]
    merge_requests: int
    kind: str
    repeats: int = 3  # engine runs per row (the best is reported)
    steps: int = 40  # decode steps timed per step row
    seed: int = 0


@dataclass
class Row:
    config: str
    n_adapters: int
    m: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    p50_s: float
    p99_s: float
    overhead: float = 1.0  # base tokens/s over this one's
    note: str = ""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(config: str, n: int, m: int, latencies: list[float], tokens: int, seconds: float,
              note: str = "") -> Row:
    return Row(config, n, m, len(latencies), tokens, round(seconds, 4), round(tokens / seconds, 1),
               round(statistics.median(latencies), 4), round(percentile(latencies, 0.99), 4), note=note)


# --------------------------------------------------------------------------- setup


def build_tokenizer(vocab: int):
    """A word-level tokenizer with one token per id (the model's whole vocabulary decodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<3>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<0>", bos_token="<1>", eos_token="<2>",
                                   unk_token="<3>", padding_side="left")


def build_model(shape: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def make_adapters(kind: str, basis, count: int, seed: int) -> list:
    from adapters_zoo.format import new_adapter

    config = {"scale": {"rank": basis.rank}, "rotation": {"rank": min(16, basis.rank)}}[kind]
    out = []
    for i in range(count):
        adapter = new_adapter(kind, config, basis, meta={"name": f"a{i}"})
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        for params in adapter.params.values():
            for name, t in params.items():
                params[name] = t + 0.05 * torch.randn(t.shape, generator=gen)
        out.append(adapter)
    return out


def prompts(settings: Settings, vocab: int) -> list[list[int]]:
    rng = random.Random(settings.seed)
    return [[1] + [rng.randrange(4, vocab) for _ in range(settings.prompt_tokens - 1)]
            for _ in range(settings.requests)]


# --------------------------------------------------------------------------- (a), (b): the engine


def run_engine(service, requests: list[list[int]], mixtures: list[str | None], settings: Settings):
    """Submit every request at t = 0 (resolving and fusing its mixture first).

    -> latencies, tokens, seconds, and the seconds spent resolving + fusing mixtures.
    """
    from serving.generation import SamplingParams
    from serving.scheduler import GenerationRequest

    params = SamplingParams(max_tokens=settings.max_tokens, temperature=0, ignore_eos=True)
    done_at: dict[int, float] = {}
    tokens = [0]
    finished = threading.Event()
    lock = threading.Lock()

    def on_event(event, i):
        if event.kind == "text":
            return
        with lock:
            if event.kind == "error":
                raise RuntimeError(event.error)
            done_at[i] = time.perf_counter()
            tokens[0] += event.completion_tokens
            if len(done_at) == len(requests):
                finished.set()

    start = time.perf_counter()
    preparing = 0.0
    for i, (ids, model) in enumerate(zip(requests, mixtures)):
        t = time.perf_counter()
        mixture = None if model is None else service.prepare_mixture(model)
        preparing += time.perf_counter() - t
        service.scheduler.submit(GenerationRequest(ids, params, mixture), lambda ev, i=i: on_event(ev, i))
    if not finished.wait(3600):
        raise TimeoutError("the engine did not finish")
    seconds = time.perf_counter() - start
    return [done_at[i] - start for i in range(len(requests))], tokens[0], seconds, preparing


def best_run(run, repeats: int):
    """Run ``repeats`` times; the run with the best tokens/s (on a shared machine the others lost time to it)."""
    return max((run() for _ in range(repeats)), key=lambda r: r[1] / r[2])


def decode_steps(engine, prompts: list[list[int]], slots: list[int], steps: int, device: str) -> list[float]:
    """Seconds of each of ``steps`` decode steps of one batch (rows on ``slots``), after its prefill."""
    from serving.generation import BatchKV

    logits, cache, mask = engine.prefill(prompts, slots)
    kv = BatchKV()
    kv.merge(cache, mask)
    ids = logits.argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        mask, positions = kv.step_inputs()
        ids = engine.forward(ids, mask, positions, kv.cache, slots).argmax(-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def step_rows(engine, basis, prompts: list[list[int]], settings: Settings) -> list[Row]:
    """The adapter math alone: one decode step of a full batch, every row its own resident mixture.

    Fastest of ``steps`` steps (the others lost time to the machine, not to the math): base rows;
    diagonal cores (``scale``: the elementwise path); dense cores (``rotation``: the gathered k×k path).
    """
    from serving.engine import MixtureSpec

    batch = prompts[: settings.max_batch]
    rows = []
    for label, kind in (("base", None), ("diagonal", "scale"), ("dense", "rotation")):
        slots = [-1] * len(batch)
        if kind is not None:
            adapters = make_adapters(kind, basis, len(batch), settings.seed + 7)
            mixtures = [engine.prepare(MixtureSpec.of([(f"{kind}{i}", 1.0)]), lambda a=a: [(a, 1.0)])
                        for i, a in enumerate(adapters)]
            slots = [engine.slots.acquire(m) for m in mixtures]
        times = decode_steps(engine, batch, slots, settings.steps, settings.device)
        for slot in slots:
            engine.slots.release(slot)
        best = min(times)
        rows.append(Row(f"step:{label}", 0 if kind is None else len(batch), 0 if kind is None else 1, len(batch),
                        len(batch), round(best, 5), round(len(batch) / best, 1), round(statistics.median(times), 5),
                        round(percentile(times, 0.99), 5), note=f"one decode step of {len(batch)} rows, fastest of "
                        f"{settings.steps}; p50/p99 are step times"))
    return rows


def mixture_strings(names: list[str], m: int, count: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(count):
        chosen = rng.sample(names, min(m, len(names)))
        weights = [round(rng.uniform(0.1, 1.0), 4) for _ in chosen]  # distinct mixtures, also when m = N = 1
        out.append(",".join(f"{n}:{w}" for n, w in zip(chosen, weights)))
    return out


# --------------------------------------------------------------------------- (c) PEFT, (d) merge


def run_peft(model, basis, adapters: list, requests, settings: Settings, workdir: Path, rng: random.Random):
    import copy

    from peft import PeftModel

    from fusion.lora_io import export_peft_lora

    names = [f"a{i}" for i in range(len(adapters))]
    dirs = []
    for name, adapter in zip(names, adapters):
        out = workdir / "peft" / f"{len(adapters)}" / name
        export_peft_lora(adapter, basis, out, base_model_name_or_path="bench-base")
        dirs.append(out)
    base = copy.deepcopy(model).to(_dtype(settings.device))
    peft_model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=names[0])
    for name, path in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model = peft_model.to(settings.device).eval()
    chosen = [rng.choice(names) for _ in requests]
    latencies, tokens = [], 0
    start = time.perf_counter()
    for b in range(0, len(requests), settings.max_batch):
        ids = torch.tensor(requests[b : b + settings.max_batch], device=settings.device)
        with torch.inference_mode():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=settings.max_tokens, min_new_tokens=settings.max_tokens,
                                      do_sample=False, adapter_names=chosen[b : b + settings.max_batch],
                                      pad_token_id=0)
        _sync(settings.device)
        now = time.perf_counter() - start
        latencies += [now] * ids.shape[0]
        tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    seconds = time.perf_counter() - start
    del peft_model, base
    return latencies, tokens, seconds


def run_merge(model, basis, adapters: list, requests, settings: Settings, m: int, rng: random.Random):
    from serving.reference import merged

    latencies, tokens = [], 0
    start = time.perf_counter()
    for ids in requests[: settings.merge_requests]:
        mixture = [(a, rng.uniform(0.1, 1.0)) for a in rng.sample(adapters, min(m, len(adapters)))]
        with merged(model, basis, mixture):
            x = torch.tensor([ids], device=settings.device)
            with torch.inference_mode():
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                     max_new_tokens=settings.max_tokens, min_new_tokens=settings.max_tokens,
                                     do_sample=False, pad_token_id=0)
        _sync(settings.device)
        latencies.append(time.perf_counter() - start)
        tokens += out.shape[1] - x.shape[1]
    return latencies, tokens, time.perf_counter() - start


def _dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16  # what the engine runs in


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- main


def run(settings: Settings) -> dict:
    import copy

    from adapters_zoo.basis import basis_from_model
    from adapters_zoo.registry import Registry
    from serving.engine import Engine, EngineConfig
    from serving.scheduler import Scheduler, SchedulerConfig
    from serving.services import Limits, Service

    started = time.perf_counter()
    rng = random.Random(settings.seed)
    model = build_model(settings.shape, settings.seed)
    tokenizer = build_tokenizer(model.config.vocab_size)
    t = time.perf_counter()
    basis = basis_from_model(model.to(settings.device), settings.k)
    basis_s = time.perf_counter() - t
    model = model.to("cpu")
    n_max = max(settings.adapter_counts + settings.peft_counts)
    adapters = make_adapters(settings.kind, basis.to("cpu"), n_max, settings.seed)
    reqs = prompts(settings, model.config.vocab_size)
    rows: list[Row] = []

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        registry = Registry(workdir / "home")
        registry.add_basis(basis.to("cpu"))
        t = time.perf_counter()
        for i, adapter in enumerate(adapters):
            registry.add(adapter, f"a{i}")
        register_s = time.perf_counter() - t

        engine_model = copy.deepcopy(model)
        dtype = str(_dtype(settings.device)).removeprefix("torch.")
        engine = Engine(engine_model, tokenizer, basis.to("cpu"),
                        EngineConfig(device=settings.device, dtype=dtype, slots=2 * settings.max_batch,
                                     residual_slots=0, mixture_cache=4 * settings.requests))
        scheduler = Scheduler(engine, SchedulerConfig(max_batch=settings.max_batch, max_queue=10 * settings.requests))
        scheduler.start()
        service = Service(engine, scheduler, registry, Limits(max_mixture=64))
        try:
            run_engine(service, reqs[: settings.max_batch], [None] * settings.max_batch, settings)  # warm up
            for row in step_rows(engine, basis.to("cpu"), reqs, settings):
                rows.append(row)
                print(_line(row), flush=True)
            base_runs = [None] * len(reqs)
            lat, tok, sec, _ = best_run(partial(run_engine, service, reqs, base_runs, settings), settings.repeats)
            rows.append(summarize("base", 0, 0, lat, tok, sec, f"best of {settings.repeats}"))
            print(_line(rows[-1]), flush=True)
            for n in settings.adapter_counts:
                names = [f"a{i}" for i in range(n)]
                for m in settings.mixture_sizes:
                    if m > n:
                        continue
                    misses = engine.mixtures.misses
                    fresh: list[str] = []

                    def new_mixtures(names=names, m=m, fresh=fresh, service=service):
                        fresh[:] = mixture_strings(names, m, len(reqs), rng)  # never seen before: fused now
                        return run_engine(service, reqs, fresh, settings)

                    lat, tok, sec, prep = best_run(new_mixtures, settings.repeats)
                    fused = (engine.mixtures.misses - misses) // settings.repeats
                    rows.append(summarize("mixtures", n, m, lat, tok, sec, f"best of {settings.repeats}; {fused} "
                                          f"new mixtures per run, {prep:.2f} s resolving + fusing"))
                    print(_line(rows[-1]), flush=True)
                    slot_hits = engine.slots.hits
                    lat, tok, sec, _ = best_run(partial(run_engine, service, reqs, fresh, settings), settings.repeats)
                    hits = (engine.slots.hits - slot_hits) // settings.repeats
                    rows.append(summarize("cached", n, m, lat, tok, sec, f"best of {settings.repeats}; the last "
                                          f"run's mixtures again, {hits} slot hits per run"))
                    print(_line(rows[-1]), flush=True)
            lat, tok, sec, _ = best_run(partial(run_engine, service, reqs, base_runs, settings), settings.repeats)
            rows.append(summarize("base", 0, 0, lat, tok, sec, f"best of {settings.repeats}, measured again "
                                  "after the mixtures"))
            print(_line(rows[-1]), flush=True)
        finally:
            scheduler.stop()
        del engine, engine_model, scheduler, service
        if settings.device.startswith("cuda"):
            torch.cuda.empty_cache()

        try:
            import peft  # noqa: F401

            has_peft = True
        except ImportError:
            has_peft = False
        if has_peft:
            for n in settings.peft_counts:
                lat, tok, sec = run_peft(model, basis.to("cpu"), adapters[:n], reqs, settings, workdir, rng)
                rows.append(summarize("peft", n, 1, lat, tok, sec, "one LoRA per row, static batches"))
                print(_line(rows[-1]), flush=True)
        dense = copy.deepcopy(model).to(settings.device, _dtype(settings.device))
        dense_basis = basis.to(settings.device, dense.dtype)
        for m in sorted({1, max(settings.mixture_sizes)}):
            lat, tok, sec = run_merge(dense, dense_basis, [_to(a, settings.device) for a in adapters[:max(
                settings.adapter_counts)]], reqs, settings, m, rng)
            rows.append(summarize("merge", max(settings.adapter_counts), m, lat, tok, sec,
                                  f"{settings.merge_requests} requests, one at a time"))
            print(_line(rows[-1]), flush=True)
        registry.close()

    base = statistics.mean(r.tokens_per_s for r in rows if r.config == "base")
    step_base = next(r.tokens_per_s for r in rows if r.config == "step:base")
    for row in rows:
        row.overhead = round((step_base if row.config.startswith("step:") else base) / row.tokens_per_s, 2)
    return {
        "settings": asdict(settings),
        "model": {"shape": settings.shape, **SHAPES[settings.shape],
                  "parameters": sum(p.numel() for p in model.parameters()), "target_layers": len(basis.layers)},
        "setup_seconds": {"basis": round(basis_s, 2), "register_adapters": round(register_s, 2)},
        "adapter_flops_per_token": _flop_ratio(basis),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": settings.device,
                    "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
                    "gpu": torch.cuda.get_device_name() if settings.device.startswith("cuda") else None},
        "rows": [asdict(r) for r in rows],
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def _flop_ratio(basis) -> dict[str, float]:
    """The cost model: per token, the adapter path adds 2k(in+out) FLOPs to a target layer's 2·in·out."""
    base = sum(2 * lb.in_features * lb.out_features for lb in basis.layers.values())
    extra = sum(2 * lb.k * (lb.in_features + lb.out_features) for lb in basis.layers.values())
    return {"target_layers_base": base, "adapter_extra": extra, "ratio": round(extra / base, 4)}


def _to(adapter, device: str):
    from adapters_zoo.format import Adapter

    params = {layer: {n: t.to(device) for n, t in p.items()} for layer, p in adapter.params.items()}
    return Adapter(adapter.kind, adapter.config, adapter.base_fingerprint, adapter.basis_k, params, adapter.meta)


def _line(row: Row) -> str:
    return (f"{row.config:9s} N={row.n_adapters:<4d} m={row.m:<2d} {row.tokens_per_s:9.1f} tok/s  "
            f"p50 {row.p50_s:7.3f}s  p99 {row.p99_s:7.3f}s  {row.note}")


def markdown(result: dict) -> str:
    s = result["settings"]
    model = result["model"]
    lines = [
        f"# Serving benchmark ({s['device']}, {s['shape']} shape)",
        "",
        f"Model: random-weight Llama, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
        f"{model['parameters'] / 1e6:.1f}M parameters, {model['target_layers']} target layers, basis k={s['k']}, "
        f"adapter kind `{s['kind']}`. {s['requests']} requests of {s['prompt_tokens']} prompt tokens, "
        f"{s['max_tokens']} generated tokens each (greedy, eos ignored), all arriving at t=0; batch ≤ "
        f"{s['max_batch']} rows. Machine: {result['machine']}.",
        "",
        f"Cost model: the adapter path adds 2k(in+out) FLOPs per token to a target layer's 2·in·out, here "
        f"{result['adapter_flops_per_token']['ratio']:.1%} of the target layers' FLOPs (less of the model's: "
        "attention and the output head carry none); small ops also cost a fixed launch/dispatch time each.",
        "",
        "Overhead = base tokens/s (mean of the two base rows; `step:base` for `step:` rows) ÷ this row's "
        "tokens/s (1.00 = free). Latency: t=0 to a request's last token. Engine rows are the best of "
        f"{s['repeats']} runs; on a shared machine (see the load average) rows still move by ±20% from noise "
        "alone: compare the two base rows. `step:` rows time the adapter math alone.",
        "",
        "| config | N registered | m per mixture | tokens/s | p50 s | p99 s | overhead vs base | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['n_adapters']} | {r['m']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.3f} "
                     f"| {r['p99_s']:.3f} | {r['overhead']:.2f} | {r['note']} |")
    lines += [
        "",
        "- **step:base / step:diagonal / step:dense**: one decode step of a full batch, every row on its own "
        "resident mixture (none; diagonal cores, the elementwise path; dense k×k cores, the gathered path): the "
        "adapter math alone, fastest of many steps.",
        "- **base**: the engine with every row on slot -1 (no adapter work): the floor.",
        "- **mixtures**: every request a distinct mixture of m of the N registered adapters (resolved in the "
        "registry, fused with `linear`, written to a slot) in the iteration-level batch; resolving and fusing run "
        "in the submitting thread while earlier requests decode, as HTTP worker threads do.",
        "- **cached**: the same requests and mixtures again: every mixture already in a device slot, so this is "
        "the per-token cost of the batched adapter math alone (independent of m by construction).",
        "- **peft**: PEFT mixed-batch LoRA (`adapter_names=`), the same adapters exported as rank-≤k LoRA, "
        "one adapter per row (PEFT has no per-row mixtures), static batches.",
        "- **merge**: dense W + Σ w ΔW per request, generated alone (KV cache), weights restored; serial.",
        f"- Setup: basis {result['setup_seconds']['basis']} s, registering {max(s['adapter_counts'])} adapters "
        f"{result['setup_seconds']['register_adapters']} s; whole run {result['total_seconds']} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shape", default=None, choices=tuple(SHAPES), help="default: small on cpu, 1b on cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the shared 2-core dev box thrashes with more)")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (smoke test)")
    p.add_argument("--out", default=None, help="results name (default: serving_cpu / serving_cuda_1b)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = args.shape or ("small" if args.device == "cpu" else "1b")
    gpu = args.device == "cuda"
    settings = Settings(
        device=args.device, shape=shape, k=64 if gpu else 32,
        requests=8 if args.quick else (256 if gpu else 64),
        prompt_tokens=16 if args.quick else (128 if gpu else 16),
        max_tokens=8 if args.quick else (128 if gpu else 32),
        max_batch=8 if args.quick else (64 if gpu else 32),
        adapter_counts=(1, 4) if args.quick else (1, 16, 256),
        mixture_sizes=(1, 2) if args.quick else (1, 4),
        # a rank-k LoRA export of a 1B-shape adapter is ~0.3 GB in float32: 16 of them on the GPU, not 256
        peft_counts=(1, 4) if args.quick else ((1, 16, 64) if not gpu else (1, 16)),
        merge_requests=2 if args.quick else (32 if gpu else 64),
        kind="scale",
        repeats=1 if args.quick else 3,
    )
    result = run(settings)
    name = args.out or (f"serving_{args.device}" + ("" if shape == "small" else f"_{shape}"))
    paths = write_results(name, result, markdown(result))
    print(f"wrote {paths[0]} and {paths[1].name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
