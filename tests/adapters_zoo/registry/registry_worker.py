"""A separate process that uses a registry, for the crash and concurrency tests.

    python registry_worker.py add HOME FILE NAME N SALT [GO_FILE]   N adds (N < 0: forever), one ref per line
    python registry_worker.py read HOME NAME N [GO_FILE]             N rounds of list / get / load
    python registry_worker.py gc HOME N [GO_FILE]                    N rounds of gc + verify

Each prints READY once imported, then waits for GO_FILE (when given) so that workers
start together. Every add stores distinct bytes (one scale value is nudged by SALT and
the add's index), so each add writes a new blob. Errors go to stderr with exit 1.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from adapters_zoo.format import load_adapter  # noqa: E402
from adapters_zoo.registry import Registry  # noqa: E402


def _ready(go_file: str | None) -> None:
    print("READY", flush=True)
    while go_file and not os.path.exists(go_file):
        time.sleep(0.005)


def add(home: str, file: str, name: str, n: int, salt: int, go_file: str | None = None) -> None:
    adapter = load_adapter(file)
    layer = adapter.layers[0]
    base = next(iter(adapter.params[layer].values())).clone()
    reg = Registry(home)
    _ready(go_file)
    i = 0
    while n < 0 or i < n:
        tensor_name = next(iter(adapter.params[layer]))
        adapter.params[layer][tensor_name] = base + 1e-6 * (salt * 100_000 + i)  # distinct, within bounds
        rec = reg.add(adapter, name, metrics={"salt": salt, "i": i})
        print(rec.ref, flush=True)
        i += 1


def read(home: str, name: str, n: int, go_file: str | None = None) -> None:
    reg = Registry(home)
    _ready(go_file)
    for _ in range(n):
        records = reg.list()
        if records:
            rec, adapter = reg.resolve(name)
            assert adapter.kind == rec.kind and all(torch.isfinite(t).all() for p in adapter.params.values()
                                                   for t in p.values())
        print(len(records), flush=True)


def gc(home: str, n: int, go_file: str | None = None) -> None:
    reg = Registry(home)
    _ready(go_file)
    for _ in range(n):
        reg.gc()
        problems = reg.verify()
        if problems:
            raise AssertionError(f"verify during adds: {problems}")
        print("gc", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *rest = sys.argv[1:]
    try:
        if mode == "add":
            add(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), *rest[5:])
        elif mode == "read":
            read(rest[0], rest[1], int(rest[2]), *rest[3:])
        elif mode == "gc":
            gc(rest[0], int(rest[1]), *rest[2:])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    except Exception:
        traceback.print_exc()
        sys.exit(1)
