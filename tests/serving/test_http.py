"""A real server on 127.0.0.1 (uvicorn in a thread), spoken to with the openai client and httpx."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from adapters_zoo.format import adapter_to_bytes
from serving.app import create_app
from serving.reference import reference_generate
from serving.serve_cli import ServerSettings, ServerThread, build_service

KEY = "test-key"  # as the conftest server fixture
NAMES = ["scale", "scale_lora", "svft", "rotation", "additive", "lora", "scale_q"]


def complete(client, model, prompt, max_tokens=8, **extra):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True, **extra})
    return r.choices[0].text


def expected_text(model, tokenizer, basis, prompt, mixture, max_tokens=8):
    ids = reference_generate(model, basis, tokenizer(prompt)["input_ids"], mixture, max_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- generation


def test_completion_base_and_mixture_match_reference(client, model, tokenizer, basis, adapters):
    assert complete(client, "base", "hello") == expected_text(model, tokenizer, basis, "hello", [])
    got = complete(client, "scale:0.7,rotation:0.3", "hello")
    mixture = [(adapters["scale"], 0.7), (adapters["rotation"], 0.3)]  # linear: Σ w ΔW, dense
    assert got == expected_text(model, tokenizer, basis, "hello", mixture)
    assert got != complete(client, "base", "hello")
    # the same mixture as an extra body field, and with a version pinned
    assert complete(client, "base", "hello", adapters={"rotation": 0.3, "scale@1": 0.7}) == got


def test_fusion_method_and_params_select_another_mixture(client, service):
    linear = complete(client, "base", "abc", adapters={"scale": 0.5, "svft": 0.5})
    ties = complete(client, "base", "abc", adapters={"scale": 0.5, "svft": 0.5}, fusion_method="ties",
                    fusion_params={"density": 0.3})
    keys = [k.method for k in service.engine.mixtures.keys()]
    assert "ties" in keys and "linear" in keys
    assert isinstance(linear, str) and isinstance(ties, str)


def test_chat_uses_the_template_and_streams(client, tokenizer):
    messages = [{"role": "user", "content": "flip:abc="}]
    chat = client.chat.completions.create(model="svft", messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    as_completion = client.completions.create(model="svft", prompt=rendered.removeprefix("<s>"), max_tokens=6,
                                              temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == as_completion.choices[0].text
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6

    stream = client.chat.completions.create(model="svft", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_streaming_completion_equals_non_streaming(client):
    full = complete(client, "lora:0.6,additive:0.4", "stream me", max_tokens=10)
    stream = client.completions.create(model="lora:0.6,additive:0.4", prompt="stream me", max_tokens=10,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in stream]
    assert "".join(t for t, _ in pieces) == full
    assert pieces[-1][1] == "length"


def test_stop_strings_and_seeded_sampling(client):
    text = complete(client, "base", "hello", max_tokens=12)
    stop = text[3:5]
    cut = client.completions.create(model="base", prompt="hello", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    runs = [client.completions.create(model="scale", prompt="hi", max_tokens=10, temperature=1.0, top_p=0.9,
                                      seed=7, extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_32_concurrent_distinct_mixtures_equal_solo(client):
    """Batching never changes results: each request alone, then all 32 at once."""
    cases = []
    for i in range(32):
        a, b = NAMES[i % 7], NAMES[(i // 7 + i + 1) % 7]
        w = round(0.2 + 0.1 * (i % 6), 2)
        model = f"{a}:{w},{b}:{round(1 - w, 2)}" if a != b else a
        cases.append((model, f"prompt {i} " + "xyz"[: i % 4]))
    assert len({m for m, _ in cases}) == 32, "every request its own mixture"
    solo = [complete(client, m, p, max_tokens=10) for m, p in cases]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda c: complete(client, c[0], c[1], max_tokens=10), cases))
    # float32 on CPU: rows computed in a batch of 32 agree with solo runs to ~1e-6; no greedy near-tie
    # flips on these inputs (a flip would show here as a mismatch, not be tolerated)
    assert together == solo


def test_short_request_overtakes_long_ones(client, service):
    """Iteration-level batching: a request that arrives while others decode joins and leaves first."""
    order: list[str] = []
    lock = threading.Lock()

    def run(tag, max_tokens):
        complete(client, "scale", f"{tag} go", max_tokens=max_tokens)
        with lock:
            order.append(tag)

    threads = [threading.Thread(target=run, args=(f"long{i}", 150)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while service.scheduler.running < 3 and time.time() < deadline:
        time.sleep(0.005)
    assert service.scheduler.running == 3, "the long requests are decoding"
    steps_before = service.scheduler.steps
    run("short", 3)
    assert order == ["short"], f"the short request finished while the long ones were running: {order}"
    assert service.scheduler.steps - steps_before < 150
    for t in threads:
        t.join()
    assert sorted(order[1:]) == ["long0", "long1", "long2"]


def test_client_disconnect_frees_row_and_slot(server, service):
    body = {"model": "rotation:0.5,svft:0.5", "prompt": "bye", "max_tokens": 190, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break
            assert service.engine.slots.pinned >= 1
    deadline = time.time() + 20
    while (service.scheduler.running or service.engine.slots.pinned) and time.time() < deadline:
        time.sleep(0.01)
    assert service.scheduler.running == 0 and service.engine.slots.pinned == 0
    assert service.metrics.finished.get(reason="cancelled") >= 1


# --------------------------------------------------------------------------- listing, registry


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base" and set(NAMES) <= set(ids)
    assert client.models.retrieve("svft@1").id == "svft@1" and client.models.retrieve("base").id == "base"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_registry_upload_fuse_delete_over_http(server, client, basis, make_adapter):
    auth = {"Authorization": f"Bearer {KEY}"}
    data = adapter_to_bytes(make_adapter("scale", {"rank": 8}, basis, 99))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v1/adapters", params={"name": "up"}, content=data).status_code == 401
        r = http.post("/v1/adapters", params={"name": "up", "tag": ["x", "y"]}, content=data, headers=auth)
        assert r.status_code == 201 and r.json()["ref"] == "up@1" and r.json()["tags"] == ["x", "y"]
        bad = http.post("/v1/adapters", params={"name": "bad"}, content=data[:-10], headers=auth)
        assert bad.status_code == 400 and "error" in bad.json()
        assert http.get("/v1/adapters/up", headers=auth).json()["sha256"] == r.json()["sha256"]
        listed = http.get("/v1/adapters", params={"kind": "scale"}, headers=auth).json()["data"]
        assert "up@1" in [a["ref"] for a in listed]
        fused = http.post("/v1/fuse", json={"mixture": "up:0.5,svft:0.5", "name": "fused-up"}, headers=auth)
        assert fused.status_code == 201 and fused.json()["kind"] == "core"
        assert complete(client, "fused-up", "abc") == complete(client, "up:0.5,svft:0.5", "abc")
        assert http.delete("/v1/adapters/up", headers=auth).status_code == 200
        assert http.get("/v1/adapters/up", headers=auth).status_code == 404
    with pytest.raises(openai.NotFoundError):
        complete(client, "up", "abc")


def test_health_and_metrics(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        assert http.get("/health").json()["status"] == "ok"
        response = http.get("/metrics")
        text = response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    for name in ("specfuse_requests_total", "specfuse_request_seconds_bucket", "specfuse_completion_tokens_total",
                 "specfuse_batch_rows_bucket", "specfuse_slot_cache_hits_total", "specfuse_slot_cache_misses_total"):
        assert name in text
    assert 'specfuse_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_a_new_mixture_is_timed_once_until_ready(client, service):
    """specfuse_mixture_ready_seconds: one observation per new mixture (reduced + written to a slot), none
    for a mixture already served."""
    ready = service.metrics.mixture_ready
    before = ready.count()
    complete(client, "scale:0.123,svft:0.456", "abc", max_tokens=2)
    assert ready.count() == before + 1
    complete(client, "svft:0.456,scale:0.123", "abc", max_tokens=2)
    assert ready.count() == before + 1, "the same mixture, cached: not new"
    assert 0 < ready.series[()][-1] < 60
    assert "specfuse_mixture_ready_seconds_bucket" in service.metrics.render()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("mixture,extra,error,status", [
    ("scale:abc", {}, openai.BadRequestError, 400),  # bad mixture syntax
    ("scale:-0.5", {}, openai.BadRequestError, 400),  # negative weight
    ("scale:nan,svft:0.5", {}, openai.BadRequestError, 400),  # NaN weight (as JSON NaN: test_bounds)
    ("base", {"adapters": {"scale": -1.0}}, openai.BadRequestError, 400),
    ("base", {"adapters": {f"a{i}": 0.001 for i in range(1000)}}, openai.BadRequestError, 400),  # 1,000 adapters
    ("nothere", {}, openai.NotFoundError, 404),
    ("base", {"bogus_field": 1}, openai.UnprocessableEntityError, 422),
    ("base", {"fusion_method": "ties"}, openai.BadRequestError, 400),  # a method without a mixture
    ("scale,svft", {"fusion_method": "no-such-method"}, openai.BadRequestError, 400),
])
def test_errors_have_status_and_openai_body(client, mixture, extra, error, status):
    with pytest.raises(error) as info:
        client.completions.create(model=mixture, prompt="x", max_tokens=2, extra_body=extra)
    assert info.value.status_code == status
    assert info.value.body["message"] and "type" in info.value.body
    assert complete(client, "base", "still up", max_tokens=2)  # and the server keeps serving


def test_bounds(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt="x", max_tokens=10**9)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="base", prompt="y" * 100, max_tokens=2)
    assert info.value.status_code == 413 and info.value.body["param"] == "prompt"
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as http:
        big = http.post("/v1/completions", content=b'{"model": "base", "prompt": "' + b"z" * (2 << 20) + b'"}',
                        headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
        broken = http.post("/v1/completions", content=b'{"model": "base", "prompt": ',
                           headers={"Content-Type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
        nan = http.post("/v1/completions", content=b'{"model": "base", "prompt": "a", "adapters": {"scale": NaN}}',
                        headers={"Content-Type": "application/json"})
        assert nan.status_code == 400
        assert http.get("/v1/nowhere").json()["error"]["message"]
    assert complete(client, "base", "still up", max_tokens=2)


V1_ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
             ("GET", "/v1/models/base"), ("GET", "/v1/adapters"), ("GET", "/v1/adapters/scale"),
             ("POST", "/v1/adapters?name=x"), ("DELETE", "/v1/adapters/scale"), ("POST", "/v1/fuse"),
             ("GET", "/metrics")]


@pytest.mark.parametrize("method,path", V1_ROUTES)
def test_the_api_key_guards_every_v1_route_and_metrics(server, method, path):
    """Pre-fix only writes needed the key: completions, models, adapters and metrics answered anyone."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.request(method, server.url + path, headers=headers, json={} if method == "POST" else None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    assert httpx.get(server.url + "/health").status_code == 200  # liveness stays open


