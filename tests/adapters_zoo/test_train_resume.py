"""Resumable runs: a run killed with SIGKILL and resumed ends with the adapter of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapters_zoo.format import load_adapter
from adapters_zoo.loop import Batches
from adapters_zoo.train_resume import save_checkpoint
from serving.cli import main


def _specfuse() -> str:
    beside = Path(sys.executable).with_name("specfuse")
    if not beside.is_file():
        pytest.skip("the specfuse console script is not installed beside the interpreter")
    return str(beside)


def _args(model_dir, data, out, home, *extra) -> list[str]:
    return ["train", str(model_dir), "--kind", "scale", "--rank", "8", "--data", str(data), "--steps", "150",
            "--batch-size", "8", "--lr", "0.05", "--out", str(out), "--home", str(home), *extra]


def test_a_killed_run_resumed_ends_as_the_uninterrupted_run(tiny_llama_dir, reverse_task, tmp_path):
    specfuse, data, env = _specfuse(), reverse_task["train"], {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole.safetensors"
    subprocess.run([specfuse, *_args(tiny_llama_dir, data, whole, tmp_path / "h1", "--save-every", "10")], env=env,
                   check=True, capture_output=True, timeout=300)
    assert not whole.with_name("whole.ckpt").exists()  # removed when the run completed

    out = tmp_path / "cut.safetensors"
    ckpt = out.with_name("cut.ckpt")
    proc = subprocess.Popen([specfuse, *_args(tiny_llama_dir, data, out, tmp_path / "h2", "--save-every", "10")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists(), "killed before its first checkpoint or after it finished"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 150

    drawn = []  # batches the resumed run draws: the steps it still had to do, not a restart
    next_batch = Batches.next
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Batches, "next", lambda self: drawn.append(1) or next_batch(self))
        assert main(_args(tiny_llama_dir, data, out, tmp_path / "h2", "--save-every", "10", "--resume")) == 0
    assert len(drawn) == 150 - step
    a, b = load_adapter(whole), load_adapter(out)
    assert max(float((a.params[layer][n] - b.params[layer][n]).abs().max())
               for layer in a.layers for n in a.params[layer]) <= 1e-6
    assert a.meta["train"]["stats"]["final_loss"] == pytest.approx(b.meta["train"]["stats"]["final_loss"], abs=1e-6)


def test_resume_refuses_a_checkpoint_of_another_world_size_or_settings(tiny_llama_dir, reverse_task, tmp_path,
                                                                      capsys):
    from adapters_zoo.train import _resume_settings
    from adapters_zoo.train_config import TrainConfig

    out = tmp_path / "a.safetensors"
    args = _args(tiny_llama_dir, reverse_task["train"], out, tmp_path / "h", "--resume")
    assert main(args) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    cfg = TrainConfig(kind="scale", kind_config={"rank": 8}, steps=150, batch_size=8, lr=0.05)
    save_checkpoint(out.with_name("a.ckpt"), {"step": 5, "ranks": 2, "settings": _resume_settings(cfg)})
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "written by a run of 2 processes; this one has 1" in err[0]
