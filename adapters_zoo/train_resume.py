"""Checkpoints of a training run, so a long run killed at any point continues where it was.

A checkpoint holds everything the next step depends on: the adapter parameters, AdamW's
state, the loss scaler's, the step (the learning-rate schedule is a function of it), the
batch generator's RNG and the examples left in the current epoch (the data position), the
losses so far, and the world size. It is written atomically by rank 0, so a kill leaves
the previous checkpoint or the new one, never half of one; every rank resumes from it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from adapters_zoo.errors import InvalidConfig
from adapters_zoo.files import write_atomic

VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save({"version": VERSION, **state}, buf)
    return write_atomic(path, buf.getvalue())


def load_checkpoint(path: str | Path, settings: dict[str, Any], ranks: int) -> dict[str, Any]:
    """The state saved at ``path``; InvalidConfig unless it was written by a run of these settings and ranks."""
    path = Path(path)
    if not path.is_file():
        raise InvalidConfig(f"no checkpoint to resume at {path} (run with --save-every N first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or damaged file: torch raises many kinds
        raise InvalidConfig(f"{path}: not a training checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise InvalidConfig(f"{path}: not a training checkpoint of this version")
    if state["ranks"] != ranks:
        raise InvalidConfig(f"{path} was written by a run of {state['ranks']} processes; this one has {ranks}: "
                            f"resume with the same number (the batches each process takes depend on it)")
    changed = sorted(k for k in settings if settings[k] != state["settings"].get(k))
    if changed:
        key = changed[0]
        raise InvalidConfig(f"{path} was written with {key}={state['settings'].get(key)!r}, this run has "
                            f"{key}={settings[key]!r}: resume with the settings it started with")
    return state