def test_public_reads_open_the_get_routes_only(service):
    with ServerThread(create_app(service, api_key=KEY, public_reads=True)) as srv:
        anyone = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        assert anyone.models.list().data[0].id == "base"
        assert httpx.get(srv.url + "/v1/adapters/scale").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError) as info:
            anyone.completions.create(model="base", prompt="x", max_tokens=2)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        assert httpx.delete(srv.url + "/v1/adapters/scale").status_code == 401


def test_queue_full_is_429_and_stopped_engine_is_503(home):
    with build_service(ServerSettings(home / "base", home, device="cpu", slots=2, residual_slots=1,
                                      max_batch=1, max_queue=1)) as small:
        with ServerThread(create_app(small)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
            body = {"model": "base", "prompt": "long", "max_tokens": 150, "temperature": 0, "ignore_eos": True}
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=60)
                deadline = time.time() + 20
                while small.scheduler.running < 1 and time.time() < deadline:
                    time.sleep(0.005)
                queued = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=60)
                while small.scheduler.waiting < 1 and time.time() < deadline:
                    time.sleep(0.005)
                with pytest.raises(openai.RateLimitError) as info:
                    client.completions.create(model="base", prompt="x", max_tokens=2)
                assert info.value.status_code == 429
                assert running.result().status_code == 200 and queued.result().status_code == 200
            small.scheduler.stop()
            with pytest.raises(openai.InternalServerError) as info:
                client.completions.create(model="base", prompt="x", max_tokens=2)
            assert info.value.status_code == 503
            assert json.loads(httpx.get(srv.url + "/health").text)["status"] == "stopped"


