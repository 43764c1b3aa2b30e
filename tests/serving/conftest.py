"""Fixtures for the serving tests: a tiny random Llama (char tokenizer), its basis, adapters of every kind."""

from __future__ import annotations

import openai
import pytest
import torch

from adapters_zoo.basis import basis_from_model
from adapters_zoo.demo_model import build_tiny_model, build_tokenizer, save_model
from adapters_zoo.format import Adapter, new_adapter
from adapters_zoo.registry import Registry
from serving.app import create_app
from serving.serve_cli import ServerSettings, ServerThread, build_service

torch.set_num_threads(1)

KEY = "test-key"  # the API key of the ``server`` fixture

# Magnitudes that make each kind change the logits clearly (untrained adapters are the identity).
PERTURB = {"lam": 0.8, "G_U": 0.6, "G_V": 0.6, "c": 0.3, "values": 0.8, "gate": 1.0, "A_U": 0.3, "A_V": 0.3,
           "B": 0.3, "A": 0.3}


def perturbed(kind: str, config: dict | None, basis, seed: int, layers: list[str] | None = None,
              scale: float = 1.0) -> Adapter:
    """A ``new_adapter`` whose trainable tensors are moved off the identity, deterministically."""
    adapter = new_adapter(kind, config, basis, layers=layers, meta={"seed": seed})
    gen = torch.Generator().manual_seed(seed)
    for params in adapter.params.values():
        for name, t in params.items():
            if name in adapter.kind_impl.frozen:
                continue
            params[name] = t + scale * PERTURB.get(name, 0.3) * torch.randn(t.shape, generator=gen)
    return adapter


@pytest.fixture(scope="session")
def make_adapter():
    return perturbed


@pytest.fixture(scope="session")
def model():
    return build_tiny_model(0)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def basis(model):
    return basis_from_model(model, rank=8)


@pytest.fixture(scope="session")
def adapters(basis) -> dict[str, Adapter]:
    """One adapter per kind (and a few variants), all on the same basis."""
    return {
        "scale": perturbed("scale", {"rank": 8}, basis, 1),
        "scale_lora": perturbed("scale", {"rank": 4, "lora_rank": 2}, basis, 2),
        "svft": perturbed("svft", {"pattern": "banded", "d": 1}, basis, 3),
        "rotation": perturbed("rotation", {"rank": 6}, basis, 4),
        "additive": perturbed("additive", {"rank": 3}, basis, 5),
        "lora": perturbed("lora", {"rank": 2}, basis, 6),
        "scale_q": perturbed("scale", {"rank": 8}, basis, 7, layers=[n for n in basis.layers if "q_proj" in n]),
    }


# --------------------------------------------------------------------------- a live server (one per module)


@pytest.fixture(scope="module")
def home(tmp_path_factory, model, tokenizer, basis, adapters):
    home = tmp_path_factory.mktemp("serving-home")
    save_model(model, tokenizer, home / "base")
    with Registry(home) as registry:
        registry.add_basis(basis)
        for name, adapter in adapters.items():
            registry.add(adapter, name)
    return home


@pytest.fixture(scope="module")
def service(home):
    with build_service(ServerSettings(home / "base", home, device="cpu", slots=40, residual_slots=24,
                                      max_batch=40, max_prompt_tokens=64, max_tokens=200, max_mixture=8)) as service:
        yield service


@pytest.fixture(scope="module")
def server(service):
    with ServerThread(create_app(service, api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
