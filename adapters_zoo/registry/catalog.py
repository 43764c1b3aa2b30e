"""The registry's SQL catalog: adapter records, their tags, version counters, declared bases.

All SQL lives in this file, written once in a portable subset of SQL (DB-API cursors,
``?`` placeholders rewritten per dialect, ``INSERT … ON CONFLICT`` upserts that SQLite
and PostgreSQL share). What differs between databases is a small ``Dialect``: how to
connect, which statement takes the write lock, how a busy database is signalled, the
autoincrement column type. SQLite is the one implemented: WAL journal (readers never
wait for the writer), ``synchronous=FULL``, a busy timeout, ``BEGIN IMMEDIATE`` for every
write, and a retry loop around whole transactions, so "database is locked" never reaches
a user. A PostgreSQL dialect would add ``connect`` (psycopg), ``BEGIN`` + an advisory
lock for writes and its serialization-failure codes; no query changes.

Callers run a function inside one transaction: ``catalog.write(fn)`` / ``catalog.read(fn)``,
``fn(tx)`` with ``tx`` a ``Tx`` of named queries. The function may be run more than once
(a busy database is retried from the start), so it must be idempotent apart from ``tx``.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from adapters_zoo.errors import AdapterExists, InvalidConfig, RegistryError
from adapters_zoo.registry.names import format_ref

T = TypeVar("T")
SCHEMA_VERSION = "1"
BUSY_TIMEOUT_S = 60.0  # total time one transaction keeps retrying a busy database
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


@dataclass(frozen=True)
class AdapterRecord:
    """One catalog row: an adapter version and where its bytes are (``sha256``)."""

    name: str
    version: str
    kind: str
    base_fingerprint: str
    basis_k: int | str
    sha256: str
    size: int  # bytes of the safetensors blob
    num_params: int
    tags: tuple[str, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    created: str = ""  # ISO 8601, UTC

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.version)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps(record.to_json())``), with ``ref`` first."""
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "base_fingerprint": self.base_fingerprint,
            "basis_k": self.basis_k,
            "sha256": self.sha256,
            "size": self.size,
            "num_params": self.num_params,
            "tags": list(self.tags),
            "metrics": self.metrics,
            "description": self.description,
            "created": self.created,
        }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- dialects


@dataclass(frozen=True)
class Dialect:
    name: str
    module: ModuleType  # the DB-API module: its exception classes classify errors
    paramstyle: str  # "qmark" (?) or "format" (%s)
    autoid: str  # DDL of an autoincrement primary key
    begin_read: str
    begin_write: str  # takes the write lock up front: no lock upgrades, no deadlocks
    connect: Callable[[str], Any]
    is_busy: Callable[[BaseException], bool]

    def sql(self, query: str) -> str:
        return query if self.paramstyle == "qmark" else query.replace("?", "%s")


def _sqlite_path(url: str) -> str:
    # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path
    path = url[len("sqlite:///") :]
    if not path:
        raise InvalidConfig(f"catalog url {url!r} names no file (use sqlite:///PATH)")
    return path


def _sqlite_connect(url: str) -> sqlite3.Connection:
    path = _sqlite_path(url)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")  # a commit survives power loss, not only a killed process
    return conn


def _sqlite_is_busy(err: BaseException) -> bool:
    if not isinstance(err, sqlite3.OperationalError):
        return False
    code = getattr(err, "sqlite_errorcode", None)  # Python ≥ 3.11
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(err) or "busy" in str(err)  # Python 3.10 carries no code


SQLITE = Dialect(
    name="sqlite",
    module=sqlite3,
    paramstyle="qmark",
    autoid="INTEGER PRIMARY KEY AUTOINCREMENT",  # ids never reused, even after deletes
    begin_read="BEGIN",
    begin_write="BEGIN IMMEDIATE",
    connect=_sqlite_connect,
    is_busy=_sqlite_is_busy,
)
DIALECTS = {"sqlite": SQLITE}


def dialect_for(url: str) -> Dialect:
    scheme = url.partition(":")[0]
    if scheme not in DIALECTS or not url.startswith(f"{scheme}://"):
        raise InvalidConfig(
            f"catalog url {url!r} is not supported (supported: {', '.join(f'{s}:///PATH' for s in DIALECTS)})"
        )
    return DIALECTS[scheme]


