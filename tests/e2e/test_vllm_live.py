"""A real vLLM server (CPU build, its own venv) serves the demo registry through the specfuse plugin.

Runs when ``$SPECFUSE_TEST_VLLM`` names the ``vllm`` executable of a vLLM install (``.ci/run``
builds one); skipped otherwise. The server is the one ``specfuse vllm-args --launcher module``
prints. Checked: mixtures, single adapters and ``name@version`` answer through the ``openai``
client; unknown names and bad mixtures are refused with 404 and the server stays up; greedy
answers equal ``specfuse serve``'s on a few prompts per model (the full agreement over 100+
prompts is ``benchmarks/bench_vllm.py``'s).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

VLLM = os.environ.get("SPECFUSE_TEST_VLLM")
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not VLLM or not Path(VLLM).is_file(), reason="set SPECFUSE_TEST_VLLM to a vllm "
                                 "executable (its own venv) to run the live vLLM test")]

MODELS = ["order_date_iso:0.8,name_last_first:0.2", "order_date_iso", "order_date_iso@1",
          "contact_json:0.6,email_domain_json:0.4"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    from serving.demo import prepare_demo

    env = os.environ.get("SPECFUSE_TEST_REAL_HOME")
    home = Path(env) if env else tmp_path_factory.mktemp("vllm-home")
    return home, prepare_demo(home, progress=False)


@pytest.fixture(scope="module")
def vllm_url(demo):
    from vllm_peer import vllm_server

    home, model_dir = demo
    with vllm_server(VLLM, home, model_dir, threads=2, kv_cache_gib=1, timeout=1200) as (url, _):
        yield url


@pytest.fixture(scope="module")
def specfuse_url(demo):
    from vllm_peer import specfuse_server

    home, model_dir = demo
    with specfuse_server(home, model_dir, threads=2) as (url, _):
        yield url


def test_mixtures_adapters_and_versions_answer_and_bad_names_are_refused(vllm_url):
    from adapters_zoo.tasks.chat import chat_task, make_chat_split, prompt_messages, reference_answer

    client = openai.OpenAI(base_url=vllm_url + "/v1", api_key="unused", max_retries=0)
    example = make_chat_split(chat_task("order_date_iso"), "test", 1)[0]
    ask = prompt_messages(example)
    replies = {}
    for model in MODELS[:3]:
        reply = client.chat.completions.create(model=model, messages=ask, max_tokens=24, temperature=0)
        assert reply.model == model, model
        replies[model] = reply.choices[0].message.content.strip()
    assert replies["order_date_iso"] == replies["order_date_iso@1"] == reference_answer(example).strip(), replies
    assert replies[MODELS[0]], "the mixture answers"
    listed = {m.id for m in client.models.list().data}
    assert {"order_date_iso", "contact_json", MODELS[0]} <= listed, "preloaded and resolved adapters are listed"
    for bad in ("nothere", "order_date_iso:-1", "order_date_iso:nan", "../../etc", "order_date_iso@999"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=bad, messages=ask, max_tokens=4, temperature=0)
    assert httpx.get(vllm_url + "/health").status_code == 200, "the server survives every refusal"


def test_greedy_answers_equal_specfuse_serve(vllm_url, specfuse_url, demo):
    from bench_vllm import demo_prompts
    from vllm_peer import completions

    from serving.engine import load_model_dir

    _, tokenizer = load_model_dir(demo[1])
    plan = [(m, p) for m in MODELS for p in demo_prompts(tokenizer, m.split(":")[0].split("@")[0], 3)]
    models, prompts = [m for m, _ in plan], [p for _, p in plan]
    ours, _ = completions(specfuse_url, models, prompts, 24)
    theirs, _ = completions(vllm_url, models, prompts, 24)
    assert [c.prompt_tokens for c in ours] == [c.prompt_tokens for c in theirs]
    equal = [a.text == b.text for a, b in zip(ours, theirs)]
    assert sum(equal) >= len(plan) - 1, [(m, a.text, b.text) for (m, _), a, b, e in zip(plan, ours, theirs, equal)
                                         if not e]
