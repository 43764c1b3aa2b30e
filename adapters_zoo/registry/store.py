"""Content-addressed blob store: every file is named by the sha256 of its bytes.

    home/blobs/ab/abcdef…64 hex    a blob (read-only); the first two hex digits shard the dir
    home/tmp/PID-HOST-TOKEN…        files being written, one set per writer process

A blob is written to a temp file, fsynced, renamed into place, and its directory
fsynced: a blob path either does not exist or holds complete bytes, whenever the
writer dies. Reads re-hash. Only hex digests reach this module, never user names.
Temp files of writers that died (their PID is gone on this host) are swept by
``clean_temp``; the catalog decides which blobs are garbage (``Registry.gc``).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters_zoo.errors import IntegrityError, RegistryError

SHA_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
FOREIGN_TEMP_MAX_AGE_S = 24 * 3600  # temp files of another host: no PID to check, go by age
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex digest, size) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class BlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RegistryError(f"cannot create the registry store under {self.root}: {err}") from err

    # ---------------------------------------------------------------- addressing

    def path(self, sha: str) -> Path:
        if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
            raise IntegrityError(f"{sha!r} is not a sha256 hex digest")
        return self.blob_dir / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def intact(self, sha: str) -> bool:
        """The blob exists and its bytes still hash to its name."""
        path = self.path(sha)
        try:
            return sha256_file(path)[0] == sha
        except FileNotFoundError:
            return False

    def __iter__(self) -> Iterator[str]:
        """Digests of every blob on disk (files that are not named like blobs are skipped)."""
        for shard in sorted(self.blob_dir.iterdir()):
            if not shard.is_dir():
                continue
            for f in sorted(shard.iterdir()):
                if SHA_RE.fullmatch(f.name) and f.name[:2] == shard.name:
                    yield f.name

    # ---------------------------------------------------------------- writing

    @contextmanager
    def temp_path(self, suffix: str = ".part") -> Iterator[Path]:
        """A fresh path under tmp/ named after this process; removed on exit if still there."""
        path = self.tmp_dir / f"{os.getpid()}-{HOST_TAG}-{secrets.token_hex(8)}{suffix}"
        try:
            yield path
        finally:
            for leftover in self.tmp_dir.glob(path.name + "*"):  # also a writer's own ".tmp" sibling
                leftover.unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        """Store ``data`` (idempotent; a corrupt copy already there is replaced) -> (sha256, size)."""
        sha = sha256_bytes(data)
        if self.intact(sha):
            return sha, len(data)
        with self.temp_path() as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._install(tmp, sha)
        return sha, len(data)

    def put_file(self, src: Path) -> tuple[str, int]:
        """Move a finished file from tmp/ into the store (fsynced first) -> (sha256, size)."""
        sha, size = sha256_file(src)
        if self.intact(sha):
            src.unlink()
            return sha, size
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        self._install(src, sha)
        return sha, size

    def _install(self, tmp: Path, sha: str) -> None:
        final = self.path(sha)
        final.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o444)  # a guard against accidental edits, not a security boundary
        os.replace(tmp, final)  # atomic: readers see the old state or the whole blob
        _fsync_dir(final.parent)

    def remove(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    # ---------------------------------------------------------------- reading

    def read_bytes(self, sha: str, what: str = "blob") -> bytes:
        """The blob's bytes, verified against its digest (IntegrityError on mismatch or absence)."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{what}: blob {sha} is missing from {self.blob_dir}") from None
        actual = sha256_bytes(data)
        if actual != sha:
            raise IntegrityError(f"{what}: blob {path} was altered on disk (sha256 is now {actual}, expected {sha})")
        return data

    def verified_path(self, sha: str, what: str = "blob") -> Path:
        """The blob's path after re-hashing its file (for readers that open paths, e.g. safetensors)."""
        path = self.path(sha)
        try:
            actual, _ = sha256_file(path)
        except FileNotFoundError:
            raise IntegrityError(f"{what}: blob {sha} is missing from {self.blob_dir}") from None
        if actual != sha:
            raise IntegrityError(f"{what}: blob {path} was altered on disk (sha256 is now {actual}, expected {sha})")
        return path

    # ---------------------------------------------------------------- cleaning

    def clean_temp(self) -> int:
        """Remove temp files left by writers that died; returns how many were removed."""
        removed = 0
        now = time.time()
        for f in self.tmp_dir.iterdir():
            pid, _, rest = f.name.partition("-")
            host, _, _ = rest.partition("-")
            try:
                if pid.isdigit() and host == HOST_TAG:
                    stale = not _pid_alive(int(pid))
                else:
                    stale = now - f.stat().st_mtime > FOREIGN_TEMP_MAX_AGE_S
                if stale:
                    f.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer finished meanwhile
                continue
        return removed

    def temp_files(self) -> list[Path]:
        return sorted(self.tmp_dir.iterdir())
