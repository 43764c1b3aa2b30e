"""Soak: a real ``specfuse serve`` on 127.0.0.1 under sustained, overloaded, hostile and crashing traffic.

    python benchmarks/soak.py                                   # 64 clients × 180 s, then the other phases
    python benchmarks/soak.py --clients 16 --duration 30 --out /tmp/soak   # a short run

The server is a separate process (``specfuse serve``, loopback only, an API key from the
environment) over a registry built here: a base the shape of the demo base (Llama, hidden
128, 4 layers, random weights: the soak measures the server, not the model), its basis and
eight adapters of every kind; ``--model-dir`` / ``--home`` soak an existing served home
instead. Every request has a time limit: one that passes it is a *hang*.

Phases, in order:
1. ``steady``: ``--clients`` clients for ``--duration`` s, each request a new mixture (two
   adapters, random weights, a random fusion method now and then), half streaming; one
   more client sends hostile requests (huge weights, blowing-up fusion params, deep JSON,
   huge integers, lone surrogates, coerced types, bad keys, harmful uploads and fuses)
   mixed into that traffic. RSS of the server is sampled every second.
2. ``burst``: ``--burst`` requests at once (each answered 200, or 429 when the queue is full).
3. ``vanish``: ``--vanish`` streaming clients that go away after their first event.
4. ``kill``: ``--uploaders`` clients upload distinct adapters while the server is killed
   with SIGKILL, ``--kill-rounds`` times (restarted in between); then ``registry verify``
   and every acknowledged (201) upload must load.

Records requests, statuses, p50/p99, RSS before / first minute / last minute / peak,
slots pinned and rows running at the end, acked writes lost, into
``benchmarks/results/soak.{json,md}``. Goal: 0 hangs, 0 5xx from hostile input, 0 acked
writes lost, 0 slots pinned at the end, RSS flat (within 10%) between the first and last
minute (first and last third of ``steady`` when it is shorter than two minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from common import RESULTS, environment, environment_line, stop_process, write_results

ROOT = Path(__file__).resolve().parent.parent
KEY = "soak-key"
KINDS = [("scale", {"rank": 8}), ("svft", {"pattern": "banded", "d": 1}), ("rotation", {"rank": 6}),
         ("additive", {"rank": 4}), ("lora", {"rank": 2}), ("scale", {"rank": 16}), ("svft", {"pattern": "plain"}),
         ("rotation", {"rank": 4})]
METHODS = [None, None, None, "ties", "dare_linear", "magnitude_prune"]
TIMEOUT_S = 120.0  # a request not answered by then is a hang
RESIDUAL = {"A", "B", "A_U", "A_V"}  # factors outside the basis: kept small, as trained ones are


# --------------------------------------------------------------------------- the served home


def perturbed(kind: str, config: dict, basis, seed: int, scale: float = 0.3):
    import torch

    from adapters_zoo.format import new_adapter

    adapter = new_adapter(kind, config, basis, meta={"seed": seed})
    gen = torch.Generator().manual_seed(seed)
    for params in adapter.params.values():
        for name, t in params.items():
            if name not in adapter.kind_impl.frozen:
                factor = scale * (0.1 if name in RESIDUAL else 1.0)
                params[name] = t + factor * torch.randn(t.shape, generator=gen)
    return adapter


def build_home(home: Path) -> tuple[Path, list[str], object]:
    """A demo-shaped base, its basis and eight adapters in a registry at ``home``: (model dir, names, basis)."""
    import torch
    from transformers import LlamaForCausalLM

    from adapters_zoo.basis import basis_from_model
    from adapters_zoo.demo_model import DEMO_DEFAULTS, build_tokenizer, save_model, tiny_config
    from adapters_zoo.registry import Registry

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(tiny_config(**DEMO_DEFAULTS)).eval()  # the demo-trained base's shape
    model_dir = save_model(model, tokenizer, home / "base")
    basis = basis_from_model(model, rank=16)
    names = []
    with Registry(home) as registry:
        registry.add_basis(basis)
        for i, (kind, config) in enumerate(KINDS):
            names.append(f"{kind}-{i}")
            registry.add(perturbed(kind, config, basis, i), names[-1])
    return model_dir, names, basis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``specfuse serve`` in a child process on 127.0.0.1."""

    def __init__(self, model_dir: Path, home: Path, extra: list[str], env: dict[str, str]):
        self.cmd = [sys.executable, "-c", "import sys; from serving.cli import main; sys.exit(main())", "serve",
                    str(model_dir), "--home", str(home), "--host", "127.0.0.1", "--device", "cpu", *extra]
        self.env = os.environ | {"SPECFUSE_API_KEY": KEY, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | env
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Server:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([*self.cmd, "--port", str(port)], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start in 180 s")

    @property
    def rss(self) -> int:
        """Resident memory of the server process (Linux /proc), bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc: the soak measures memory on Linux only")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc)


# --------------------------------------------------------------------------- traffic


class Tally:
    """Statuses, latencies and hangs of one phase."""

    def __init__(self):
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.hangs = 0
        self.errors: Counter[str] = Counter()  # transport errors by class

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 4)) if lat else (lambda q: None)
        return {"requests": sum(self.statuses.values()) + self.hangs + sum(self.errors.values()),
                "statuses": dict(sorted(self.statuses.items())), "hangs": self.hangs,
                "transport_errors": dict(self.errors), "p50_s": pick(0.5), "p99_s": pick(0.99)}


async def request(http: httpx.AsyncClient, tally: Tally, method: str, path: str, *, stream: bool = False,
                  vanish: bool = False, **kwargs) -> int | None:
    async def exchange() -> int:
        async with http.stream(method, path, **kwargs) as response:
            status = response.status_code
            if vanish:
                async for _ in response.aiter_bytes():
                    break  # the first event, then the client is gone
            elif stream and status == 200:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
                if b'"error"' in body:  # an error event inside a 200 stream counts as that error
                    status = 500 if b"server_error" in body else 400
            else:
                await response.aread()
            return status

    start = time.perf_counter()
    try:
        status = await asyncio.wait_for(exchange(), TIMEOUT_S)
    except asyncio.TimeoutError:
        tally.hangs += 1
        return None
    except httpx.HTTPError as err:
        tally.errors[type(err).__name__] += 1
        return None
    tally.statuses[str(status)] += 1
    if status == 200:
        tally.latencies.append(time.perf_counter() - start)
    return status


def normal_body(rng: random.Random, names: list[str], stream: bool) -> dict:
    prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz =:") for _ in range(rng.randint(3, 40)))
    body = {"model": "base", "prompt": prompt, "max_tokens": rng.randint(4, 24), "temperature": rng.choice([0, 0.8]),
            "stream": stream, "ignore_eos": True}
    if rng.random() < 0.85:  # a new mixture nearly every time
        a, b = rng.sample(names, 2)
        w = round(rng.uniform(0.05, 0.95), 4)
        body["adapters"] = {a: w, b: round(1 - w, 4)}
        method = rng.choice(METHODS)
        if method:
            body["fusion_method"] = method
            body["fusion_params"] = {"density": round(rng.uniform(0.2, 0.9), 2)}
    return body


def hostile_requests(names: list[str], basis) -> list[tuple[str, str, dict]]:
    """(method, path, httpx kwargs): each must be answered with a 4xx, never a 5xx or a hang."""
    from safetensors.torch import save as save_tensors

    from adapters_zoo.format import _flat_tensors, _meta_strings, adapter_to_bytes

    auth = {"Authorization": f"Bearer {KEY}"}
    raw = {"Content-Type": "application/json", **auth}
    a, b = names[0], names[1]
    huge = perturbed("scale", {"rank": 8}, basis, 99)
    huge_bytes = save_tensors({k: t.clone().fill_(1e30) for k, t in _flat_tensors(huge).items()},
                              metadata=_meta_strings(huge))
    wide = save_tensors(_flat_tensors(huge), metadata={**_meta_strings(huge), "config": json.dumps({"rank": 10**30})})
    deep_meta = save_tensors(_flat_tensors(huge), metadata={**_meta_strings(huge), "meta": "[" * 2000 + "]" * 2000})
    digits = save_tensors(_flat_tensors(huge), metadata={**_meta_strings(huge), "basis_k": "9" * 5000})
    c = "/v1/completions"
    return [
        ("POST", c, {"json": {"model": f"{a}:1e20", "prompt": "x", "max_tokens": 4}, "headers": auth}),
        ("POST", c, {"json": {"model": "base", "adapters": {a: 0.5, b: 0.5}, "fusion_method": "ties",
                              "fusion_params": {"scale": 1e308}, "prompt": "x", "max_tokens": 4}, "headers": auth}),
        ("POST", c, {"content": b'{"model":"base","prompt":"x","fusion_params":' + b"[" * 5000 + b"]" * 5000 + b"}",
                     "headers": raw}),
        ("POST", c, {"content": b'{"model":"base","prompt":"x","max_tokens":1' + b"0" * 5000 + b"}", "headers": raw}),
        ("POST", c, {"content": b'{"model":"base","prompt":"\\ud800","max_tokens":2}', "headers": raw}),
        ("POST", "/v1/chat/completions", {"content": b'{"model":"base","messages":[{"role":"user","content":'
                                                     b'"\\ud800"}],"max_tokens":2}', "headers": raw}),
        ("POST", c, {"json": {"model": "base", "prompt": "x", "max_tokens": "10"}, "headers": auth}),
        ("POST", c, {"json": {"model": "base", "prompt": "x", "stream": "yes"}, "headers": auth}),
        ("POST", c, {"json": {"model": "base", "prompt": "", "max_tokens": 2}, "headers": auth}),
        ("POST", c, {"json": {"model": "base", "prompt": "x", "adapters": {a: 1}, "fusion_method": ""},
                     "headers": auth}),
        ("POST", c, {"json": {"model": "base", "prompt": "x", "temperature": 1e-300, "max_tokens": 2},
                     "headers": auth}),
        ("POST", c, {"json": {"model": "base", "prompt": "x"}}),  # no key
        ("GET", "/v1/models", {"headers": {"Authorization": "Bearer wrong"}}),
        ("POST", "/v1/fuse", {"json": {"mixture": f"{a}:1e20", "name": "boom"}, "headers": auth}),
        ("POST", "/v1/fuse", {"json": {"mixture": f"{a}:0.5,{b}:0.5", "method": "ties", "params": {"scale": 1e30},
                                       "name": "boom"}, "headers": auth}),
        ("POST", "/v1/adapters", {"params": {"name": "huge"}, "content": huge_bytes, "headers": auth}),
        ("POST", "/v1/adapters", {"params": {"name": "wide"}, "content": wide, "headers": auth}),
        ("POST", "/v1/adapters", {"params": {"name": "deep"}, "content": deep_meta, "headers": auth}),
        ("POST", "/v1/adapters", {"params": {"name": "digits"}, "content": digits, "headers": auth}),
        ("POST", "/v1/adapters", {"params": {"name": "../etc"}, "content": adapter_to_bytes(huge), "headers": auth}),
        ("GET", "/v1/adapters/..%2F..%2Fetc", {"headers": auth}),
    ]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


async def steady(server: Server, names: list[str], hostile: list, clients: int, duration: float,
                 seed: int) -> dict:
    tally, bad = Tally(), Tally()
    rss: list[tuple[float, int]] = []
    start = time.perf_counter()
    stop_at = start + duration
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                 limits=limits, timeout=TIMEOUT_S) as http:
        async def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop_at:
                stream = rng.random() < 0.5
                await request(http, tally, "POST", "/v1/completions", stream=stream,
                              json=normal_body(rng, names, stream))

        async def attacker() -> None:
            i = 0
            async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as raw:
                while time.perf_counter() < stop_at:
                    method, path, kwargs = hostile[i % len(hostile)]
                    await request(raw, bad, method, path, **kwargs)
                    i += 1
                    await asyncio.sleep(0.05)

        async def sampler() -> None:
            while time.perf_counter() < stop_at:
                rss.append((round(time.perf_counter() - start, 1), server.rss))
                await asyncio.sleep(1.0)

        await asyncio.gather(*(client(i) for i in range(clients)), attacker(), sampler())
    window = 60.0 if duration >= 120 else duration / 3
    first = mean([r for t, r in rss if t <= window])
    last = mean([r for t, r in rss if t >= duration - window])
    return {"traffic": tally.summary(), "hostile": bad.summary(),
            "hostile_5xx": sum(n for s, n in bad.statuses.items() if s.startswith("5")),
            "rss_first_window_mb": round(first / 2**20, 1), "rss_last_window_mb": round(last / 2**20, 1),
            "rss_peak_mb": round(max(r for _, r in rss) / 2**20, 1), "rss_window_s": window,
            "rss_growth": round(last / first - 1, 4) if first else None,
            "rss_samples_mb": [(t, round(r / 2**20, 1)) for t, r in rss]}


async def burst(server: Server, names: list[str], count: int, seed: int) -> dict:
    tally = Tally()
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=count + 8)
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits,
                                 timeout=TIMEOUT_S) as http:
        bodies = [{**normal_body(rng, names, False), "max_tokens": 8} for _ in range(count)]
        await asyncio.gather(*(request(http, tally, "POST", "/v1/completions", json=b) for b in bodies))
    return tally.summary()


async def vanish(server: Server, names: list[str], count: int, seed: int) -> dict:
    tally = Tally()
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                 limits=httpx.Limits(max_connections=count + 8), timeout=TIMEOUT_S) as http:
        bodies = [{**normal_body(rng, names, True), "max_tokens": 200} for _ in range(count)]
        await asyncio.gather(*(request(http, tally, "POST", "/v1/completions", vanish=True, json=b) for b in bodies))
    return tally.summary()


def cache_bytes(server: Server) -> dict:
    """The server's own account of its host caches (from /metrics), MB."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    out = {}
    for line in text.splitlines():
        for name in ("specfuse_mixture_cache_bytes", "specfuse_adapter_cache_bytes"):
            if line.startswith(name + " "):
                out[name.removeprefix("specfuse_").replace("_bytes", "_mb")] = round(float(line.split()[1]) / 2**20, 1)
    return out


def settled(server: Server, wait_s: float = 30.0) -> dict:
    """/health once nothing runs or waits (or after ``wait_s``): rows and slots left behind."""
    deadline = time.time() + wait_s
    while True:
        health = httpx.get(server.url + "/health", timeout=10).json()
        idle = not health["running"] and not health["waiting"] and not health["slots"]["pinned"]
        if idle or time.time() > deadline:
            return {"running": health["running"], "waiting": health["waiting"],
                    "slots_pinned": health["slots"]["pinned"]}
        time.sleep(0.2)


def kill_during_uploads(server: Server, home: Path, basis, uploaders: int, rounds: int, seed: int) -> dict:
    """Upload distinct adapters from ``uploaders`` threads, SIGKILL the server mid-way, restart; then verify."""
    import threading

    from adapters_zoo.format import adapter_to_bytes
    from adapters_zoo.registry import Registry

    acked: list[tuple[str, str]] = []  # (ref, sha256) answered 201
    lock = threading.Lock()
    per_round = []
    for r in range(rounds):
        stop = threading.Event()
        attempts = Counter()

        def upload(u: int, r: int = r, stop: threading.Event = stop, attempts: Counter = attempts) -> None:
            i = 0
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
                while not stop.is_set():
                    data = adapter_to_bytes(perturbed("scale", {"rank": 8}, basis, seed + 10_000 * r + 100 * u + i))
                    i += 1
                    try:
                        resp = http.post("/v1/adapters", params={"name": f"up-{u}"}, content=data)
                    except httpx.HTTPError:
                        attempts["transport_error"] += 1
                        return  # the server is gone
                    attempts[str(resp.status_code)] += 1
                    if resp.status_code == 201:
                        with lock:
                            acked.append((resp.json()["ref"], resp.json()["sha256"]))

        threads = [threading.Thread(target=upload, args=(u,)) for u in range(uploaders)]
        for t in threads:
            t.start()
        time.sleep(2.0 + r)
        server.kill()
        stop.set()
        for t in threads:
            t.join(60)
        per_round.append(dict(attempts))
        if r + 1 < rounds:
            server.start()
    with Registry(home) as registry:
        problems = registry.verify()
        lost = []
        for ref, sha in acked:
            try:
                rec = registry.get(ref)
                registry.load(ref)
                if rec.sha256 != sha:
                    lost.append(ref)
            except Exception:  # noqa: BLE001 - any failure to read an acked write is a loss
                lost.append(ref)
    return {"rounds": rounds, "uploaders": uploaders, "acked": len(acked), "acked_lost": len(lost),
            "lost_refs": lost[:20], "verify_problems": problems[:20], "per_round_statuses": per_round}


# --------------------------------------------------------------------------- report


def report(result: dict) -> str:
    s, b, v, k = result["steady"], result["burst"], result["vanish"], result["kill"]
    goals = result["goals"]
    rows = [
        ("steady: requests", s["traffic"]["requests"]), ("steady: statuses", s["traffic"]["statuses"]),
        ("steady: p50 / p99 (s)", f"{s['traffic']['p50_s']} / {s['traffic']['p99_s']}"),
        ("steady: hangs", s["traffic"]["hangs"]),
        ("hostile: requests", s["hostile"]["requests"]), ("hostile: statuses", s["hostile"]["statuses"]),
        ("hostile: 5xx", s["hostile_5xx"]), ("hostile: hangs", s["hostile"]["hangs"]),
        ("RSS before (MB)", result["rss_before_mb"]),
        (f"RSS first / last {s['rss_window_s']:g} s (MB)", f"{s['rss_first_window_mb']} / {s['rss_last_window_mb']}"
                                                             f" ({100 * (s['rss_growth'] or 0):+.1f}%)"),
        ("RSS peak (MB)", s["rss_peak_mb"]),
        ("host caches after steady (MB, the server's count)", s["caches_after"]),
        ("RSS after all phases (MB)", result["rss_after_mb"]),
        (f"burst: {result['settings']['burst']} at once", b["statuses"]), ("burst: hangs", b["hangs"]),
        ("burst: p50 / p99 (s)", f"{b['p50_s']} / {b['p99_s']}"),
        (f"vanish: {result['settings']['vanish']} clients gone mid-stream", v["statuses"]),
        ("at the end: rows running / slots pinned", f"{result['end']['running']} / {result['end']['slots_pinned']}"),
        (f"kill -9 during uploads: {k['rounds']} rounds × {k['uploaders']} uploaders, acked", k["acked"]),
        ("acked writes lost", k["acked_lost"]), ("registry verify problems", len(k["verify_problems"])),
    ]
    lines = ["# Soak", "", f"`{result['command']}`", "", environment_line(result["environment"]), "",
             result["setup"], "", "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {json.dumps(value) if isinstance(value, dict) else value} |" for name, value in rows]
    lines += ["", "Goals: " + ", ".join(f"{name} {'met' if ok else '**missed**'}" for name, ok in goals.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of steady traffic")
    p.add_argument("--burst", type=int, default=500)
    p.add_argument("--vanish", type=int, default=50)
    p.add_argument("--uploaders", type=int, default=8)
    p.add_argument("--kill-rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None, help="soak this served base (with --home)")
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--server-args", default="--max-queue 256", help="extra `specfuse serve` flags")
    p.add_argument("--server-env", default="", help="extra environment for the server, NAME=VALUE,...")
    p.add_argument("--steady-only", action="store_true", help="only the steady phase (memory experiments)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from adapters_zoo.registry import Registry

    with tempfile.TemporaryDirectory(prefix="specfuse-soak-") as tmp:
        if args.model_dir is None:
            home = Path(tmp) / "home"
            model_dir, names, basis = build_home(home)
            setup = ("Base: Llama shaped as the demo base (hidden 128, 4 layers, random weights), basis k=16, "
                     f"{len(names)} adapters ({', '.join(names)}).")
        else:
            home, model_dir = args.home, args.model_dir
            with Registry(home) as registry:
                names = sorted({r.name for r in registry.list()})
                basis = registry.basis(registry.bases()[0]["fingerprint"])
            setup = f"Base: {model_dir}; {len(names)} adapters from {home}."
        env = dict(item.split("=", 1) for item in args.server_env.split(",") if item)
        server = Server(model_dir, home, args.server_args.split(), env).start()
        try:
            rss_before = server.rss
            hostile = hostile_requests(names, basis)
            result = {"steady": asyncio.run(steady(server, names, hostile, args.clients, args.duration, args.seed))}
            result["steady"]["caches_after"] = cache_bytes(server)
            if args.steady_only:
                print(json.dumps({k: v for k, v in result["steady"].items() if k != "rss_samples_mb"}, indent=1))
                print(result["steady"]["rss_samples_mb"][::10])
                return 0
            result["burst"] = asyncio.run(burst(server, names, args.burst, args.seed + 1))
            result["vanish"] = asyncio.run(vanish(server, names, args.vanish, args.seed + 2))
            result["end"] = settled(server)
            result["rss_before_mb"] = round(rss_before / 2**20, 1)
            result["rss_after_mb"] = round(server.rss / 2**20, 1)
            result["kill"] = kill_during_uploads(server, home, basis, args.uploaders, args.kill_rounds, args.seed)
        finally:
            server.stop()
    s = result["steady"]
    result["goals"] = {
        "0 hangs": s["traffic"]["hangs"] + s["hostile"]["hangs"] + result["burst"]["hangs"] == 0,
        "0 5xx from hostile input": s["hostile_5xx"] == 0,
        "0 5xx in normal traffic": not any(k.startswith("5") for k in s["traffic"]["statuses"]),
        "0 acked writes lost": result["kill"]["acked_lost"] == 0 and not result["kill"]["verify_problems"],
        "0 slots pinned at the end": result["end"]["slots_pinned"] == 0 and result["end"]["running"] == 0,
        "RSS flat (within 10%)": s["rss_growth"] is not None and abs(s["rss_growth"]) <= 0.10,
    }
    result["settings"] = vars(args) | {"out": str(args.out), "model_dir": str(args.model_dir), "home": str(args.home)}
    result["command"] = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["setup"] = setup
    result["environment"] = environment()
    for path in write_results("soak", result, report(result), args.out):
        print(path)
    print(json.dumps(result["goals"], indent=1))
    return 0 if all(result["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
