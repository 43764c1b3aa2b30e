"""Train a spectral adapter with someone else's training loop (transformers.Trainer, TRL, accelerate).

    model = prepare_for_training(model, basis, kind="scale", rank=32)   # adapters on, base frozen
    ... any loop that steps the parameters with requires_grad ...
    save_trained(model, "task.safetensors", tokenizer=tok, prompts=prompts)

``prepare_for_training`` wraps the basis layers of the model in place; its only trainable
parameters are then the adapter's (float32, whatever dtype the base is held in), so an
optimizer built from ``requires_grad`` parameters — as Trainer builds one — steps exactly
those. ``save_trained`` reads them back into an adapter file with the metadata the
registry takes, and the routing signature when prompts are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters_zoo.basis import Basis, check_basis_matches_model
from adapters_zoo.errors import InvalidConfig
from adapters_zoo.format import Adapter, new_adapter, save_adapter
from adapters_zoo.inject import adapter_parameters, attach, extract
from adapters_zoo.models import adapter_disabled, target_layers
from adapters_zoo.signatures import attach_signature, signature_from_prompts
from adapters_zoo.train import TRAIN_SIGNATURE_PROMPTS
from adapters_zoo.train_runtime import world

ATTRIBUTE = "spectral_adapter"  # where the prepared model keeps what save_trained needs


@dataclass
class PreparedAdapter:
    template: Adapter  # kind, config, layers and basis identity of the adapter being trained
    basis: Basis


def prepare_for_training(
    model: torch.nn.Module,
    basis: Basis,
    kind: str = "scale",
    targets: str | list[str] | None = None,
    verify_basis: bool = True,
    **kind_config: Any,
) -> torch.nn.Module:
    """``model`` with a fresh ``kind`` adapter (the identity) on ``targets`` of ``basis``; only its parameters train.

    ``kind_config`` are the kind's own fields (``rank=32``, ``pattern="banded"``, ...). Raises
    BasisMismatch when ``basis`` was not computed from this model's weights (``verify_basis=False``
    skips the hash of a model already checked).
    """
    if hasattr(model, ATTRIBUTE):
        raise InvalidConfig("the model is prepared already: one adapter trains at a time")
    if verify_basis:
        check_basis_matches_model(basis, model)
    adapter = new_adapter(kind, kind_config, basis, target_layers(model, basis, targets))
    model.requires_grad_(False)
    attach(model, adapter, basis)
    setattr(model, ATTRIBUTE, PreparedAdapter(adapter, basis))
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter parameters of a prepared model (what its optimizer should step)."""
    _prepared(model)
    return adapter_parameters(model)


def save_trained(
    model: torch.nn.Module,
    path: str | Path,
    *,
    tokenizer=None,
    prompts: list[str] | None = None,
    name: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Path | None:
    """Write the adapter a prepared model holds to ``path`` (atomically); returns the path.

    With ``tokenizer`` and ``prompts`` (the training prompts) the routing signature — the
    base model's features of the prompts, adapter off — is stored, so ``auto`` can route to
    the adapter. Inside torch.distributed only rank 0 writes (the others return None).
    """
    prepared = _prepared(model)
    if (tokenizer is None) != (prompts is None):
        raise InvalidConfig("the signature needs both tokenizer and prompts (or neither)")
    if world()[0] != 0:
        return None
    trained = extract(model, prepared.template)
    path = Path(path)
    trained.meta = {**trained.meta, "name": name or path.stem, **(meta or {})}
    if prompts is not None:
        if not prompts:
            raise InvalidConfig("prompts is empty: pass the training prompts, or None for no signature")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), adapter_disabled(model):
                signature = signature_from_prompts(model, tokenizer, prompts[:TRAIN_SIGNATURE_PROMPTS])
        finally:
            model.train(was_training)
        trained.meta = attach_signature(trained.meta, signature, prepared.basis.fingerprint)
    return save_adapter(trained, path)


def _prepared(model: torch.nn.Module) -> PreparedAdapter:
    prepared = getattr(model, ATTRIBUTE, None)
    if prepared is None:
        raise InvalidConfig("the model holds no adapter in training: call prepare_for_training(model, basis) first")
    return prepared
