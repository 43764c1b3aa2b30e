"""The registry as the HTTP API shows it: models, adapter records, uploads, removal, offline fusion.

Every record shown or changed belongs to the served base (its fingerprint); an upload is
checked against the served basis before the registry stores it, and ``fuse`` resolves
its mixture once and stores the fused ``core`` adapter (:func:`fusion.mixture.fuse_mixture`).
Blocking (catalog and blob IO): run it in a worker thread.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from adapters_zoo.basis import Basis
from adapters_zoo.errors import AdapterNotFound, IncompatibleAdapter, PayloadTooLarge
from adapters_zoo.format import adapter_from_bytes
from adapters_zoo.registry import Registry
from fusion.mixture import fuse_mixture
from serving.config import Limits
from serving.preparation import BASE
from serving.routing import AUTO


class RegistryAdmin:
    def __init__(self, registry: Registry, basis: Basis, limits: Limits, model_name: str, started: int):
        self.registry = registry
        self.basis = basis
        self.fingerprint = basis.fingerprint
        self.limits = limits
        self.model_name = model_name
        self.started = started

    def models(self) -> list[dict[str, Any]]:
        """``base``, ``auto`` and every adapter of this base (latest version by name; all versions listed)."""
        out = [{"id": BASE, "object": "model", "created": self.started, "owned_by": "specfuse",
                "root": self.model_name, "parent": None},
               {"id": AUTO, "object": "model", "created": self.started, "owned_by": "specfuse",
                "root": self.model_name, "parent": BASE, "kind": "router"}]  # each prompt picks its adapters
        by_name: dict[str, list] = {}
        for rec in self.registry.compatible(self.fingerprint):
            by_name.setdefault(rec.name, []).append(rec)
        for name, recs in sorted(by_name.items()):
            out.append(self._model_entry(name, recs[-1], [r.version for r in recs]))  # listed oldest first
        return out

    def _model_entry(self, model_id: str, rec, versions: list[str]) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": _epoch(rec.created), "owned_by": "specfuse",
                "root": rec.ref, "parent": BASE, "kind": rec.kind, "tags": list(rec.tags), "versions": versions}

    def model(self, model_id: str) -> dict[str, Any]:
        """One entry of ``models``: ``base``, an adapter name or ``name@version`` (AdapterNotFound otherwise)."""
        if model_id in (BASE, self.model_name):
            return self.models()[0]
        if model_id == AUTO:
            return self.models()[1]
        rec = self.registry.get(model_id)
        if rec.base_fingerprint != self.fingerprint:
            raise AdapterNotFound(f"adapter {rec.ref} belongs to another base than the one served here")
        return self._model_entry(model_id, rec, [rec.version])

    def adapters(self, kind: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        return [rec.to_json() for rec in self.registry.list(kind=kind, tag=tag, base=self.fingerprint)]

    def adapter(self, ref: str) -> dict[str, Any]:
        return self.registry.get(ref).to_json()

    def upload(self, data: bytes, name: str, version: str | None, tags: list[str], description: str) -> dict:
        if len(data) > self.limits.max_upload_bytes:
            raise PayloadTooLarge(f"the upload is {len(data)} bytes, at most {self.limits.max_upload_bytes}")
        adapter = adapter_from_bytes(data, origin="upload")
        if adapter.base_fingerprint != self.fingerprint:
            raise IncompatibleAdapter(
                f"the upload belongs to base {adapter.base_fingerprint}, this server serves {self.fingerprint}"
            )
        adapter.check_against(self.basis)
        return self.registry.add(data, name, version=version, tags=tags, description=description).to_json()

    def remove(self, ref: str) -> list[dict[str, Any]]:
        self.registry.get(ref)  # AdapterNotFound before anything else
        return [rec.to_json() for rec in self.registry.remove(ref)]

    def fuse(self, mixture: str | dict[str, Any], method: str, params: dict[str, Any], project: bool, name: str,
             version: str | None, tags: list[str], description: str) -> dict[str, Any]:
        """Fuse a mixture offline into a new registry adapter (a ``core`` adapter)."""
        fused, _, _ = fuse_mixture(self.registry, mixture, method, params, project, fingerprint=self.fingerprint,
                                   max_entries=self.limits.max_mixture)
        fused.meta["name"] = name
        return self.registry.add(fused, name, version=version, tags=tags, description=description).to_json()


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
