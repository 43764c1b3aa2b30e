"""Crash safety and concurrency with real processes: kill -9 mid-add, many writers, readers and gc at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from adapters_zoo.registry import Registry

WORKER = Path(__file__).with_name("registry_worker.py")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise AssertionError(f"worker did not start: {line!r} {proc.stderr.read()}")


def _check_consistent(home: Path, must_hold: list[str]) -> list[str]:
    """verify() is clean, every ref in ``must_hold`` loads, versions are unique; returns all refs."""
    with Registry(home) as reg:
        assert reg.verify() == []
        refs = [r.ref for r in reg.list()]
        assert len(refs) == len(set(refs))
        missing = sorted(set(must_hold) - set(refs))
        assert not missing, f"lost after a crash: {missing}"
        for ref in must_hold:
            assert reg.load(ref).layers
        return refs


def test_a_writer_killed_at_any_point_loses_nothing_and_leaves_the_store_consistent(registry, adapter_files):
    registry.add(adapter_files["math"], "math", tags=["before"])
    committed = ["math@1"]  # refs known to be stored (a writer prints a ref once add returned)
    for round_, delay in enumerate([0.004, 0.012, 0.03, 0.07, 0.15]):
        proc = _start("add", registry.home, adapter_files["code"], "code", -1, round_)
        _wait_ready(proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err
        committed += out.split()
        refs = _check_consistent(registry.home, committed)
    code_versions = sorted(int(r.split("@")[1]) for r in refs if r.startswith("code@"))
    assert code_versions == list(range(1, len(code_versions) + 1))  # a killed add allocates no version
    assert len(code_versions) >= 1, "no add finished in any round: the kill test exercised nothing"

    registry.gc()  # blobs of adds killed before their commit, temp files of dead writers
    assert registry.unreferenced() == [] and registry.store.temp_files() == []
    assert _check_consistent(registry.home, committed) == refs


def test_concurrent_writers_readers_and_gc_lose_and_duplicate_no_version(registry, adapter_files, tmp_path):
    go = tmp_path / "go"
    writers = [_start("add", registry.home, adapter_files["code"], "shared", 10, w, go) for w in range(4)]
    readers = [_start("read", registry.home, "shared", 25, go) for _ in range(2)]
    collector = _start("gc", registry.home, 8, go)
    everyone = [*writers, *readers, collector]
    for proc in everyone:
        _wait_ready(proc)
    go.touch()  # all start together
    results = [proc.communicate(timeout=300) for proc in everyone]
    for proc, (_, err) in zip(everyone, results):
        assert proc.returncode == 0, err
        assert "locked" not in err and "busy" not in err
    written = [ref for out, _ in results[:4] for ref in out.split()]
    assert len(written) == 40 and len(set(written)) == 40  # every add got its own version

    with Registry(registry.home) as reg:
        records = reg.list()
        assert sorted(r.ref for r in records) == sorted(written)
        assert sorted(int(r.version) for r in records) == list(range(1, 41))
        assert sorted((r.metrics["salt"], r.metrics["i"]) for r in records) == [(w, i) for w in range(4)
                                                                             for i in range(10)]
        assert reg.verify() == []
        for rec in records:  # each version holds the bytes its writer stored
            adapter = reg.load(rec.ref)
            assert adapter.kind == "svft"


def test_threads_sharing_one_registry(registry, adapter_files):
    errors: list[BaseException] = []

    def add_five() -> None:
        try:
            for _ in range(5):
                registry.add(adapter_files["math"], "threaded")
                registry.list()
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=add_five) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(int(r.version) for r in registry.list()) == list(range(1, 21))
