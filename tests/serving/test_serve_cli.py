"""The ``serve`` / ``demo`` commands end to end, and the engine's import boundary."""

from __future__ import annotations

import subprocess
import sys

import openai
from server_process import cli_server

from adapters_zoo.demo_model import save_model
from adapters_zoo.zoo import ZooSettings, build_zoo
from serving.cli import main


def test_engine_imports_without_the_http_stack():
    code = ("import sys\n"
            "for name in ('fastapi', 'uvicorn', 'pydantic', 'starlette'):\n"
            "    sys.modules[name] = None  # importing any of them now fails\n"
            "import serving.engine, serving.scheduler, serving.backend, serving.reference, serving.services\n"
            "import serving.metrics, serving.vllm_bridge\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_serve_refuses_a_model_without_a_declared_basis(tmp_path, model, tokenizer, capsys):
    save_model(model, tokenizer, tmp_path / "base")
    assert main(["serve", str(tmp_path / "base"), "--home", str(tmp_path / "empty-home")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bar
    assert last.startswith("specfuse serve: error:") and "no basis" in last and "specfuse basis" in last


def test_serve_runs_a_zoo_over_http(tmp_path):
    """A miniature zoo (the real builder, the char base, tiny sizes), then ``specfuse serve`` in its own process."""
    tiny = ZooSettings(out=tmp_path / "zoo", base="char", suites=("compatible",), kinds=("scale", "rotation"),
                       peft_lora=False, threads=1,
                       tasks_per_suite=1, rank=8, steps=2, batch_size=8, n_train=8, n_eval=2, pretrain_steps=2,
                       model_overrides=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    build_zoo(tiny, home=tmp_path / "home", progress=False)
    model_dir = tmp_path / "zoo" / "base"
    env = {"SPECFUSE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    with cli_server(["serve", str(model_dir)], env) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        ids = [m.id for m in client.models.list().data]
        assert ids[0] == "base" and {"reverse_upper-scale", "reverse_upper-rotation"} <= set(ids)
        r = client.completions.create(model="reverse_upper-scale:0.5,reverse_upper-rotation:0.5", prompt="hi",
                                      max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
        chat = client.chat.completions.create(model="reverse_upper-scale", max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "abc="}])
        assert chat.choices[0].message.role == "assistant"
