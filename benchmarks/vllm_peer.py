"""vLLM beside ``specfuse serve``: both servers in their own processes, the same requests over HTTP.

The vLLM server is the one ``specfuse vllm-args MODEL_DIR`` prints (every registry adapter
as a ``--lora-modules`` entry, the specfuse resolver plugin for mixtures), started from a
vLLM install in its own virtual environment (``--vllm PATH/bin/vllm``; vLLM pins its own
torch and transformers). On a CPU build the KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB and the
OpenMP threads are ``VLLM_CPU_OMP_THREADS_BIND`` (here: the first ``threads`` cores).

    from vllm_peer import specfuse_server, vllm_server, completions
    with vllm_server(vllm_bin, home, model_dir) as url: completions(url, model, prompts, 32)

Used by ``bench_vllm.py`` (greedy agreement and the peer throughput rows) and by the live
vLLM test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(1.0)


@contextlib.contextmanager
def _server(cmd: list[str], env: dict[str, str], name: str, timeout: float) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, Path(log.name), timeout)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -15):
            print(f"{name} server log: {log.name}", file=sys.stderr)
        else:
            os.unlink(log.name)


@contextlib.contextmanager
def vllm_server(vllm_bin: str | Path, home: Path, model_dir: Path, threads: int = 2, kv_cache_gib: int = 1,
                max_loras: int = 16, max_num_seqs: int = 16, max_model_len: int = 512,
                timeout: float = 900) -> Iterator[tuple[str, subprocess.Popen]]:
    """The vLLM server as ``specfuse vllm-args --launcher module`` prints it (the python beside
    ``vllm_bin``), on a free port; yields (url, process)."""
    from adapters_zoo.registry import Registry
    from serving.vllm_bridge import vllm_serve_command

    with Registry(home) as registry:
        env_plugin, argv = vllm_serve_command(registry, model_dir, max_loras=max_loras, launcher="module")
    argv[0] = str(Path(vllm_bin).with_name("python"))
    argv += ["--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len), "--dtype", "float32",
             "--max-cpu-loras", str(max(max_loras, 64))]
    env = os.environ | env_plugin | {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "OMP_NUM_THREADS": str(threads),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
    }
    with _server(argv, env, "vllm", timeout) as served:
        yield served


@contextlib.contextmanager
def specfuse_server(home: Path, model_dir: Path, threads: int = 2,
                    timeout: float = 600) -> Iterator[tuple[str, subprocess.Popen]]:
    """``specfuse serve MODEL_DIR`` (its defaults) on a free port; yields (url, process)."""
    cmd = [sys.executable, "-c", "import sys; from serving.cli import main; sys.exit(main())", "serve",
           str(model_dir), "--home", str(home)]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    env.pop("SPECFUSE_API_KEY", None)
    with _server(cmd, env, "specfuse", timeout) as served:
        yield served


@dataclass
class Completion:
    token_ids: list[int] | None  # vLLM returns them with return_token_ids; specfuse does not
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # from the batch's start to this request's last token


async def _complete(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                    ignore_eos: bool, start: float, logprobs: int | None) -> Completion:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos}
    if logprobs is not None:
        body["logprobs"] = logprobs
    response = await client.post(url + "/v1/completions", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{model!r}: {response.status_code} {response.text[:300]}")
    data = response.json()
    choice = data["choices"][0]
    return Completion(choice.get("token_ids"), choice["text"], data["usage"]["prompt_tokens"],
                      data["usage"]["completion_tokens"], time.perf_counter() - start)


def completions(url: str, models: list[str], prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False,
                logprobs: int | None = None) -> tuple[list[Completion], float]:
    """Request i (``models[i]``, ``prompts[i]``) sent together, greedy; (answers, wall seconds of the batch)."""

    async def run() -> tuple[list[Completion], float]:
        start = time.perf_counter()
        async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
            done = await asyncio.gather(*(_complete(client, url, m, p, max_tokens, ignore_eos, start, logprobs)
                                          for m, p in zip(models, prompts)))
        return list(done), time.perf_counter() - start

    return asyncio.run(run())


def cpu_seconds(proc: subprocess.Popen) -> float:
    """utime + stime of ``proc`` and its finished children (vLLM's engine core is a child process)."""
    total = 0.0
    for pid in [proc.pid, *_children(proc.pid)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            out += [kid, *_children(kid)]
    return out
