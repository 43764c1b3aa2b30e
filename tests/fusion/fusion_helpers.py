"""Helpers shared by the fusion tests (imported by name: test dirs are not packages)."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from adapters_zoo.basis import Basis, LayerBasis
from adapters_zoo.format import Adapter, new_adapter

K = 8  # basis rank of the tiny models (hidden 32, k/v 16 wide)
SIZES = {"lam": 0.8, "G_U": 0.6, "G_V": 0.6, "c": 0.3, "M": 0.8, "gate": 1.0, "A_U": 0.3, "A_V": 0.3,
         "B": 0.3, "A": 0.3}  # moves that change the tiny models' logits clearly


def moved(kind: str, config: dict | None, basis: Basis, seed: int, layers: list[str] | None = None,
          name: str | None = None) -> Adapter:
    """A fresh adapter with its trainable tensors moved off the identity, deterministically."""
    adapter = new_adapter(kind, config, basis, layers=layers, meta={"name": name or f"{kind}-{seed}"})
    gen = torch.Generator().manual_seed(seed)
    for params in adapter.params.values():
        for pname, t in params.items():
            if pname not in adapter.kind_impl.frozen:
                params[pname] = t + SIZES.get(pname, 0.3) * torch.randn(t.shape, generator=gen)
    return adapter


def load_model(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def add_deltas(model, adapters: list[Adapter], weights: list[float], basis: Basis) -> None:
    """The reference: W += Σ wₙ ΔWₙ, dense, layer by layer."""
    with torch.no_grad():
        for layer in basis.layer_names():
            parts = [w * a.delta(layer, basis) for a, w in zip(adapters, weights) if layer in a.params]
            if parts:
                module = model.get_submodule(layer)
                dw = sum(parts)
                module.weight += dw.T if basis.transposed.get(layer) else dw


def make_peft_lora(model_dir, out_dir, seed: int = 0, **config) -> PeftModel:
    """A real PEFT LoRA on the model, with B moved off zero (a trained-looking adapter), saved to out_dir."""
    cfg = LoraConfig(task_type="CAUSAL_LM", **config)
    model = get_peft_model(load_model(model_dir), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out_dir))
    return model.eval()


def peft_delta(peft_model, layer: str) -> torch.Tensor:
    module = peft_model.base_model.model.get_submodule(layer)
    dw = module.get_delta_weight("default").detach()
    return dw.T if module.fan_in_fan_out else dw  # (out, in)


LORA_CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
               "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}}


# --------------------------------------------------------------------------- hand-made cores


def toy_basis(k: int = 4, out_f: int = 7, in_f: int = 6, layers: int = 1, seed: int = 0) -> Basis:
    gen = torch.Generator().manual_seed(seed)
    lbs = {}
    for i in range(layers):
        U = torch.linalg.qr(torch.randn(out_f, k, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(in_f, k, generator=gen))[0]
        S = torch.linspace(4.0, 1.0, k)
        lbs[f"layer{i}"] = LayerBasis(U, S, V)
    return Basis(lbs, "0" * 32, k)


def core_adapter(basis: Basis, cores: dict[str, torch.Tensor] | torch.Tensor, name: str = "hand") -> Adapter:
    """A ``core`` adapter with the given k×k cores (one tensor: the same core on every layer)."""
    if isinstance(cores, torch.Tensor):
        cores = {layer: cores for layer in basis.layer_names()}
    params = {layer: {"C": c.to(torch.float32)} for layer, c in cores.items()}
    return Adapter("core", {"diagonal": False}, basis.fingerprint, basis.rank, params, {"name": name})


def diag_adapter(basis: Basis, values: list[float], name: str = "diag") -> Adapter:
    params = {layer: {"c": torch.tensor(values, dtype=torch.float32)} for layer in basis.layer_names()}
    return Adapter("core", {"diagonal": True}, basis.fingerprint, basis.rank, params, {"name": name})
