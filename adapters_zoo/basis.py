"""The spectral basis of a base model: top-k (or full) thin SVD of every target layer.

    W = U Σ Vᵀ,   keep U_k (out, k), σ_k (k,), V_k (in, k)

Every adapter changes ``W`` only as ``U_k C V_kᵀ`` (+ an optional low-rank residual), so
the basis is computed once per base model and shared by every adapter, fusion and the
server. The basis file is safetensors with ``{layer}.U``, ``{layer}.S``, ``{layer}.V`` and
metadata: format version, base fingerprint, k, per-layer shapes, SVD method and the
fraction of spectral energy ``Σ σ_k² / ‖W‖_F²`` kept per layer.

The fingerprint hashes the target weights (as float32, (out, in)) and their names, so it
is the same whether computed from files or from a model in memory, whatever the dtype
the checkpoint was stored in (bf16/fp16 convert to float32 exactly).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes
from tqdm.auto import tqdm

from adapters_zoo.checkpoint import Checkpoint, LayerSpec, linear_layers
from adapters_zoo.errors import AdapterFormatError, BasisMismatch, InvalidConfig
from adapters_zoo.files import canonical_safetensors, write_atomic

BASIS_FORMAT = "specfuse-basis"
BASIS_FORMAT_VERSION = "1"
EXACT_SVD_MAX_DIM = 4096  # above this (and for k << min dim) the randomized SVD is used


@dataclass
class LayerBasis:
    U: torch.Tensor  # (out, k)
    S: torch.Tensor  # (k,)
    V: torch.Tensor  # (in, k)

    @property
    def k(self) -> int:
        return self.S.shape[0]

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def in_features(self) -> int:
        return self.V.shape[0]

    def to(self, device=None, dtype=None) -> LayerBasis:
        return LayerBasis(*(t.to(device=device, dtype=dtype) for t in (self.U, self.S, self.V)))


@dataclass
class Basis:
    layers: dict[str, LayerBasis]
    fingerprint: str
    rank: int | str  # the requested k, or "full"
    method: str = "exact"
    energy: dict[str, float] = field(default_factory=dict)
    transposed: dict[str, bool] = field(default_factory=dict)  # GPT-2 Conv1D layers

    def __getitem__(self, layer: str) -> LayerBasis:
        try:
            return self.layers[layer]
        except KeyError:
            raise BasisMismatch(f"layer {layer!r} is not in the basis ({len(self.layers)} layers)") from None

    def layer_names(self) -> list[str]:
        return list(self.layers)

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """layer -> (out, in, k)."""
        return {n: (lb.out_features, lb.in_features, lb.k) for n, lb in self.layers.items()}

    def to(self, device=None, dtype=None) -> Basis:
        return Basis(
            {n: lb.to(device, dtype) for n, lb in self.layers.items()},
            self.fingerprint, self.rank, self.method, dict(self.energy), dict(self.transposed),
        )


def parse_rank(rank: int | str) -> int | str:
    if isinstance(rank, str):
        if rank == "full":
            return rank
        if not rank.isdigit():
            raise InvalidConfig(f"rank must be a positive integer or 'full', got {rank!r}")
        rank = int(rank)
    if rank < 1:
        raise InvalidConfig(f"rank must be ≥ 1, got {rank}")
    return rank


# --------------------------------------------------------------------------- fingerprint


class Fingerprinter:
    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, name: str, w: torch.Tensor) -> None:  # w: float32 (out, in)
        self._h.update(f"{name}:{tuple(w.shape)}\n".encode())
        self._h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:32]


def fingerprint_weights(weights: dict[str, torch.Tensor]) -> str:
    """Fingerprint of named (out, in) weights, in the given order."""
    fp = Fingerprinter()
    for name, w in weights.items():
        fp.add(name, w)
    return fp.hexdigest()


def model_weights(model: torch.nn.Module, specs: list[LayerSpec]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    out = {}
    for spec in specs:
        w = modules[spec.name].weight.detach()
        out[spec.name] = (w.t() if spec.transposed else w).to(torch.float32)
    return out


def fingerprint_model(model: torch.nn.Module, layers: list[str] | None = None, targets=None) -> str:
    """Fingerprint of an in-memory model's target layers (``layers`` in basis order)."""
    specs = linear_layers(model, targets)
    if layers is not None:
        by_name = {s.name: s for s in specs}
        missing = [n for n in layers if n not in by_name]
        if missing:
            raise BasisMismatch(f"model has no layer {missing[0]!r} that the basis names")
        specs = [by_name[n] for n in layers]
    return fingerprint_weights(model_weights(model, specs))


def model_dir_fingerprint(ckpt: Checkpoint, layers: list[str]) -> str:
    """The fingerprint of a model directory's weights on ``layers`` (streamed, as compute_basis does)."""
    specs = {s.name: s for s in ckpt.linear_layers(layers)}
    missing = [name for name in layers if name not in specs]
    if missing:
        raise BasisMismatch(f"{ckpt.dir}: the model has no layer {missing[0]!r} that the basis names")
    fp = Fingerprinter()
    for name in layers:
        fp.add(name, ckpt.weight(specs[name]))
    return fp.hexdigest()


# --------------------------------------------------------------------------- SVD


def _normalize_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # SVD signs are arbitrary; fix them (largest |U| entry of each column positive) so
    # the basis is reproducible across devices and SVD drivers.
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, V * signs