def test_prompt_lists_and_n_give_indexed_choices(client):
    r = client.completions.create(model="scale", prompt=["one", "two"], n=2, max_tokens=4, temperature=0.8,
                                  seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage.completion_tokens == 16
    assert r.choices[0].text == complete_seeded(client, "one", 3) and r.choices[1].text == complete_seeded(client,
                                                                                                          "one", 4)


def complete_seeded(client, prompt, seed):
    return client.completions.create(model="scale", prompt=prompt, max_tokens=4, temperature=0.8, seed=seed,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_a_client_gone_mid_generation_is_noticed_between_events(service):
    """Non-streaming requests poll for a disconnect even while tokens keep arriving."""
    import asyncio

    from serving.generation import SamplingParams

    async def gone() -> bool:
        return True

    async def run() -> int:
        generation = service.start([[1, 40, 41]], SamplingParams(max_tokens=199, temperature=0, ignore_eos=True),
                                   1, None)
        return len([event async for _, event in generation.events(gone, poll_s=0.01)])

    cancelled = service.metrics.finished.get(reason="cancelled")
    events = asyncio.run(run())
    assert events < 199
    deadline = time.time() + 10
    while service.metrics.finished.get(reason="cancelled") == cancelled and time.time() < deadline:
        time.sleep(0.01)
    assert service.metrics.finished.get(reason="cancelled") == cancelled + 1
