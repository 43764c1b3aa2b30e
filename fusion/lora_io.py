"""PEFT LoRA directories out of and into the shared basis.

Export: any adapter (a fused mixture included) is ``ΔW = U_k C V_kᵀ + B_r A_r`` per layer,
which is a LoRA of rank ≤ rank(C) + q:

    C = P s Qᵀ (keep the r nonzero s)      B = [U_k P diag(s) | B_r]   (out, r + q)
                                           A = [Qᵀ V_kᵀ ; A_r]          (r + q, in)

(a diagonal C needs no SVD: B = U_k[:, nz] · c[nz], A = V_k[:, nz]ᵀ). Written in PEFT's
layout, ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.{layer}.lora_A.weight`` (r, in) and ``….lora_B.weight`` (out, r),
``lora_alpha = r`` so PEFT's scaling is 1. Layers of different rank are zero-padded to
one rank (``ranks="pad"``, what vLLM needs: it reads one r and one alpha) or described
with PEFT's ``rank_pattern``/``alpha_pattern`` (``ranks="pattern"``, smaller files).
``fan_in_fan_out`` is set for GPT-2 ``Conv1D`` layers; their factors have the same shapes.

Import: reads ``adapter_config.json`` and ``adapter_model.safetensors`` only (never a
pickled ``adapter_model.bin``), applies PEFT's scaling (alpha/r, alpha/√r with rslora,
per-layer ``rank_pattern``/``alpha_pattern``) and gives an adapter of kind ``lora`` (exact
residual; kind ``core`` with residual only when layers differ in rank), or with
``project=True`` kind ``core`` holding U_kᵀ B A V_k, the share of energy lost in its meta.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from adapters_zoo.basis import Basis, LayerBasis
from adapters_zoo.errors import AdapterFormatError, IncompatibleAdapter, InvalidConfig
from adapters_zoo.files import save_safetensors
from adapters_zoo.format import FLOAT_DTYPES, Adapter
from fusion.cores import adapter_cores, project_residual

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."
RANK_RTOL = 1e-6  # singular values of C below RANK_RTOL · s_max are dropped from the export
RANK_MODES = ("pad", "pattern")
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<layer>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraExport:
    path: Path
    r: int  # the config's r (= lora_alpha)
    ranks: dict[str, int]  # layer -> rank actually used (before padding)
    target_modules: list[str]
    fan_in_fan_out: bool
    rank_pattern: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- export


def core_factors(core: torch.Tensor, lb: LayerBasis, rtol: float = RANK_RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) with B A = U_k C V_kᵀ, r = rank of C."""
    off_diagonal = core - torch.diag(core.diagonal())
    if not bool(off_diagonal.any()):
        c = core.diagonal()  # (k,)
        nz = (c != 0).nonzero().flatten()
        return lb.U[:, nz] * c[nz], lb.V[:, nz].T
    P, s, Qh = torch.linalg.svd(core.to(torch.float64))  # (k, k), (k,), (k, k)
    r = int((s > rtol * s[0]).sum())
    B = lb.U.to(torch.float64) @ (P[:, :r] * s[:r])  # (out, r)
    A = Qh[:r] @ lb.V.to(torch.float64).T  # (r, in)
    return B.to(lb.U.dtype), A.to(lb.U.dtype)