def svd_layer(w: torch.Tensor, rank: int | str, method: str = "auto") -> tuple[LayerBasis, float, str]:
    """Top-``rank`` SVD of one (out, in) matrix -> (basis, energy kept, method used)."""
    min_dim = min(w.shape)
    k = min_dim if rank == "full" else min(int(rank), min_dim)
    if method not in ("auto", "exact", "randomized"):
        raise InvalidConfig(f"svd method must be auto, exact or randomized, got {method!r}")
    if method == "auto":
        method = "randomized" if (min_dim > EXACT_SVD_MAX_DIM and k * 4 < min_dim) else "exact"
    w64 = w.to(torch.float64) if w.device.type == "cpu" else w.to(torch.float32)
    if method == "exact":
        U, S, Vh = torch.linalg.svd(w64, full_matrices=False)
        U, S, V = U[:, :k], S[:k], Vh[:k].T
    else:
        U, S, V = torch.svd_lowrank(w64, q=min(k + 16, min_dim), niter=6)
        U, S, V = U[:, :k], S[:k], V[:, :k]
    total = float(w64.pow(2).sum())
    energy = float(S.pow(2).sum()) / total if total > 0 else 1.0
    U, V = _normalize_signs(U, V)
    lb = LayerBasis(U.float().cpu().contiguous(), S.float().cpu().contiguous(), V.float().cpu().contiguous())
    return lb, energy, method


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_basis(
    model_dir: str | Path,
    rank: int | str,
    targets: str | list[str] | None = None,
    *,
    method: str = "auto",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Basis:
    """Basis of a model directory, streaming one weight at a time from its shards."""
    rank = parse_rank(rank)
    ckpt = Checkpoint(model_dir)
    specs = ckpt.linear_layers(targets)
    device = torch.device(device) if device is not None else default_device()
    fp = Fingerprinter()
    layers, energy, methods = {}, {}, set()
    for spec in tqdm(specs, desc="basis (SVD)", unit="layer", disable=not progress):
        w = ckpt.weight(spec)  # (out, in) float32, the only full matrix held
        fp.add(spec.name, w)
        layers[spec.name], energy[spec.name], used = svd_layer(w.to(device), rank, method)
        methods.add(used)
        del w
    transposed = {s.name: s.transposed for s in specs}
    return Basis(layers, fp.hexdigest(), rank, "+".join(sorted(methods)), energy, transposed)


def basis_from_model(
    model: torch.nn.Module, rank: int | str, targets=None, *, method: str = "auto"
) -> Basis:
    """Basis of an in-memory model (tests, training right after loading)."""
    rank = parse_rank(rank)
    specs = linear_layers(model, targets)
    weights = model_weights(model, specs)
    layers, energy, methods = {}, {}, set()
    for name, w in weights.items():
        layers[name], energy[name], used = svd_layer(w, rank, method)
        methods.add(used)
    transposed = {s.name: s.transposed for s in specs}
    return Basis(layers, fingerprint_weights(weights), rank, "+".join(sorted(methods)), energy, transposed)


# --------------------------------------------------------------------------- file IO


def save_basis(basis: Basis, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, lb in basis.layers.items():
        tensors[f"{name}.U"] = lb.U.contiguous()
        tensors[f"{name}.S"] = lb.S.contiguous()
        tensors[f"{name}.V"] = lb.V.contiguous()
    meta = {
        "format": BASIS_FORMAT,
        "format_version": BASIS_FORMAT_VERSION,
        "fingerprint": basis.fingerprint,
        "k": str(basis.rank),
        "method": basis.method,
        "layers": json.dumps(list(basis.layers)),
        "shapes": json.dumps({n: list(s) for n, s in basis.shapes().items()}),
        "energy": json.dumps(basis.energy),
        "transposed": json.dumps(basis.transposed),
    }
    return write_atomic(path, canonical_safetensors(save_bytes(tensors, metadata=meta)))


def load_basis(path: str | Path) -> Basis:
    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"{path}: basis file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != BASIS_FORMAT:
                raise AdapterFormatError(f"{path}: not a specfuse basis file")
            if meta.get("format_version") != BASIS_FORMAT_VERSION:
                raise AdapterFormatError(
                    f"{path}: basis format version {meta.get('format_version')!r} is not supported"
                )
            names = json.loads(meta["layers"])
            shapes = json.loads(meta["shapes"])
            layers = {}
            for name in names:
                U, S, V = (f.get_tensor(f"{name}.{p}") for p in ("U", "S", "V"))
                out_f, in_f, k = shapes[name]
                if U.shape != (out_f, k) or S.shape != (k,) or V.shape != (in_f, k):
                    raise AdapterFormatError(f"{path}: layer {name} has inconsistent U/S/V shapes")
                if not all(torch.isfinite(t).all() for t in (U, S, V)):
                    raise AdapterFormatError(f"{path}: layer {name} has non-finite values")
                layers[name] = LayerBasis(U, S, V)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError) as err:
        if isinstance(err, AdapterFormatError):
            raise
        raise AdapterFormatError(f"{path}: unreadable basis file ({type(err).__name__}: {err})") from err
    return Basis(
        layers,
        meta["fingerprint"],
        parse_rank(meta["k"]),
        meta.get("method", "exact"),
        json.loads(meta.get("energy", "{}")),
        json.loads(meta.get("transposed", "{}")),
    )


def check_basis_matches_model(basis: Basis, model: torch.nn.Module) -> None:
    """Raise BasisMismatch unless ``model``'s target weights hash to the basis fingerprint."""
    fp = fingerprint_model(model, basis.layer_names())
    if fp != basis.fingerprint:
        raise BasisMismatch(
            f"basis fingerprint {basis.fingerprint} does not match the model's weights ({fp}): "
            "the basis was computed for another base model"
        )