# --------------------------------------------------------------------------- schema

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS adapters (
        id {autoid},
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        kind TEXT NOT NULL,
        base_fingerprint TEXT NOT NULL,
        basis_k TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        num_params BIGINT NOT NULL,
        metrics TEXT NOT NULL,
        description TEXT NOT NULL,
        created TEXT NOT NULL,
        UNIQUE (name, version)
    )""",
    "CREATE INDEX IF NOT EXISTS adapters_base ON adapters (base_fingerprint)",
    """CREATE TABLE IF NOT EXISTS adapter_tags (
        adapter_id BIGINT NOT NULL,
        tag TEXT NOT NULL,
        PRIMARY KEY (adapter_id, tag)
    )""",
    "CREATE INDEX IF NOT EXISTS adapter_tags_tag ON adapter_tags (tag)",
    """CREATE TABLE IF NOT EXISTS version_counters (
        name TEXT PRIMARY KEY,
        last_auto BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS bases (
        fingerprint TEXT PRIMARY KEY,
        k TEXT NOT NULL,
        method TEXT NOT NULL,
        num_layers INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        created TEXT NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS schema_info (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

_RECORD_COLUMNS = (
    "id, name, version, kind, base_fingerprint, basis_k, sha256, size, num_params, metrics, description, created"
)


def _basis_k(raw: str) -> int | str:
    return int(raw) if raw.isdigit() else raw


# --------------------------------------------------------------------------- queries


class Tx:
    """The catalog's queries, run on the cursor of one open transaction."""

    def __init__(self, cursor: Any, dialect: Dialect):
        self._cur = cursor
        self._dialect = dialect

    def _exec(self, query: str, params: tuple = ()) -> Any:
        self._cur.execute(self._dialect.sql(query), params)
        return self._cur

    def _records(self, where: str = "", params: tuple = ()) -> list[AdapterRecord]:
        rows = self._exec(f"SELECT {_RECORD_COLUMNS} FROM adapters {where} ORDER BY name, id", params).fetchall()
        tags: dict[int, list[str]] = {}
        ids = [r[0] for r in rows]
        for start in range(0, len(ids), 500):  # keeps IN (...) under every database's parameter limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for adapter_id, tag in self._exec(
                f"SELECT adapter_id, tag FROM adapter_tags WHERE adapter_id IN ({marks}) ORDER BY tag", tuple(chunk)
            ).fetchall():
                tags.setdefault(adapter_id, []).append(tag)
        return [
            AdapterRecord(
                name=r[1], version=r[2], kind=r[3], base_fingerprint=r[4], basis_k=_basis_k(r[5]), sha256=r[6],
                size=int(r[7]), num_params=int(r[8]), tags=tuple(tags.get(r[0], ())), metrics=json.loads(r[9]),
                description=r[10], created=r[11],
            )
            for r in rows
        ]

    # ---------------------------------------------------------------- adapters

    def find(self, name: str, version: str) -> AdapterRecord | None:
        found = self._records("WHERE name = ? AND version = ?", (name, version))
        return found[0] if found else None

    def latest(self, name: str) -> AdapterRecord | None:
        """The version added last (versions are free-form strings, so insertion order decides)."""
        row = self._exec("SELECT MAX(id) FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None or row[0] is None:
            return None
        return self._records("WHERE id = ?", (row[0],))[0]

    def versions(self, name: str) -> list[AdapterRecord]:
        return self._records("WHERE name = ?", (name,))

    def names(self) -> list[str]:
        return [r[0] for r in self._exec("SELECT DISTINCT name FROM adapters ORDER BY name").fetchall()]

    def select(self, kind: str | None = None, tag: str | None = None, base: str | None = None) -> list[AdapterRecord]:
        clauses, params = [], []
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        if base is not None:
            clauses.append("base_fingerprint = ?")
            params.append(base)
        if tag is not None:
            clauses.append("id IN (SELECT adapter_id FROM adapter_tags WHERE tag = ?)")
            params.append(tag)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return self._records(where, tuple(params))

    def next_auto_version(self, name: str) -> str:
        """One more than any number this name has had as a version: removed versions are never reused."""
        row = self._exec("SELECT last_auto FROM version_counters WHERE name = ?", (name,)).fetchone()
        last = int(row[0]) if row else 0
        for (version,) in self._exec("SELECT version FROM adapters WHERE name = ?", (name,)).fetchall():
            if version.isdigit():
                last = max(last, int(version))
        return str(last + 1)

    def insert(self, rec: AdapterRecord) -> None:
        try:
            self._exec(
                "INSERT INTO adapters (name, version, kind, base_fingerprint, basis_k, sha256, size, num_params, "
                "metrics, description, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.name, rec.version, rec.kind, rec.base_fingerprint, str(rec.basis_k), rec.sha256, rec.size,
                 rec.num_params, json.dumps(rec.metrics, sort_keys=True), rec.description, rec.created),
            )
        except self._dialect.module.IntegrityError as err:
            raise AdapterExists(f"{rec.ref} is already in the registry") from err
        (adapter_id,) = self._exec(
            "SELECT id FROM adapters WHERE name = ? AND version = ?", (rec.name, rec.version)
        ).fetchone()
        for tag in rec.tags:
            self._exec("INSERT INTO adapter_tags (adapter_id, tag) VALUES (?, ?)", (adapter_id, tag))
        if rec.version.isdigit():
            self._exec(
                "INSERT INTO version_counters (name, last_auto) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET last_auto = excluded.last_auto "
                "WHERE excluded.last_auto > version_counters.last_auto",
                (rec.name, int(rec.version)),
            )

    def delete(self, name: str, version: str | None = None) -> list[AdapterRecord]:
        doomed = self.versions(name) if version is None else [r for r in [self.find(name, version)] if r]
        for rec in doomed:
            (adapter_id,) = self._exec(
                "SELECT id FROM adapters WHERE name = ? AND version = ?", (rec.name, rec.version)
            ).fetchone()
            self._exec("DELETE FROM adapter_tags WHERE adapter_id = ?", (adapter_id,))
            self._exec("DELETE FROM adapters WHERE id = ?", (adapter_id,))
        return doomed

    def adapter_shas(self) -> set[str]:
        return {r[0] for r in self._exec("SELECT DISTINCT sha256 FROM adapters").fetchall()}

    # ---------------------------------------------------------------- bases

    def basis_row(self, fingerprint: str) -> dict[str, Any] | None:
        rows = self._bases("WHERE fingerprint = ?", (fingerprint,))
        return rows[0] if rows else None

    def bases(self) -> list[dict[str, Any]]:
        return self._bases()

    def _bases(self, where: str = "", params: tuple = ()) -> list[dict[str, Any]]:
        rows = self._exec(
            "SELECT b.fingerprint, b.k, b.method, b.num_layers, b.sha256, b.size, b.created, "
            f"(SELECT COUNT(*) FROM adapters a WHERE a.base_fingerprint = b.fingerprint) FROM bases b {where} "
            "ORDER BY b.created, b.fingerprint",
            params,
        ).fetchall()
        keys = ("fingerprint", "k", "method", "num_layers", "sha256", "size", "created", "adapters")
        return [
            dict(zip(keys, (r[0], _basis_k(r[1]), r[2], int(r[3]), r[4], int(r[5]), r[6], int(r[7])))) for r in rows
        ]

    def put_basis(self, fingerprint: str, k: int | str, method: str, num_layers: int, sha: str, size: int) -> None:
        self._exec(
            "INSERT INTO bases (fingerprint, k, method, num_layers, sha256, size, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET k = excluded.k, "
            "method = excluded.method, num_layers = excluded.num_layers, sha256 = excluded.sha256, "
            "size = excluded.size, created = excluded.created",
            (fingerprint, str(k), method, num_layers, sha, size, now_iso()),
        )

    def basis_shas(self) -> set[str]:
        return {r[0] for r in self._exec("SELECT sha256 FROM bases").fetchall()}


# --------------------------------------------------------------------------- the catalog


class Catalog:
    """A connection to the catalog database, with retried transactions (thread-safe, fork-aware)."""

    def __init__(self, url: str, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.url = url
        self.dialect = dialect_for(url)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()  # one connection, used by one thread at a time
        self._conn: Any = None
        self._pid = -1
        self.write(self._create_schema)

    def _create_schema(self, tx: Tx) -> None:
        for ddl in _SCHEMA:
            tx._exec(ddl.format(autoid=self.dialect.autoid))
        row = tx._exec("SELECT value FROM schema_info WHERE key = 'schema_version'").fetchone()
        if row is None:
            tx._exec("INSERT INTO schema_info (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise RegistryError(
                f"catalog {self.url} has schema version {row[0]}; this specfuse reads version {SCHEMA_VERSION}"
            )

    def _connection(self) -> Any:
        if self._conn is None or self._pid != os.getpid():  # a forked child opens its own
            self._conn = self.dialect.connect(self.url)
            self._pid = os.getpid()
        return self._conn

    def read(self, fn: Callable[[Tx], T]) -> T:
        return self._run(fn, write=False)

    def write(self, fn: Callable[[Tx], T]) -> T:
        return self._run(fn, write=True)

    def _run(self, fn: Callable[[Tx], T], write: bool) -> T:
        errors = self.dialect.module
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.002
        while True:
            try:
                with self._lock:
                    return self._once(fn, write)
            except errors.OperationalError as err:
                if not self.dialect.is_busy(err):
                    raise RegistryError(f"catalog {self.url}: {err}") from err
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"catalog {self.url} stayed busy for {self.busy_timeout_s:.0f} s (another process holds it)"
                    ) from err
                time.sleep(delay * (0.5 + random.random()))  # jitter: contending writers spread out
                delay = min(delay * 2, 0.25)
            except errors.DatabaseError as err:
                if isinstance(err, errors.IntegrityError):
                    raise
                raise RegistryError(f"catalog {self.url} is unreadable: {err}") from err

    def _once(self, fn: Callable[[Tx], T], write: bool) -> T:
        conn = self._connection()
        cur = conn.cursor()
        try:
            cur.execute(self.dialect.begin_write if write else self.dialect.begin_read)
            result = fn(Tx(cur, self.dialect))
            conn.commit()
            return result
        except BaseException:
            try:
                conn.rollback()
            except self.dialect.module.Error:
                self._conn = None  # a connection that cannot roll back is not reused
            raise
        finally:
            cur.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
