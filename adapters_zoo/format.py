"""The adapter: its in-memory form and its safetensors file.

File layout: one tensor per (layer, parameter), keyed ``{layer}.{param}`` (parameter
names never contain a dot), and string metadata:

    format            "specfuse-adapter"
    format_version    "1"
    kind              scale | svft | rotation | additive | lora | core
    config            the kind's config, JSON
    base_fingerprint  fingerprint of the base weights the basis was computed from
    basis_k           the basis rank (an integer, or "full")
    target_layers     JSON list of layer names
    meta              JSON object: name, provenance, metrics (free-form)

Loading validates all of it (and, given the basis, every shape and the fingerprint) and
raises typed errors that name what is wrong; a truncated, corrupt or foreign file never
surfaces as a traceback from inside torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from adapters_zoo import jsonsafe
from adapters_zoo.basis import Basis, LayerBasis, parse_rank
from adapters_zoo.errors import AdapterFormatError, DeltaOutOfBounds, IncompatibleAdapter, InvalidConfig
from adapters_zoo.files import canonical_safetensors, write_atomic
from adapters_zoo.kinds import get_kind
from adapters_zoo.kinds.base import Kind, config_to_dict

ADAPTER_FORMAT = "specfuse-adapter"
ADAPTER_FORMAT_VERSION = "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32)
MAX_CONFIG_INT = 10**9  # every integer of a kind config (rank, slice ends, d, seed) lies in [0, 10⁹]
MAX_METADATA_DEPTH = 8  # config and meta are flat objects; 8 leaves room for provenance records
# An adapter may change a layer by at most this many times the spectral energy the basis
# keeps of it: ‖ΔW‖_F ≤ MAX_DELTA_RATIO · ‖σ_k‖₂ (‖σ_k‖₂ = ‖W‖_F when k is full). Trained
# adapters sit below 1 (the demo zoo's largest is well under it); a change 100 times the
# layer itself no longer adapts the layer, it replaces it, and compounded over the layers
# it overflows half precision: the "make the numbers blow up" mixtures (1e20) are far past.
MAX_DELTA_RATIO = 100.0


@dataclass
class Adapter:
    kind: str
    config: dict[str, Any]
    base_fingerprint: str
    basis_k: int | str
    params: dict[str, dict[str, torch.Tensor]]  # layer -> param name -> tensor
    meta: dict[str, Any] = field(default_factory=dict)
    _fits: set[tuple] = field(default_factory=set, init=False, repr=False, compare=False)  # see check_against

    @cached_property
    def kind_impl(self) -> Kind:
        return get_kind(self.kind)

    @cached_property
    def cfg(self) -> Any:
        return self.kind_impl.config(self.config)

    @property
    def layers(self) -> list[str]:
        return list(self.params)

    def core(self, layer: str, basis: Basis) -> torch.Tensor | None:
        """C (k, k) of this layer, or None when the adapter has no part in the basis."""
        return self.kind_impl.core(self.params[layer], basis[layer], self.cfg)

    def residual(self, layer: str, basis: Basis) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B (out, q), A (q, in)) of this layer, or None."""
        return self.kind_impl.residual(self.params[layer], basis[layer], self.cfg)

    def delta(self, layer: str, basis: Basis) -> torch.Tensor:
        """The dense ΔW (out, in) = U_k C V_kᵀ + B A. For tests and dense merges only."""
        lb = basis[layer]
        dw = torch.zeros(lb.out_features, lb.in_features, dtype=lb.U.dtype, device=lb.U.device)
        core = self.core(layer, basis)
        if core is not None:
            dw = dw + lb.U @ core.to(lb.U) @ lb.V.T
        res = self.residual(layer, basis)
        if res is not None:
            dw = dw + res[0].to(lb.U) @ res[1].to(lb.U)
        return dw

    def num_params(self) -> int:
        """Trainable parameter count (frozen tensors such as sparse indices excluded)."""
        frozen = self.kind_impl.frozen
        return sum(t.numel() for p in self.params.values() for n, t in p.items() if n not in frozen)

    def check_bounds(self, basis: Basis, max_ratio: float = MAX_DELTA_RATIO) -> None:
        """Raise DeltaOutOfBounds unless every layer's change is within the bound (see MAX_DELTA_RATIO)."""
        for layer in self.params:
            check_delta(layer, self.core(layer, basis), self.residual(layer, basis), basis[layer], max_ratio)

    def check_against(self, basis: Basis) -> None:
        """Raise IncompatibleAdapter / AdapterFormatError unless this adapter fits ``basis``; an adapter
        that fits a basis is trusted after for every basis of the same base, k and layers."""
        fits = (basis.fingerprint, str(basis.rank), tuple(basis.layers))
        if fits in self._fits:
            return
        if self.base_fingerprint != basis.fingerprint:
            raise IncompatibleAdapter(
                f"adapter was trained on base {self.base_fingerprint}, but this basis is of base {basis.fingerprint}"
            )
        if str(self.basis_k) != str(basis.rank):
            raise IncompatibleAdapter(f"adapter expects a basis of k={self.basis_k}, this basis has k={basis.rank}")
        unknown = [n for n in self.params if n not in basis.layers]
        if unknown:
            raise IncompatibleAdapter(f"adapter layer {unknown[0]!r} is not in the basis")
        for layer, params in self.params.items():
            try:
                self.kind_impl.check_params(params, basis[layer], self.cfg, layer)
            except InvalidConfig as err:
                raise AdapterFormatError(f"layer {layer}: {err}") from err
        self._fits.add(fits)