def lora_factors(adapter: Adapter, basis: Basis, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole ΔW of one layer as (B (out, r), A (r, in)); r may be 0."""
    lb = basis[layer]
    entry = adapter_cores(adapter, basis)
    parts = []
    core = entry.core(layer)
    if core is not None:
        parts.append(core_factors(core, lb))
    if entry.residuals.get(layer) is not None:
        parts.append(entry.residuals[layer])
    B = torch.cat([b for b, _ in parts] or [lb.U[:, :0]], dim=1)
    A = torch.cat([a for _, a in parts] or [lb.V[:, :0].T], dim=0)
    return B.cpu().float(), A.cpu().float()


def _pad(B: torch.Tensor, A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = B.shape[1]
    return torch.cat([B, B.new_zeros(B.shape[0], r - q)], 1), torch.cat([A, A.new_zeros(r - q, A.shape[1])], 0)


def export_peft_lora(
    adapter: Adapter,
    basis: Basis,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    ranks: str = "pad",
) -> LoraExport:
    """Write ``adapter`` as a PEFT LoRA directory (PEFT and vLLM load it as it is)."""
    from peft import LoraConfig

    if ranks not in RANK_MODES:
        raise InvalidConfig(f"ranks must be one of {', '.join(RANK_MODES)}, got {ranks!r}")
    adapter.check_against(basis)
    factors = {layer: lora_factors(adapter, basis, layer) for layer in adapter.layers}
    leaves = sorted({layer.rsplit(".", 1)[-1] for layer in factors})
    # Leaf names target every layer of that name: the basis layers the adapter leaves alone get zeros.
    for layer in basis.layer_names():
        if layer not in factors and layer.rsplit(".", 1)[-1] in leaves:
            lb = basis[layer]
            factors[layer] = (lb.U.new_zeros(lb.out_features, 0).cpu(), lb.V.new_zeros(0, lb.in_features).cpu())
    layer_ranks = {layer: max(1, B.shape[1]) for layer, (B, _) in factors.items()}  # PEFT needs r ≥ 1

    if ranks == "pad":
        r = max(layer_ranks.values())
        pattern = {}
    else:
        r = Counter(layer_ranks.values()).most_common(1)[0][0]
        pattern = {re.escape(layer): q for layer, q in layer_ranks.items() if q != r}
    tensors = {}
    for layer, (B, A) in factors.items():
        B, A = _pad(B, A, r if ranks == "pad" else layer_ranks[layer])
        tensors[f"{PEFT_PREFIX}{layer}.lora_A.weight"] = A.contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{layer}.lora_B.weight"] = B.contiguous()  # (out, r)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidConfig(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    fan_in_fan_out = any(basis.transposed.get(layer, False) for layer in factors)
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=leaves, fan_in_fan_out=fan_in_fan_out, bias="none",
        rank_pattern=pattern, alpha_pattern=dict(pattern), task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path, inference_mode=True,
    )
    config.save_pretrained(str(out_dir))
    save_safetensors(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    used = {layer: int(factors[layer][0].shape[1]) for layer in adapter.layers}
    return LoraExport(out_dir, r, used, leaves, fan_in_fan_out, pattern)


# --------------------------------------------------------------------------- import


def _read_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{peft_dir}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{path}: unreadable JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise AdapterFormatError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters can be imported")
    if cfg.get("use_dora"):
        raise AdapterFormatError(f"{path}: DoRA adapters (use_dora) rescale W itself and cannot be imported as B A")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise AdapterFormatError(f"{path}: adapters that train biases (bias={cfg.get('bias')!r}) are not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFormatError(f"{path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterFormatError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(name) or {}, dict):
            raise AdapterFormatError(f"{path}: {name} must be an object")
    return cfg


def _read_weights(peft_dir: Path) -> dict[str, torch.Tensor]:
    path = peft_dir / WEIGHTS_FILE
    if not path.is_file():
        pickled = [name for name in PICKLED_FILES if (peft_dir / name).is_file()]
        if pickled:
            raise AdapterFormatError(
                f"{peft_dir}: only {pickled[0]} (a pickle) is there; specfuse never unpickles. Convert it "
                f"where you trust it: PeftModel.from_pretrained(...).save_pretrained(DIR, safe_serialization=True)"
            )
        raise AdapterFormatError(f"{peft_dir}: no {WEIGHTS_FILE}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({err})") from err


def _pattern_value(patterns: dict[str, Any], layer: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern lookup: the first key matching ``(.*\\.)?(key)$`` on the module name."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", layer):
                return value
        except re.error as err:
            raise AdapterFormatError(f"pattern {key!r} is not a valid regular expression ({err})") from err
    return default


def _basis_layer(name: str, basis: Basis) -> str:
    if name in basis.layers:
        return name
    matches = [b for b in basis.layers if b.endswith("." + name) or name.endswith("." + b)]
    if len(matches) != 1:
        raise IncompatibleAdapter(
            f"PEFT layer {name!r} is {'ambiguous' if matches else 'not'} in the basis "
            f"({len(basis.layers)} layers, e.g. {next(iter(basis.layers))})"
        )
    return matches[0]


def _factor_pairs(tensors: dict[str, torch.Tensor], basis: Basis, origin: str) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterFormatError(
                f"{origin}: tensor {key!r} is not a LoRA factor (embedding LoRA, DoRA magnitudes, biases and "
                "modules_to_save are not supported)"
            )
        layer = _basis_layer(m["layer"], basis)
        if t.dtype not in FLOAT_DTYPES or t.dim() != 2:
            raise AdapterFormatError(f"{origin}: {key} must be a 2-D float tensor, got {t.dtype} {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise AdapterFormatError(f"{origin}: {key} has NaN or infinite values")
        pairs.setdefault(layer, {})[m["factor"]] = t.to(torch.float32)
    if not pairs:
        raise AdapterFormatError(f"{origin}: no LoRA tensors")
    return pairs


def import_peft_lora(peft_dir: str | Path, basis: Basis, project: bool = False) -> Adapter:
    """A PEFT LoRA directory as a specfuse adapter on ``basis`` (of the model the LoRA was trained on)."""
    peft_dir = Path(peft_dir)
    if not peft_dir.is_dir():
        raise AdapterFormatError(f"{peft_dir}: not a directory")
    cfg = _read_config(peft_dir)
    origin = str(peft_dir / WEIGHTS_FILE)
    pairs = _factor_pairs(_read_weights(peft_dir), basis, origin)

    params: dict[str, dict[str, torch.Tensor]] = {}
    energy: dict[str, tuple[float, float]] = {}  # layer -> (‖B A‖², lost to projection)
    for layer in basis.layer_names():  # basis order
        if layer not in pairs:
            continue
        if set(pairs[layer]) != {"A", "B"}:
            raise AdapterFormatError(f"{origin}: layer {layer} has lora_{next(iter(pairs[layer]))} but not both")
        A, B = pairs[layer]["A"], pairs[layer]["B"]
        lb = basis[layer]
        q = A.shape[0]
        if A.shape != (q, lb.in_features) or B.shape != (lb.out_features, q):
            raise AdapterFormatError(
                f"{origin}: layer {layer} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; the model's layer "
                f"needs ({q}, {lb.in_features}) and ({lb.out_features}, {q})"
            )
        r = _pattern_value(cfg.get("rank_pattern") or {}, layer, cfg["r"])
        if r != q:
            raise AdapterFormatError(f"{origin}: layer {layer} has rank {q} but the config says r={r}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, layer, cfg.get("lora_alpha", cfg["r"])))
        scaling = alpha / (q**0.5 if cfg.get("use_rslora") else q)
        B = B * scaling
        if project:
            core, total, lost = project_residual(B.to(lb.U), A.to(lb.U), lb)
            energy[layer] = (total, lost)
            params[layer] = {"C": core.cpu()}
        else:
            params[layer] = {"B": B, "A": A}

    meta: dict[str, Any] = {
        "name": peft_dir.name,
        "source": {
            "format": "peft-lora", "path": str(peft_dir), "r": cfg["r"], "lora_alpha": cfg.get("lora_alpha"),
            "use_rslora": bool(cfg.get("use_rslora")), "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        },
    }
    layer_ranks = {p["A"].shape[0] for p in params.values()} if not project else set()
    if project:
        kind, config = "core", {"diagonal": False}
        total = sum(e for e, _ in energy.values())
        meta["projection"] = {
            "energy_lost": sum(lost for _, lost in energy.values()) / total if total > 0 else 0.0,
            "residual_energy": total,
            "per_layer": {layer: lost / e if e > 0 else 0.0 for layer, (e, lost) in energy.items()},
        }
    elif len(layer_ranks) == 1:
        q = layer_ranks.pop()
        kind, config = "lora", {"rank": q, "alpha": float(q)}  # scaling folded into B
    else:
        kind, config = "core", {"diagonal": False}  # residual-only layers of different ranks
    adapter = Adapter(kind, config, basis.fingerprint, basis.rank, params, meta)
    adapter.check_against(basis)
    return adapter
