"""Adapter signatures: where in the base model's feature space an adapter's prompts live.

A signature is the normalised centroid of the base model's prompt features over a sample
of the adapter's training prompts:

    f(prompt) = mean over prompt tokens of h_L(token)      h_L: base model's last hidden state
    signature = normalize(mean_i normalize(f(prompt_i)))   (hidden,)

It is computed with the adapter *off* (the base model), so every adapter's signature
lives in one space and a request's features can be compared with all of them before any
adapter is chosen. Stored in the adapter's metadata (``meta["signature"]``, a list of
floats, with ``meta["signature_model"]`` = the base fingerprint), so it travels with the
file into the registry; imported adapters get one later from a sample file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters_zoo.errors import InvalidConfig
from adapters_zoo.prompts import single_bos

SIGNATURE_PROMPTS = 256  # prompts sampled per adapter; the centroid is stable well before


@torch.no_grad()
def prompt_features(model, tokenizer, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised mean-pooled last hidden states of ``prompts`` -> (n, hidden)."""
    if not prompts:
        raise InvalidConfig("prompt_features needs at least one prompt")
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    feats = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [single_bos(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
            out = model(**batch, output_hidden_states=True)
            feats.append(pool_features(out.hidden_states[-1], batch["attention_mask"]).cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(feats)


def pool_features(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A prompt's feature: its last hidden states (n, T, hidden) averaged over its real tokens
    (``mask`` (n, T), 1 on them; either padding side), L2-normalised -> (n, hidden) float32.
    The one pooling of signatures and of the serving router's probe."""
    h = hidden.float()
    m = mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def signature_from_features(features: torch.Tensor) -> torch.Tensor:
    """Normalised centroid of normalised features -> (hidden,)."""
    return F.normalize(F.normalize(features, dim=-1).mean(0), dim=0)


def signature_from_prompts(model, tokenizer, prompts: list[str], limit: int = SIGNATURE_PROMPTS) -> torch.Tensor:
    return signature_from_features(prompt_features(model, tokenizer, prompts[:limit]))


def attach_signature(meta: dict, signature: torch.Tensor, base_fingerprint: str) -> dict:
    meta = dict(meta)
    meta["signature"] = [round(float(v), 6) for v in signature]
    meta["signature_model"] = base_fingerprint
    return meta


def signature_of(meta: dict, base_fingerprint: str, hidden: int) -> torch.Tensor | None:
    """The stored signature, or None when absent or computed on another base / width."""
    sig = meta.get("signature")
    if not isinstance(sig, list) or meta.get("signature_model") != base_fingerprint or len(sig) != hidden:
        return None
    t = torch.tensor(sig, dtype=torch.float32)
    return F.normalize(t, dim=0) if torch.isfinite(t).all() else None