def delta_norm(core: torch.Tensor | None, residual: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """An upper bound of ‖U_k C V_kᵀ + B A‖_F: ‖C‖_F + ‖B A‖_F (U_k, V_k orthonormal), no out×in matrix."""
    norm = 0.0
    if core is not None:
        norm += float(torch.linalg.vector_norm(core.double()))
    if residual is not None:
        B, A = residual[0].double(), residual[1].double()  # (out, q), (q, in)
        norm += float(torch.trace((B.T @ B) @ (A @ A.T)).clamp(min=0).sqrt())  # ‖BA‖_F² = tr(BᵀB AAᵀ)
    return norm


def check_delta(layer: str, core: torch.Tensor | None, residual: tuple[torch.Tensor, torch.Tensor] | None,
                lb: LayerBasis, max_ratio: float = MAX_DELTA_RATIO) -> None:
    """Raise DeltaOutOfBounds when a layer's change is past ``max_ratio`` · ‖σ_k‖₂ (or not finite)."""
    norm = delta_norm(core, residual)
    bound = max_ratio * float(torch.linalg.vector_norm(lb.S.double()))
    if not norm <= bound:  # NaN fails this too
        raise DeltaOutOfBounds(
            f"layer {layer}: the change has Frobenius norm {norm:.4g}, past the bound {bound:.4g} = "
            f"{max_ratio:g} × the norm of the base's kept singular values (max delta ratio)"
        )


def _meta_strings(adapter: Adapter) -> dict[str, str]:
    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "kind": adapter.kind,
        "config": json.dumps(adapter.config, sort_keys=True),
        "base_fingerprint": adapter.base_fingerprint,
        "basis_k": str(adapter.basis_k),
        "target_layers": json.dumps(adapter.layers),
        "meta": json.dumps(adapter.meta, sort_keys=True, default=str),
    }


