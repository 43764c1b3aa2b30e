"""Which declared basis belongs to a model: found by the fingerprint of its weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adapters_zoo.basis import Basis, fingerprint_model, model_dir_fingerprint
from adapters_zoo.checkpoint import Checkpoint, linear_layers
from adapters_zoo.errors import BaseNotDeclared
from adapters_zoo.registry.registry import basis_command_hint

if TYPE_CHECKING:
    from adapters_zoo.registry.registry import Registry


def basis_for_model(registry: Registry, model: torch.nn.Module | str | Path) -> Basis:
    """The registry's declared basis whose fingerprint matches ``model``'s weights: a loaded model, or a
    model directory (streamed, never loaded whole). Bases of other shapes are skipped without hashing;
    BaseNotDeclared, naming the command that adds the basis, when none matches."""
    if isinstance(model, torch.nn.Module):
        specs, where, hint_dir = linear_layers(model, None), "", "MODEL_DIR"

        def fingerprint(layers: list[str]) -> str:
            return fingerprint_model(model, layers)
    else:
        ckpt = Checkpoint(model)
        specs, where, hint_dir = ckpt.linear_layers(None), f" in {model}", str(model)

        def fingerprint(layers: list[str]) -> str:
            return model_dir_fingerprint(ckpt, layers)

    shapes = {s.name: (s.out_features, s.in_features) for s in specs}
    rows = registry.bases()
    fingerprints: dict[tuple[str, ...], str] = {}  # bases over the same layers hash the model once
    for row in rows:
        basis = registry.basis(row["fingerprint"])
        if any(shapes.get(n) != (o, i) for n, (o, i, _) in basis.shapes().items()):
            continue  # another architecture
        layers = tuple(basis.layer_names())
        if layers not in fingerprints:
            fingerprints[layers] = fingerprint(list(layers))
        if fingerprints[layers] == basis.fingerprint:
            return basis
    raise BaseNotDeclared(
        f"the registry at {registry.home} holds no basis of the model{where} ({len(rows)} other base(s) declared); "
        f"add it first with `{basis_command_hint(registry.home).replace('MODEL_DIR', hint_dir)}`"
    )
