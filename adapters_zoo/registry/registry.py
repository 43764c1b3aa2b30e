"""The adapter registry: named, versioned adapters and the bases they live in.

    home/catalog.db          SQL catalog (catalog.py): records, tags, declared bases
    home/blobs/ab/abcd…      adapter and basis files, content-addressed (store.py)
    home/tmp/                files being written

Adding is: parse and validate the bytes (format, kind, finite values, the basis they
must fit), write the blob (temp, fsync, rename), then one catalog transaction that
allocates the version and inserts the record. A writer killed at any point leaves at
worst an unreferenced blob or a temp file, which ``gc`` sweeps; nothing stored before is
touched. Loading re-hashes the blob and re-validates it against its basis.

The home is ``Registry(home)``, else ``$SPECFUSE_HOME``, else ``~/.specfuse``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from adapters_zoo.basis import Basis, load_basis, save_basis
from adapters_zoo.errors import (
    AdapterExists,
    AdapterFormatError,
    AdapterNotFound,
    BaseNotDeclared,
    IntegrityError,
    InvalidConfig,
    RegistryError,
)
from adapters_zoo.format import Adapter, adapter_from_bytes, adapter_to_bytes
from adapters_zoo.registry.catalog import AdapterRecord, Catalog, Tx, now_iso
from adapters_zoo.registry.names import close_matches, parse_ref, validate_name, validate_tag, validate_version
from adapters_zoo.registry.store import BlobStore, sha256_file

MAX_DESCRIPTION = 4096
MAX_TAGS = 32
MAX_METRICS_JSON = 64 * 1024


def default_home() -> Path:
    """``$SPECFUSE_HOME``, else ``~/.specfuse``."""
    env = os.environ.get("SPECFUSE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".specfuse"


def basis_command_hint(home: Path, k: int | str = "K") -> str:
    return f"specfuse basis MODEL_DIR --rank {k} --home {home}"


# --------------------------------------------------------------------------- input checks


def _check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        tags = [tags]
    out = tuple(sorted({validate_tag(t) for t in tags}))  # a set: stored and returned sorted
    if len(out) > MAX_TAGS:
        raise InvalidConfig(f"{len(out)} tags given, at most {MAX_TAGS}")
    return out


def _check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise InvalidConfig(f"metrics must be a JSON object with string keys, got {type(metrics).__name__}")
    try:
        text = json.dumps(dict(metrics), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise InvalidConfig(f"metrics must be plain JSON with finite numbers ({type(err).__name__})") from err
    if len(text) > MAX_METRICS_JSON:
        raise InvalidConfig(f"metrics are {len(text)} bytes of JSON, at most {MAX_METRICS_JSON}")
    return json.loads(text)


def _check_description(description: str) -> str:
    if not isinstance(description, str):
        raise InvalidConfig(f"description must be a string, got {type(description).__name__}")
    if len(description) > MAX_DESCRIPTION:
        raise InvalidConfig(f"description is {len(description)} characters long, at most {MAX_DESCRIPTION}")
    return description


def _source_bytes(source: Path | str | bytes | Adapter) -> tuple[bytes, str]:
    """(bytes, origin for messages) of what ``add`` was given."""
    if isinstance(source, Adapter):
        return adapter_to_bytes(source), "adapter"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "upload"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise AdapterFormatError(f"{path}: adapter file not found")
        return path.read_bytes(), str(path)
    raise InvalidConfig(f"add() takes a file path, bytes or an Adapter, got {type(source).__name__}")


# --------------------------------------------------------------------------- the registry


class Registry:
    def __init__(self, home: str | Path | None = None, *, catalog_url: str | None = None):
        self.home = (Path(home).expanduser() if home is not None else default_home()).absolute()
        if self.home.exists() and not self.home.is_dir():
            raise RegistryError(f"registry home {self.home} exists and is not a directory")
        self.store = BlobStore(self.home)
        self.catalog = Catalog(catalog_url or f"sqlite:///{(self.home / 'catalog.db').resolve()}")
        self._bases: dict[str, Basis] = {}  # fingerprint -> basis, loaded once

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    # ---------------------------------------------------------------- adapters

    def add(
        self,
        source: Path | str | bytes | Adapter,
        name: str,
        version: str | None = None,
        tags: Iterable[str] = (),
        metrics: dict[str, Any] | None = None,
        description: str = "",
    ) -> AdapterRecord:
        """Validate and store an adapter as ``name@version`` (version auto-incremented when None)."""
        validate_name(name)
        if version is not None:
            validate_version(version)
        tags, metrics, description = _check_tags(tags), _check_metrics(metrics), _check_description(description)
        data, origin = _source_bytes(source)
        adapter = adapter_from_bytes(data, origin=origin)  # format, kind, config, finite values
        basis = self._basis_for_new(adapter, origin)
        adapter.check_against(basis)  # fingerprint, k, layers, shapes
        adapter.check_bounds(basis)  # no layer changed past the bound its spectrum sets (DeltaOutOfBounds)
        sha, size = self.store.put_bytes(data)

        def insert(tx: Tx) -> AdapterRecord:
            if version is not None and tx.find(name, version) is not None:
                raise AdapterExists(f"{name}@{version} is already in the registry (remove it, or omit the version)")
            if not self.store.has(sha):  # a concurrent gc took it between put and this lock
                self.store.put_bytes(data)
            rec = AdapterRecord(
                name=name, version=version or tx.next_auto_version(name), kind=adapter.kind,
                base_fingerprint=adapter.base_fingerprint, basis_k=adapter.basis_k, sha256=sha, size=size,
                num_params=adapter.num_params(), tags=tags, metrics=metrics, description=description,
                created=now_iso(),
            )
            tx.insert(rec)
            return rec

        return self.catalog.write(insert)

    def _basis_for_new(self, adapter: Adapter, origin: str) -> Basis:
        try:
            return self.basis(adapter.base_fingerprint)
        except BaseNotDeclared:
            raise BaseNotDeclared(
                f"{origin}: the registry at {self.home} holds no basis for base {adapter.base_fingerprint} "
                f"(k={adapter.basis_k}); add it first with `{basis_command_hint(self.home, adapter.basis_k)}`"
            ) from None

    def list(self, kind: str | None = None, tag: str | None = None, base: str | None = None) -> list[AdapterRecord]:
        """Every version of every adapter, by name then age; filters combine with AND."""
        return self.catalog.read(lambda tx: tx.select(kind=kind, tag=tag, base=base))

    def get(self, ref: str) -> AdapterRecord:
        """``name`` (the version added last) or ``name@version``; AdapterNotFound lists close matches."""
        name, version = parse_ref(ref)

        def lookup(tx: Tx) -> AdapterRecord:
            rec = tx.latest(name) if version is None else tx.find(name, version)
            if rec is None:
                raise self._not_found(tx, name, version)
            return rec

        return self.catalog.read(lookup)

    def _not_found(self, tx: Tx, name: str, version: str | None) -> AdapterNotFound:
        versions = [r.version for r in tx.versions(name)]
        if versions:
            return AdapterNotFound(f"adapter {name!r} has no version {version!r} (versions: {', '.join(versions)})")
        names = tx.names()
        hint = close_matches(name, names)
        if hint:
            return AdapterNotFound(f"no adapter named {name!r} in the registry (did you mean: {', '.join(hint)}?)")
        return AdapterNotFound(f"no adapter named {name!r} in the registry ({len(names)} adapters registered)")

    def load(self, ref: str) -> Adapter:
        """The adapter, read from a hash-verified blob and validated against its basis."""
        return self.load_record(self.get(ref))

    def resolve(self, ref: str) -> tuple[AdapterRecord, Adapter]:
        rec = self.get(ref)
        return rec, self.load_record(rec)

    def load_record(self, rec: AdapterRecord) -> Adapter:
        """The adapter of a record ``get`` returned (its blob, not whatever the name means now)."""
        data = self.store.read_bytes(rec.sha256, what=rec.ref)
        if len(data) != rec.size:  # same hash, other size cannot happen; a catalog edited by hand can
            raise IntegrityError(f"{rec.ref}: blob is {len(data)} bytes, the catalog says {rec.size}")
        return adapter_from_bytes(data, self.basis(rec.base_fingerprint), origin=rec.ref)

    def remove(self, ref: str) -> list[AdapterRecord]:
        """Remove ``name@version``, or every version of ``name``; blobs stay until ``gc``."""
        name, version = parse_ref(ref)

        def delete(tx: Tx) -> list[AdapterRecord]:
            removed = tx.delete(name, version)
            if not removed:
                raise self._not_found(tx, name, version)
            return removed

        return self.catalog.write(delete)

    def compatible(self, basis_fingerprint: str) -> list[AdapterRecord]:
        """Every adapter version trained on the base with this fingerprint."""
        return self.list(base=basis_fingerprint)

    # ---------------------------------------------------------------- bases

    def add_basis(self, basis: Basis) -> str:
        """Declare a base by its basis; returns its fingerprint.

        The basis already held for a fingerprint wins when it has the same k (adapters were
        trained in it); callers should use ``registry.basis(fp)`` afterwards. A basis of
        another k replaces it only while no adapter uses the old one.
        """
        fp = basis.fingerprint
        if not isinstance(fp, str) or not fp or not all(c in "0123456789abcdef" for c in fp):
            raise AdapterFormatError(f"basis fingerprint {fp!r} is not a hex digest")
        held = self.catalog.read(lambda tx: tx.basis_row(fp))
        if held is not None and str(held["k"]) == str(basis.rank):
            return fp
        with self.store.temp_path(".safetensors") as tmp:
            save_basis(basis, tmp)
            sha, size = self.store.put_file(tmp)

        def declare(tx: Tx) -> None:
            row = tx.basis_row(fp)
            if row is not None and str(row["k"]) == str(basis.rank):
                return  # another process declared it meanwhile; theirs wins
            if row is not None and row["adapters"]:
                raise RegistryError(
                    f"base {fp} is declared with k={row['k']} and {row['adapters']} adapter version(s) use it; "
                    f"remove them before declaring k={basis.rank}"
                )
            if not self.store.has(sha):  # a concurrent gc took it
                with self.store.temp_path(".safetensors") as again:
                    save_basis(basis, again)
                    self.store.put_file(again)
            tx.put_basis(fp, basis.rank, basis.method, len(basis.layers), sha, size)

        self.catalog.write(declare)
        self._bases.pop(fp, None)
        return fp

    def basis(self, fingerprint: str) -> Basis:
        """The declared basis of a base (hash-verified once, then cached in memory).

        The cache lives as long as this Registry: a base re-declared with another k by
        another process (allowed only while no adapter uses it) is seen by new instances.
        """
        if fingerprint in self._bases:
            return self._bases[fingerprint]
        row = self.catalog.read(lambda tx: tx.basis_row(fingerprint))
        if row is None:
            raise BaseNotDeclared(
                f"the registry at {self.home} holds no basis for base {fingerprint}; "
                f"add it with `{basis_command_hint(self.home)}`"
            )
        basis = load_basis(self.store.verified_path(row["sha256"], what=f"basis {fingerprint}"))
        if basis.fingerprint != fingerprint or str(basis.rank) != str(row["k"]):
            raise IntegrityError(
                f"basis blob {row['sha256']} holds base {basis.fingerprint} k={basis.rank}, "
                f"the catalog says {fingerprint} k={row['k']}"
            )
        self._bases[fingerprint] = basis
        return basis

    def bases(self) -> list[dict[str, Any]]:
        """Declared bases: fingerprint, k, method, num_layers, sha256, size, created, adapters (count)."""
        return self.catalog.read(lambda tx: tx.bases())

    # ---------------------------------------------------------------- maintenance

    def verify(self) -> list[str]:
        """Re-hash every blob the catalog names; one line per problem (empty: all is well)."""
        records, bases = self.catalog.read(lambda tx: (tx.select(), tx.bases()))
        declared = {b["fingerprint"] for b in bases}
        problems = []
        for rec in records:
            problem = self._blob_problem(rec.sha256, rec.size)
            if problem and self._still_listed(rec):  # not removed (and collected) while we hashed
                problems.append(f"{rec.ref}: {problem}")
            if rec.base_fingerprint not in declared:
                problems.append(f"{rec.ref}: its base {rec.base_fingerprint} has no declared basis")
        for b in bases:
            problem = self._blob_problem(b["sha256"], b["size"])
            if problem:
                problems.append(f"basis {b['fingerprint']}: {problem}")
        return problems

    def _blob_problem(self, sha: str, size: int) -> str | None:
        path = self.store.path(sha)
        if not path.is_file():
            return f"blob {sha} is missing"
        actual, actual_size = sha256_file(path)
        if actual != sha:
            return f"blob {path} was altered (sha256 {actual}, expected {sha})"
        if actual_size != size:
            return f"blob {path} is {actual_size} bytes, the catalog says {size}"
        return None

    def _still_listed(self, rec: AdapterRecord) -> bool:
        now = self.catalog.read(lambda tx: tx.find(rec.name, rec.version))
        return now is not None and now.sha256 == rec.sha256

    def unreferenced(self) -> list[str]:
        """Blobs no record or basis names (left by removals or by writers that died)."""
        referenced = self.catalog.read(lambda tx: tx.adapter_shas() | tx.basis_shas())
        return [sha for sha in self.store if sha not in referenced]

    def gc(self) -> int:
        """Delete unreferenced blobs (and dead writers' temp files); returns how many blobs went."""

        def sweep(tx: Tx) -> int:
            # Under the write lock: an add that wrote its blob before we looked re-checks it
            # under this same lock before inserting its record, so nothing it needs is lost.
            referenced = tx.adapter_shas() | tx.basis_shas()
            doomed = [sha for sha in self.store if sha not in referenced]
            for sha in doomed:
                self.store.remove(sha)
            return len(doomed)

        removed = self.catalog.write(sweep)
        self.store.clean_temp()
        return removed