def _stored(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    # Index tensors (svft's sparse positions) are at most k ≤ 2³¹: int32 halves them on disk.
    return t.to(torch.int32) if t.dtype == torch.int64 else t


def _flat_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {
        f"{layer}.{name}": _stored(t) for layer, params in adapter.params.items() for name, t in params.items()
    }


def adapter_to_bytes(adapter: Adapter) -> bytes:
    """The adapter file's bytes: deterministic for equal adapters."""
    return canonical_safetensors(save_bytes(_flat_tensors(adapter), metadata=_meta_strings(adapter)))


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write atomically (temp file, fsync, rename): a crash never leaves half a file."""
    return write_atomic(path, adapter_to_bytes(adapter))


def _from_parts(meta: dict[str, str] | None, tensors: dict[str, torch.Tensor], origin: str) -> Adapter:
    meta = meta or {}
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterFormatError(f"{origin}: not a specfuse adapter (no '{ADAPTER_FORMAT}' metadata)")
    if meta.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise AdapterFormatError(
            f"{origin}: adapter format version {meta.get('format_version')!r} is not supported "
            f"(this specfuse reads {ADAPTER_FORMAT_VERSION})"
        )
    for key in ("kind", "config", "base_fingerprint", "basis_k", "target_layers"):
        if key not in meta:
            raise AdapterFormatError(f"{origin}: metadata field {key!r} is missing")
    kind = get_kind(meta["kind"])  # UnknownKind names the known ones
    try:
        config, layers, extra = (jsonsafe.loads(meta.get(key, "{}"), max_depth=MAX_METADATA_DEPTH,
                                                what=f"metadata field {key!r}")
                                 for key in ("config", "target_layers", "meta"))
    except jsonsafe.BadJSON as err:
        raise AdapterFormatError(f"{origin}: {err}") from err
    if not isinstance(config, dict) or not isinstance(layers, list) or not isinstance(extra, dict):
        raise AdapterFormatError(f"{origin}: metadata config/target_layers/meta have the wrong types")
    if not all(isinstance(layer, str) for layer in layers):
        raise AdapterFormatError(f"{origin}: target_layers must be a list of layer names")
    if len(meta["basis_k"]) > 10:  # k is at most a layer's width; int() of thousands of digits is refused
        raise AdapterFormatError(f"{origin}: basis_k {meta['basis_k'][:20]!r}... is not a rank")
    try:
        cfg = kind.config(config)
        basis_k = parse_rank(meta["basis_k"])
    except InvalidConfig as err:
        raise AdapterFormatError(f"{origin}: bad {kind.name} config: {err}") from err
    _check_config_ranges(cfg, origin)
    if not layers:
        raise AdapterFormatError(f"{origin}: adapter has no target layers")

    params: dict[str, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    for key, t in tensors.items():
        layer, _, name = key.rpartition(".")
        if layer not in params:
            raise AdapterFormatError(f"{origin}: tensor {key!r} belongs to no target layer")
        if name in kind.frozen:
            if t.dtype not in INT_DTYPES:
                raise AdapterFormatError(f"{origin}: tensor {key} must be integer, got {t.dtype}")
            t = t.to(torch.int64)
        else:
            if t.dtype not in FLOAT_DTYPES:
                raise AdapterFormatError(f"{origin}: tensor {key} must be floating point, got {t.dtype}")
            if not torch.isfinite(t).all():
                raise AdapterFormatError(f"{origin}: tensor {key} has NaN or infinite values")
            t = t.to(torch.float32)
        params[layer][name] = t
    empty = [layer for layer, p in params.items() if not p]
    if empty:
        raise AdapterFormatError(f"{origin}: target layer {empty[0]!r} has no tensors")
    return Adapter(kind.name, config, meta["base_fingerprint"], basis_k, params, extra)


def _check_config_ranges(cfg: Any, origin: str) -> None:
    """Every integer of a parsed kind config (alone or in a pair such as slice) lies in [0, MAX_CONFIG_INT]."""
    for name, value in config_to_dict(cfg).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= MAX_CONFIG_INT:
                raise AdapterFormatError(f"{origin}: config field {name} = {v} is outside [0, {MAX_CONFIG_INT}]")


def load_adapter(path: str | Path, basis: Basis | None = None) -> Adapter:
    """Read and validate an adapter file (and check it against ``basis`` when given)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFormatError(f"{path}: not a readable safetensors file (truncated or corrupt: {err})") from err
    adapter = _from_parts(meta, tensors, str(path))
    if basis is not None:
        adapter.check_against(basis)
    return adapter


def adapter_from_bytes(data: bytes, basis: Basis | None = None, origin: str = "upload") -> Adapter:
    """Parse an adapter from bytes (HTTP uploads, registry blobs), with the same checks."""
    if len(data) < 8:
        raise AdapterFormatError(f"{origin}: {len(data)} bytes is too short to be a safetensors file")
    try:
        header_len = int.from_bytes(data[:8], "little")
        if header_len <= 0 or 8 + header_len > len(data):
            raise AdapterFormatError(f"{origin}: truncated safetensors file (header of {header_len} bytes)")
        header = jsonsafe.loads(data[8 : 8 + header_len], max_depth=4, what="the safetensors header")
        if not isinstance(header, dict):
            raise AdapterFormatError(f"{origin}: the safetensors header is not a JSON object")
        meta = header.get("__metadata__")
        tensors = load_bytes(data)
    except AdapterFormatError:
        raise
    except jsonsafe.BadJSON as err:
        raise AdapterFormatError(f"{origin}: {err}") from err
    except (SafetensorError, ValueError, RuntimeError, UnicodeDecodeError, AttributeError) as err:
        raise AdapterFormatError(f"{origin}: not a readable safetensors file (truncated or corrupt: {err})") from err
    adapter = _from_parts(meta, tensors, origin)
    if basis is not None:
        adapter.check_against(basis)
    return adapter


def new_adapter(kind: str, config: dict[str, Any] | None, basis: Basis, layers: list[str] | None = None,
                meta: dict[str, Any] | None = None) -> Adapter:
    """A freshly initialised adapter (the identity) on ``layers`` of ``basis``."""
    impl = get_kind(kind)
    cfg = impl.config(config)
    layers = layers or basis.layer_names()
    params = {layer: impl.init_params(basis[layer], cfg, layer) for layer in layers}
    return Adapter(impl.name, config_to_dict(cfg), basis.fingerprint, basis.rank, params, dict(meta or {}))


def core_adapter(basis: Basis, cores: dict[str, torch.Tensor | None],
                 residuals: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, diagonal: bool = False,
                 meta: dict[str, Any] | None = None) -> Adapter:
    """A ``core`` adapter: per layer C (k, k), or diag(C) (k,) when ``diagonal``, and a residual
    (B (out, q), A (q, in)); a layer with neither is left out. What fusion and distillation produce."""
    residuals = residuals or {}
    params: dict[str, dict[str, torch.Tensor]] = {}
    for layer in basis.layer_names():
        layer_params = {}
        if cores.get(layer) is not None:
            layer_params["c" if diagonal else "C"] = cores[layer]
        if layer in residuals:
            layer_params["B"], layer_params["A"] = residuals[layer]
        if layer_params:
            params[layer] = layer_params
    return Adapter("core", {"diagonal": diagonal}, basis.fingerprint, basis.rank, params, dict(meta or {}))


def count_params(kind: str, config: dict[str, Any] | None, shapes: dict[str, tuple[int, int, int]]) -> int:
    """Trainable parameters of ``kind`` over layers given as name -> (out, in, k)."""
    impl = get_kind(kind)
    cfg = impl.config(config)
    return sum(impl.count_params(o, i, k, cfg) for o, i, k in shapes.values())
