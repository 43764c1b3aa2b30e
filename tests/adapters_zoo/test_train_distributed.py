"""Data-parallel training under torchrun (gloo on CPU): 2 ranks of batch B train the adapter 1 process of 2B does."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from adapters_zoo.basis import load_basis
from adapters_zoo.format import load_adapter, new_adapter

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _specfuse() -> str:
    beside = Path(sys.executable).with_name("specfuse")
    found = str(beside) if beside.is_file() else shutil.which("specfuse")
    if found is None:
        pytest.skip("the specfuse console script is not installed")
    return found


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _max_diff(a, b) -> float:
    return max(float((a.params[layer][n] - b.params[layer][n]).abs().max())
               for layer in a.layers for n in a.params[layer])


def _train_args(model_dir, data, out, home, batch_size: int, steps: int) -> list[str]:
    return ["train", str(model_dir), "--kind", "scale", "--rank", "8", "--data", str(data), "--steps", str(steps),
            "--batch-size", str(batch_size), "--lr", "0.05", "--out", str(out), "--home", str(home)]


def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(tiny_llama_dir, reverse_task, tmp_path):
    specfuse, data = _specfuse(), reverse_task["train"]
    one = tmp_path / "one.safetensors"
    subprocess.run([specfuse, *_train_args(tiny_llama_dir, data, one, tmp_path / "h1", 8, 6)], env=_env(),
                   check=True, capture_output=True, timeout=300)
    two = tmp_path / "two" / "two.safetensors"
    two.parent.mkdir()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--no-python", specfuse, *_train_args(tiny_llama_dir, data, two, tmp_path / "h2", 4, 6)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = load_adapter(one), load_adapter(two)
    assert _max_diff(a, b) <= 1e-5
    start = new_adapter("scale", {"rank": 8}, load_basis(two.with_name("two.basis.safetensors")), b.layers)
    assert _max_diff(b, start) > 1e-3  # it trained: the equality is not that of two identities
    assert a.meta["signature"] == b.meta["signature"]  # computed once, by rank 0, from the same base
    assert b.meta["train"]["stats"]["device"] == "cpu × 2 ranks"
    assert sorted(p.name for p in two.parent.iterdir()) == ["two.basis.safetensors", "two.safetensors"]
    assert run.stdout.count("wrote ") == 1  # rank 0 alone reports and writes


def test_a_rank_that_dies_stops_the_others_with_one_error_line(tiny_llama_dir, reverse_task, tmp_path):
    specfuse = _specfuse()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", SPECFUSE_DIST_TIMEOUT="20")
        args = _train_args(tiny_llama_dir, reverse_task["train"], tmp_path / "a.safetensors", tmp_path / "h", 4,
                           100_000)
        procs.append(subprocess.Popen([specfuse, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: procs[0].stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while "train scale" not in "".join(err) and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # until rank 0 is in the training loop
        assert "train scale" in "".join(err), "".join(err)[-2000:]
        procs[1].send_signal(signal.SIGKILL)
        rc = procs[0].wait(timeout=60)  # not a hang: the collective fails, or times out after 20 s
        reader.join(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = "".join(err)
    lines = [line for line in text.splitlines() if "error:" in line]
    assert rc == 2 and len(lines) == 1 and "another rank died or stopped answering" in lines[0], text[-2000:]
    assert not (tmp_path / "a.safetensors").exists()
