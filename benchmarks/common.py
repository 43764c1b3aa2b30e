"""What every benchmark records beside its numbers: hardware, threads, versions, date, commit.

    from common import RESULTS, environment, set_threads, write_results
    set_threads(2)
    record = {"environment": environment(), ...}

Scripts under ``benchmarks/`` run as ``python benchmarks/<script>.py``, so this module is
imported by its bare name (the script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = RESULTS / "tmp"  # ignored by git: caches, checkpoints, intermediate files


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo or Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (the shared machine has 2 cores: ask for what you use)."""
    import torch

    if threads < 1:
        raise ValueError(f"threads must be ≥ 1, got {threads}")
    torch.set_num_threads(threads)


def environment() -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def environment_line(env: dict[str, Any]) -> str:
    """One Markdown line: hardware, threads, versions, date, commit."""
    parts = [f"{env['cpu']} ({env['logical_cpus']} logical CPUs, {env['torch_threads']} torch threads)"]
    if env.get("gpu"):
        parts.append(env["gpu"])
    parts.append(f"torch {env['torch']}, transformers {env['transformers']}"
                 + (f", peft {env['peft']}" if env.get("peft") else ""))
    parts.append(env["date"])
    if env.get("commit"):
        parts.append(f"commit `{env['commit']}`")
    return "; ".join(parts)


def write_results(stem: str, result: dict[str, Any], markdown: str, out: Path = RESULTS) -> list[Path]:
    """``out/{stem}.json`` (every number) and ``out/{stem}.md`` (the report); returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown)
    return paths


def read_cached(path: Path, key: dict[str, Any]) -> Any:
    """The value ``write_cached`` stored at ``path`` under ``key``, or None (missing, unreadable, other key)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record["value"] if record.get("key") == json.loads(json.dumps(key)) else None  # tuples read back as lists


def write_cached(path: Path, key: dict[str, Any], value: Any) -> Any:
    """Store ``value`` at ``path`` under ``key`` (atomically: a killed run leaves the old file or none); returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "value": value}, indent=1))
    tmp.replace(path)
    return value


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Terminate a child process (a server under test), killing it if it has not exited in ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
