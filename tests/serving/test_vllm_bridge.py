"""Registry mixtures as PEFT LoRA directories (what vLLM loads), and the on-demand resolver."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
from dataclasses import dataclass

import pytest
import torch

from adapters_zoo.registry import Registry
from serving.reference import reference_logits
from serving.vllm_bridge import MixtureResolver, export_mixture, register_resolver


@dataclass
class LoRARequest:  # the fields of vllm.lora.request.LoRARequest the resolver fills
    lora_name: str
    lora_int_id: int
    lora_path: str


@pytest.fixture(scope="module")
def registry(tmp_path_factory, basis, adapters):
    reg = Registry(tmp_path_factory.mktemp("bridge-home"))
    reg.add_basis(basis)
    for name in ("scale", "svft", "rotation", "lora"):
        reg.add(adapters[name], name)
    yield reg
    reg.close()


def test_exported_mixture_loads_in_peft_and_equals_the_mixture(registry, tmp_path, model, tokenizer, basis,
                                                               adapters):
    from peft import PeftModel

    out = export_mixture(registry, "scale:0.7,rotation:0.3,lora:0.5", tmp_path, "tiny-base")
    assert out.parent == tmp_path and out.name.startswith("specfuse-")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-base"
    assert export_mixture(registry, "rotation:0.3,scale:0.7,lora:0.5", tmp_path, "tiny-base") == out, "reused"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    prompt = tokenizer("vllm bridge")["input_ids"]
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = reference_logits(model, basis, prompt,
                                [(adapters["scale"], 0.7), (adapters["rotation"], 0.3), (adapters["lora"], 0.5)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_resolver_resolves_mixture_names_and_refuses_the_rest(registry, tmp_path, basis):
    resolver = MixtureResolver(registry, tmp_path, LoRARequest, base_fingerprint=basis.fingerprint, max_entries=4)
    request = asyncio.run(resolver.resolve_lora("tiny-base", "svft:0.5,scale:0.5"))
    assert request.lora_name == "svft:0.5,scale:0.5" and request.lora_int_id > 0
    assert (tmp_path / request.lora_path.rsplit("/", 1)[-1] / "adapter_model.safetensors").is_file()
    same = asyncio.run(resolver.resolve_lora("tiny-base", "scale:0.5,svft:0.5"))
    assert same.lora_path == request.lora_path and same.lora_int_id == request.lora_int_id
    for bad in ("nothere", "scale:-1", "../../etc", "a,b,c,d,e", "scale:nan"):
        assert asyncio.run(resolver.resolve_lora("tiny-base", bad)) is None, bad
    other = MixtureResolver(registry, tmp_path, LoRARequest, base_fingerprint="0" * 32)
    assert asyncio.run(other.resolve_lora("tiny-base", "scale")) is None, "adapters of another base"


def test_register_resolver_explains_a_missing_vllm():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed: the plugin would register for real")
    with pytest.raises(ImportError, match="vLLM"):
        register_resolver()


def test_vllm_serve_command_names_every_adapter_and_the_rank_that_holds_them(home, tmp_path):
    from serving.vllm_bridge import shell_line, vllm_serve_command

    with Registry(home) as reg:
        env, argv = vllm_serve_command(reg, home / "base", out_root=tmp_path, max_loras=4)
        names = sorted({rec.name for rec in reg.list()})
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true" and env["SPECFUSE_HOME"] == str(home)
    assert argv[:3] == ["vllm", "serve", str((home / "base").resolve())]
    flags = argv[3:]
    assert flags[flags.index("--max-loras") + 1] == "4"
    modules = dict(m.split("=", 1) for m in flags[flags.index("--lora-modules") + 1:])
    assert sorted(modules) == names
    ranks = {n: json.loads((tmp_path / p.rsplit("/", 1)[-1] / "adapter_config.json").read_text())["r"]
             for n, p in modules.items()}
    assert ranks["scale_lora"] == 4 + 2 and ranks["lora"] == 2, "basis part and residual LoRA"
    assert max(ranks.values()) == 12 and flags[flags.index("--max-lora-rank") + 1] == "16", "12, rounded up"
    assert shell_line(env, argv).startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=true ")


def test_vllm_lora_rank_rounds_up_and_refuses_ranks_vllm_cannot_hold():
    from adapters_zoo.errors import IncompatibleAdapter
    from serving.vllm_bridge import vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 32, 33, 512)] == [1, 8, 8, 16, 32, 64, 512]
    with pytest.raises(IncompatibleAdapter, match="513"):
        vllm_lora_rank(513)


def test_vllm_model_dir_hides_a_basis_saved_beside_the_weights(home, tmp_path, basis):
    import shutil

    from adapters_zoo.basis import save_basis
    from serving.vllm_bridge import vllm_model_dir

    model_dir = tmp_path / "model"
    shutil.copytree(home / "base", model_dir)
    assert vllm_model_dir(model_dir, tmp_path / "views") == model_dir, "weights only: served as it is"
    save_basis(basis, model_dir / "basis.safetensors")
    view = vllm_model_dir(model_dir, tmp_path / "views")
    assert view.parent == tmp_path / "views"
    assert sorted(p.name for p in view.iterdir()) == sorted(p.name for p in model_dir.iterdir()
                                                              if p.name != "basis.safetensors")
    assert all((view / p.name).resolve() == p for p in model_dir.iterdir() if p.name != "basis.safetensors")
    assert vllm_model_dir(model_dir, tmp_path / "views") == view, "the view is reused"
