"""``specfuse`` server commands run in their own process, as a user runs them, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cli_server(args: list[str], env: dict[str, str], timeout: float = 120) -> Iterator[str]:
    """``python -m serving.cli ARGS --port P`` on 127.0.0.1; yields its URL once /health answers, then stops it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", *args, "--port", str(port)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, f"the server did not answer /health within {timeout} s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
