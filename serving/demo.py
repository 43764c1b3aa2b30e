"""The demo: the real base, its basis and the shipped task adapters in a registry, ready to serve.

    specfuse demo [--host 127.0.0.1 --port 8000]

1. ``specfuse base fetch smollm2-135m-instruct`` into the demo home (cached);
2. its basis, k = 32 (cached beside the model: ``basis.safetensors``), declared in the registry;
3. the demo adapters that ship with specfuse (``serving/demo_adapters/``: one ``scale``
   adapter per task of both chat suites, trained by ``specfuse zoo build`` on this base)
   registered under their task names. When this machine's converted base has another
   fingerprint than the one they were trained on (another transformers / gguf version can
   dequantize differently), the demo says so and trains them here instead (``zoo build``
   with the same settings, resumable);
4. the server, as ``specfuse serve`` would run it.

The demo home is ``$SPECFUSE_HOME``, else ``~/.specfuse-demo``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

DEMO_HOME = "~/.specfuse-demo"
DEMO_BASE = "smollm2-135m-instruct"
DEMO_RANK = 32  # basis k the shipped adapters were trained in
DEMO_KIND = "scale"
SHIPPED = Path(__file__).resolve().parent / "demo_adapters"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DemoAdapter:
    name: str  # the registry name: the task's name
    suite: str
    path: Path


def demo_home() -> Path:
    env = os.environ.get("SPECFUSE_HOME")
    return Path(env).expanduser() if env else Path(DEMO_HOME).expanduser()


def shipped_adapters(folder: Path = SHIPPED) -> tuple[str | None, list[DemoAdapter]]:
    """(the base fingerprint the shipped adapters were trained on, the adapters) from the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None, []
    adapters = [DemoAdapter(a["name"], a["suite"], folder / a["file"]) for a in manifest.get("adapters", [])]
    return manifest.get("base_fingerprint"), [a for a in adapters if a.path.is_file()]


def _say(message: str) -> None:
    print(f"specfuse demo: {message}", file=sys.stderr, flush=True)


def prepare_demo(home: Path, progress: bool = True, shipped: Path = SHIPPED) -> Path:
    """Fetch, basis, adapters into the registry at ``home``; returns the base model directory."""
    from adapters_zoo.bases import fetch_base
    from adapters_zoo.basis import compute_basis, load_basis, save_basis
    from adapters_zoo.registry import Registry

    base = fetch_base(DEMO_BASE, home, progress=progress)
    basis_path = base.path / "basis.safetensors"
    basis = load_basis(basis_path) if basis_path.is_file() else None
    if basis is None or basis.rank != DEMO_RANK or basis.fingerprint != base.fingerprint:
        _say(f"computing the basis of {DEMO_BASE} (k={DEMO_RANK}, about a minute on 2 cores)")
        basis = compute_basis(base.path, DEMO_RANK, progress=progress)
        save_basis(basis, basis_path)
    with Registry(home) as registry:
        registry.add_basis(basis)
        trained_on, adapters = shipped_adapters(shipped)
        if trained_on != base.fingerprint or not adapters:
            _say(f"the shipped adapters were trained on base fingerprint {trained_on}, this machine's {DEMO_BASE} "
                 f"is {base.fingerprint}: training the demo adapters here instead (resumable; about 4 minutes each "
                 "on 2 cores)")
            adapters = _train_here(home, progress)
        for adapter in adapters:
            _register(registry, adapter)
    _say(f"{len(adapters)} task adapters registered: {', '.join(a.name for a in adapters)}")
    return base.path


def _train_here(home: Path, progress: bool) -> list[DemoAdapter]:
    from adapters_zoo.zoo import ZooSettings, build_zoo

    settings = ZooSettings(out=home / "zoo", bases_home=home, kinds=(DEMO_KIND,), peft_lora=False, rank=DEMO_RANK)
    build_zoo(settings, home=home / "zoo" / "registry", progress=progress)
    return _zoo_adapters(settings.out)


def _zoo_adapters(zoo: Path) -> list[DemoAdapter]:
    """A zoo's adapters of the demo kind: ``adapters/{suite}/scale/{task}.safetensors``."""
    paths = sorted((zoo / "adapters").glob(f"*/{DEMO_KIND}/*.safetensors"))
    return [DemoAdapter(p.stem, p.parent.parent.name, p) for p in paths]


def _register(registry, adapter: DemoAdapter) -> None:
    from adapters_zoo.zoo import register_once

    register_once(registry, adapter.path, adapter.name, tags=("demo", adapter.suite, DEMO_KIND),
                  description=f"demo {DEMO_KIND} adapter for the {adapter.suite} task {adapter.name}")
