"""Read a local transformers model directory tensor by tensor.

A model directory holds ``config.json`` and one or more ``*.safetensors`` shards (with
``model.safetensors.index.json`` when sharded). Nothing here loads the whole model: the
architecture is instantiated on the meta device to learn which modules are linear, and
weights are read one tensor at a time, so peak memory is the largest single matrix.

Layer names are module paths (``model.layers.0.self_attn.q_proj``). All weights are
returned in the math convention ``W`` of shape (out, in); GPT-2's ``Conv1D`` stores the
transpose, which :class:`LayerSpec.transposed` records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adapters_zoo.errors import ModelDirError

ALL_LINEAR = "all-linear"
# Output heads share the embedding or map to the vocabulary: never adapted.
_EXCLUDED_LEAVES = {"lm_head", "embed_out", "score", "classifier", "qa_outputs"}


@dataclass(frozen=True)
class LayerSpec:
    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    out_features: int
    in_features: int
    transposed: bool = False  # True for GPT-2 Conv1D (weight stored as (in, out))

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"


def parse_targets(targets: str | list[str] | None) -> list[str]:
    """``"q_proj,v_proj"`` or a list -> list of names; None/"" -> ``["all-linear"]``."""
    if targets is None or targets == "" or targets == []:
        return [ALL_LINEAR]
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [t.strip() for t in items if t.strip()]
    if not names:
        raise ModelDirError(f"no target layer names in {targets!r}")
    return names


def _matches(name: str, targets: list[str]) -> bool:
    if ALL_LINEAR in targets:
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_layers(model: torch.nn.Module, targets: str | list[str] | None) -> list[LayerSpec]:
    """Linear (and GPT-2 Conv1D) modules of ``model`` selected by ``targets``, in model order."""
    wanted = parse_targets(targets)
    specs = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _EXCLUDED_LEAVES or not _matches(name, wanted):
            continue
        if isinstance(module, torch.nn.Linear):
            specs.append(LayerSpec(name, module.out_features, module.in_features, False))
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            w = module.weight  # (in, out)
            specs.append(LayerSpec(name, w.shape[1], w.shape[0], True))
    if not specs:
        raise ModelDirError(f"no linear layer matches targets {','.join(wanted)}")
    return specs


def load_config(path: str | Path):
    """A transformers config from a model directory or a config.json file."""
    from transformers import AutoConfig

    path = Path(path)
    cfg_file = path if path.is_file() else path / "config.json"
    if not cfg_file.is_file():
        raise ModelDirError(f"{path}: no config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelDirError(f"{cfg_file}: unreadable config ({err})") from err
    model_type = raw.pop("model_type", None)
    if not model_type:
        raise ModelDirError(f"{cfg_file}: config has no model_type")
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError) as err:
        raise ModelDirError(f"{cfg_file}: unknown model_type {model_type!r} ({err})") from err


def meta_model(config, causal_lm: bool = True) -> torch.nn.Module:
    """Instantiate an architecture on the meta device: shapes only, no memory."""
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        if causal_lm:
            try:
                return AutoModelForCausalLM.from_config(config)
            except ValueError:
                pass
        return AutoModel.from_config(config)


class Checkpoint:
    """The safetensors weights of a model directory, read lazily tensor by tensor."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise ModelDirError(f"{self.dir}: not a directory")
        self._key_to_file: dict[str, Path] = {}
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as err:
                raise ModelDirError(f"{index}: unreadable shard index ({err})") from err
            self._key_to_file = {k: self.dir / f for k, f in weight_map.items()}
        else:
            # model.safetensors when present: a basis or adapter file saved beside it is not a shard
            single = self.dir / "model.safetensors"
            shards = [single] if single.is_file() else sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise ModelDirError(f"{self.dir}: no *.safetensors weights (pickled .bin is not read)")
            for shard in shards:
                for key in self._open(shard).keys():
                    self._key_to_file[key] = shard

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as err:
            raise ModelDirError(f"{path}: not a readable safetensors file ({err})") from err

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    @property
    def shard_files(self) -> list[Path]:
        return sorted(set(self._key_to_file.values()))

    def resolve(self, key: str) -> str:
        if key in self._key_to_file:
            return key
        # Checkpoints saved from a base model lack the task wrapper's prefix (or vice versa).
        candidates = [k for k in self._key_to_file if k.endswith("." + key) or key.endswith("." + k)]
        if len(candidates) == 1:
            return candidates[0]
        raise ModelDirError(f"{self.dir}: tensor {key!r} not found in the checkpoint")

    def get(self, key: str) -> torch.Tensor:
        key = self.resolve(key)
        with safe_open(str(self._key_to_file[key]), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        key = self.resolve(key)
        with safe_open(str(self._key_to_file[key]), framework="pt", device="cpu") as f:
            return tuple(f.get_slice(key).get_shape())

    def weight(self, spec: LayerSpec) -> torch.Tensor:
        """The layer's weight as float32 (out, in), whatever its stored dtype and layout."""
        w = self.get(spec.weight_key)
        if spec.transposed:
            w = w.t()
        w = w.to(torch.float32).contiguous()
        if tuple(w.shape) != (spec.out_features, spec.in_features):
            raise ModelDirError(
                f"{spec.weight_key}: shape {tuple(w.shape)} != ({spec.out_features}, {spec.in_features})"
            )
        if not torch.isfinite(w).all():
            raise ModelDirError(f"{self.dir}: weight {spec.weight_key} has NaN or infinite values")
        return w

    def config(self):
        return load_config(self.dir)

    def linear_layers(self, targets: str | list[str] | None) -> list[LayerSpec]:
        return linear_layers(meta_model(self.config()), targets)
