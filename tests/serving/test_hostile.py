"""What a hostile client sends, and what it gets: a 4xx naming the problem, never a 500, never a hang.

Each case here broke the server before the fix (issue 14): huge mixture weights and fusion
params gave NaN logits; harmful adapters entered the registry; deep JSON, huge integers and
lone surrogates gave 500s; strings were coerced into numbers and booleans.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from safetensors.torch import save as save_tensors

from adapters_zoo.format import _flat_tensors, _meta_strings, adapter_to_bytes

KEY = "test-key"  # as the conftest server fixture
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def still_serving(http) -> None:
    r = http.post("/v1/completions", json={"model": "scale", "prompt": "ok", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# --------------------------------------------------------------------------- numbers that blow up


@pytest.mark.parametrize("body", [
    {"model": "svft:1e20"},
    {"model": "base", "adapters": {"svft": 1e20}},
    {"model": "svft:-1e20"},
])
def test_a_huge_mixture_weight_is_a_400_naming_the_bound(http, body):
    error = error_of(http.post("/v1/completions", json={**body, "prompt": "x", "max_tokens": 2}), 400)
    assert "max mixture weight" in error["message"] and "10" in error["message"]
    still_serving(http)


@pytest.mark.parametrize("params", [{"scale": 1e308}, {"scale": 1e30}])
def test_fusion_params_that_blow_up_the_cores_are_a_400(http, params):
    body = {"model": "base", "adapters": {"scale": 0.5, "svft": 0.5}, "fusion_method": "ties",
            "fusion_params": params, "prompt": "x", "max_tokens": 2, "temperature": 1.0}
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert error["code"] == "delta_out_of_bounds" and "max delta ratio" in error["message"]
    still_serving(http)


def test_fuse_refuses_mixtures_past_the_bounds(http):
    r = http.post("/v1/fuse", json={"mixture": "svft:1e20", "name": "boom"})
    assert "max mixture weight" in error_of(r, 400)["message"]
    r = http.post("/v1/fuse", json={"mixture": "scale:0.5,svft:0.5", "method": "ties", "params": {"scale": 1e30},
                                    "name": "boom"})
    assert error_of(r, 400)["code"] == "delta_out_of_bounds"
    assert http.get("/v1/adapters/boom").status_code == 404


def _upload(http, adapter, name: str, meta: dict | None = None, tensors: dict | None = None):
    data = save_tensors(tensors or _flat_tensors(adapter), metadata={**_meta_strings(adapter), **(meta or {})})
    return http.post("/v1/adapters", params={"name": name}, content=data)


def test_uploads_that_would_blow_up_are_refused(http, adapters):
    adapter = adapters["scale"]
    huge = {k: t.clone().fill_(1e30) for k, t in _flat_tensors(adapter).items()}
    assert error_of(_upload(http, adapter, "huge", tensors=huge), 400)["code"] == "delta_out_of_bounds"
    for config in ({"rank": 10**30}, {"slice": [0, 10**12]}):
        error = error_of(_upload(http, adapter, "wide", meta={"config": json.dumps(config)}), 400)
        assert "1000000000" in error["message"], error
    assert http.get("/v1/adapters/huge").status_code == 404 and http.get("/v1/adapters/wide").status_code == 404
    assert http.post("/v1/adapters", params={"name": "fine"}, content=adapter_to_bytes(adapter)).status_code == 201


# --------------------------------------------------------------------------- parsers that used to raise


def test_metadata_nested_deep_and_basis_k_of_thousands_of_digits_are_400s(http, adapters):
    adapter = adapters["scale"]
    deep = "[" * 2000 + "]" * 2000
    assert error_of(_upload(http, adapter, "deep", meta={"meta": deep}), 400)["code"] == "invalid_adapter"
    assert error_of(_upload(http, adapter, "deep", meta={"config": deep}), 400)["code"] == "invalid_adapter"
    assert error_of(_upload(http, adapter, "digits", meta={"basis_k": "9" * 5000}), 400)["code"] == "invalid_adapter"


@pytest.mark.parametrize("raw", [
    b'{"model": "base", "prompt": "\\ud800", "max_tokens": 2}',
    b'{"model": "base", "prompt": ["ok", "\\udfff"], "max_tokens": 2}',
    b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
    b'{"model": "base", "prompt": "x", "fusion_params": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"model": "base", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
    b'{"model": "base", "prompt": "x", "stop": ["\\ud800"]}',
], ids=["prompt-surrogate", "prompt-list-surrogate", "chat-surrogate", "deep-3000", "int-5000-digits",
        "stop-surrogate"])
def test_bodies_that_broke_the_parsers_are_400s(http, raw):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    error = error_of(http.post(path, content=raw, headers={"Content-Type": "application/json"}), 400)
    assert error["code"] == "invalid_json"
    still_serving(http)


# --------------------------------------------------------------------------- strict request schemas


@pytest.mark.parametrize("field,value", [("max_tokens", "10"), ("stream", "yes"), ("n", "2"), ("temperature", "0"),
                                         ("seed", 1.5), ("ignore_eos", 1)])
def test_nothing_is_coerced(http, field, value):
    r = http.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2, field: value})
    assert error_of(r, 422)["code"] == "invalid_schema"


@pytest.mark.parametrize("prompt", ["", [], [""], [[]], ["ok", ""]])
def test_empty_prompts_are_refused(http, prompt):
    r = http.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 2})
    assert error_of(r, 400)["param"] == "prompt"


def test_a_temperature_that_would_overflow_is_refused(http):
    r = http.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2, "temperature": 1e-300})
    assert error_of(r, 400)["param"] == "temperature"


def test_an_empty_fusion_method_is_refused_not_linear(http):
    r = http.post("/v1/completions", json={"model": "base", "adapters": {"scale": 0.5, "svft": 0.5},
                                           "fusion_method": "", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 422 and "fusion_method" in r.json()["error"]["message"]
    assert error_of(http.post("/v1/fuse", json={"mixture": "scale", "method": "", "name": "e"}), 422)


def test_content_length_and_chunked_together_are_refused(server):
    body = b'{"model": "base", "prompt": "x", "max_tokens": 2}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() +
               b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
               b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" +
               hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]


# --------------------------------------------------------------------------- the documented contract


def test_openapi_lists_the_error_statuses_answered(http):
    doc = http.get("/openapi.json").json()
    paths = doc["paths"]
    for path, method, statuses in [("/v1/completions", "post", {"400", "401", "404", "413", "422", "429"}),
                                   ("/v1/chat/completions", "post", {"400", "404", "429"}),
                                   ("/v1/models/{model_id}", "get", {"401", "404"}),
                                   ("/v1/adapters/{ref}", "delete", {"401", "404"}),
                                   ("/v1/adapters", "post", {"400", "401", "409", "413"}),
                                   ("/v1/fuse", "post", {"400", "404", "409"})]:
        assert statuses <= set(paths[path][method]["responses"]), (path, method)
    assert "text/event-stream" in paths["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/adapters/%ED%A0%80"), ("GET", "/v1/models/%00"),
    ("GET", "/v1/adapters/" + "a" * 5000), ("DELETE", "/v1/adapters/..%2F..%2Fetc"),
    ("POST", "/v1/adapters?name=%ED%A0%80"), ("POST", "/v1/adapters?name=ok&version=%FF"),
], ids=["path-surrogate", "path-nul", "path-long", "path-dots", "name-surrogate", "version-bad"])
def test_odd_paths_and_queries_are_4xx(http, adapters, method, path):
    r = http.request(method, path, content=adapter_to_bytes(adapters["scale"]) if method == "POST" else None)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
