"""The model a run loads, and the adapter's place in it: device, model directory, target layers,
the frozen base an adapter trains on, and the base run with its adapter off.

Serving loads its model here too; nothing here trains.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from adapters_zoo.basis import Basis, default_device
from adapters_zoo.checkpoint import linear_layers
from adapters_zoo.errors import BasisMismatch, InvalidConfig, ModelDirError
from adapters_zoo.format import Adapter
from adapters_zoo.inject import SpectralLinear, attach, detach


def resolve_device(device: str | None) -> torch.device:
    """``device``, or cuda when present, else cpu; asking for cuda without one is an InvalidConfig."""
    if not device:
        return default_device()
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InvalidConfig(f"unknown device {device!r} (use cpu or cuda)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfig(f"device {device!r} asked for, but no CUDA device is available")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise InvalidConfig(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return resolved


def load_model_dir(model_dir: str | Path, device: str | None = None):
    """(model, tokenizer) from a local transformers directory; weights keep their stored dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    device = resolve_device(device)  # before the slow part
    if not (model_dir / "config.json").is_file():
        raise ModelDirError(f"{model_dir}: not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ModelDirError(f"{model_dir}: no usable tokenizer ({type(err).__name__}: {err})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype="auto",
                                                     use_safetensors=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelDirError(f"{model_dir}: cannot load the model ({type(err).__name__}: {err})") from None
    return model.to(device).eval(), tokenizer


def target_layers(model: torch.nn.Module, basis: Basis, targets: str | list[str] | None) -> list[str]:
    """The basis layers selected by ``targets`` (all of them when None), in model order."""
    if targets is None:
        return basis.layer_names()
    wanted = [spec.name for spec in linear_layers(model, targets)]
    missing = [name for name in wanted if name not in basis.layers]
    if missing:
        raise BasisMismatch(
            f"layer {missing[0]!r} is selected by the targets but not in the basis "
            f"({len(basis.layers)} layers): compute the basis with these targets"
        )
    return wanted


@contextlib.contextmanager
def frozen_base(model: torch.nn.Module, device: torch.device):
    """``model`` on ``device``, in eval mode with every weight frozen, for adapters attached inside the
    block; after it (also on error) every adapter is detached and the grad flags and mode restored."""
    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.to(device).eval()
    try:
        model.requires_grad_(False)
        yield model
    finally:
        detach(model)
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, p.requires_grad))
        model.train(was_training)


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module):
    """Run ``model`` as its base: every SpectralLinear is swapped for its base layer, then put back."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, SpectralLinear)]
    for name, module in wrapped:
        model.set_submodule(name, module.base_layer)
    try:
        yield model
    finally:
        for name, module in wrapped:
            model.set_submodule(name, module)


@contextlib.contextmanager
def attached(model: torch.nn.Module, adapter: Adapter, basis: Basis):
    """``model`` with ``adapter`` attached for the block, then restored to its base."""
    attach(model, adapter, basis)
    try:
        yield model
    finally:
        detach(model)
