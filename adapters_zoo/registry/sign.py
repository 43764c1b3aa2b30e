"""Give a registry adapter the signature that routing (``model: "auto"``) matches (``specfuse registry sign``).

The signature (:mod:`adapters_zoo.signatures`) is the base model's mean prompt feature over
sample prompts of what the adapter is for (``{"prompt": ...}`` lines; a completion may be
there and is ignored). The zoo computes it from each task's training prompts; imported
adapters (PEFT, uploads, fusions) get it here.

It is stored where the zoo stores it, in the adapter's metadata, so it travels with the
file (export, upload, another registry) and is covered by the blob's sha256. Metadata is
part of the file, so signing writes a **new version** of the name: same tensors, same
tags, metrics and description, plus ``meta["signature"]``. Caches keyed by content hash
(the server's parsed adapters, fused mixtures) can never serve a stale signature, and
the unsigned version stays reachable as ``name@old``. (A side table in the catalog would
avoid the version bump but would split one adapter's identity over two places.)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapters_zoo.registry.catalog import AdapterRecord


def sign_adapter(registry, ref: str, model, tokenizer, prompts: list[str], source: str = "") -> AdapterRecord:
    """Store ``ref`` again as a new version carrying the signature of ``prompts`` on ``model`` (its base)."""
    from adapters_zoo.basis import fingerprint_model
    from adapters_zoo.errors import BasisMismatch, TrainingDataError
    from adapters_zoo.signatures import SIGNATURE_PROMPTS, attach_signature, signature_from_prompts

    rec, adapter = registry.resolve(ref)
    basis = registry.basis(rec.base_fingerprint)
    try:
        fingerprint = fingerprint_model(model, basis.layer_names())
    except BasisMismatch:
        fingerprint = None
    if fingerprint != rec.base_fingerprint:
        raise BasisMismatch(f"{rec.ref} belongs to base {rec.base_fingerprint}, but the model given is another base "
                            f"({fingerprint or 'other layers'}): sign it with the model it was trained on")
    if not prompts:
        raise TrainingDataError(f"{source or 'the sample'}: no prompts to compute a signature from")
    signature = signature_from_prompts(model, tokenizer, prompts)
    adapter.meta = attach_signature(adapter.meta, signature, rec.base_fingerprint)
    adapter.meta["signature_source"] = {"file": Path(source).name if source else "",
                                        "prompts": min(len(prompts), SIGNATURE_PROMPTS), "signed_from": rec.ref}
    return registry.add(adapter, rec.name, tags=rec.tags, metrics=rec.metrics, description=rec.description)
