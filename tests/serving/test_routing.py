"""Automatic mixtures (``model: "auto"``): the routers' math, the engine probe, the service and the HTTP API.

The tiny random Llama of the serving fixtures plays the base; "tasks" are prompt groups
of the task suite with distinct input kinds (uppercase, digits, stars, brackets), and each
task's adapter carries the signature of its group's training prompts, as the zoo's do.
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from adapters_zoo.demo_model import build_tiny_model, save_model
from adapters_zoo.errors import InvalidMixture, InvalidRequest
from adapters_zoo.registry import Registry
from adapters_zoo.signatures import attach_signature, signature_from_features, signature_from_prompts
from adapters_zoo.tasks import make_split, suite_tasks, write_jsonl
from serving.app import create_app
from serving.engine import Engine, EngineConfig
from serving.reference import reference_generate
from serving.routing import (
    BASE_PROMPTS,
    AutoRouter,
    AutoSpec,
    Candidate,
    SpectralTable,
    auto_spec,
    prototype_scores,
    select,
    spectral_profile,
    spectral_scores,
)
from serving.serve_cli import ServerSettings, ServerThread, build_service

TASKS = ["reverse_upper", "sort_digits", "count_stars", "close_brackets"]


def task_prompts(name: str, split: str, n: int) -> list[str]:
    task = next(t for t in suite_tasks("compatible") if t.name == name)
    return [ex["prompt"] for ex in make_split(task, split, n)]


@pytest.fixture(scope="module")
def task_adapters(model, tokenizer, basis, make_adapter):
    """One perturbed adapter per task, signed with its task's training prompts (as the zoo signs)."""
    out = {}
    for i, name in enumerate(TASKS):
        adapter = make_adapter("scale", {"rank": 8}, basis, 100 + i)
        signature = signature_from_prompts(model, tokenizer, task_prompts(name, "train", 64))
        adapter.meta = attach_signature(adapter.meta, signature, basis.fingerprint)
        out[name] = adapter
    return out


# --------------------------------------------------------------------------- router math


def test_select_top_m_threshold_temperature_and_quantized_weights():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.9])
    assert select(scores, 1, 0.1, None) == [(1, 1.0)]  # a tie goes to the earlier candidate
    two = select(scores, 2, 0.1, None)
    assert [i for i, _ in two] == [1, 3] and [w for _, w in two] == [0.5, 0.5]
    assert select(scores, 3, 0.5, None) == [(1, 0.4), (3, 0.4), (2, 0.2)]  # softmax, in multiples of 1/20
    # a low temperature gives the best one everything; weights rounding to 0 are dropped
    assert select(torch.tensor([0.9, 0.5]), 2, 0.01, None) == [(0, 1.0)]
    assert select(scores, 4, 0.1, 0.6) == [(1, 0.5), (3, 0.5)]  # below the threshold: out
    assert select(scores, 2, 0.1, 0.95) == []  # nothing matches: the base model


def test_soft_weights_are_the_softmax_itself():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.7])
    soft = select(scores, 3, 0.5, None, soft=True)
    want = torch.softmax(torch.tensor([0.9, 0.7, 0.5], dtype=torch.float64) / 0.5, dim=0).tolist()
    assert [i for i, _ in soft] == [1, 3, 2]
    assert [w for _, w in soft] == [round(w, 6) for w in want]
    assert select(scores, 3, 0.5, None) == [(1, 0.5), (3, 0.3), (2, 0.2)], "the default stays quantized"
    assert select(scores, 2, 0.1, 0.95, soft=True) == []
    assert AutoSpec.parse({"soft": True}).soft and not AutoSpec.parse("auto").soft
    with pytest.raises(InvalidRequest, match="soft"):
        AutoSpec.parse({"soft": "yes"})


def test_prototype_scores_are_cosines():
    f = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(prototype_scores(f, s), torch.tensor([[0.6, 0.8], [1.0, 0.0]]))


def test_spectral_scores_equal_the_definition(basis, make_adapter):
    """score_i = mean_l mean_t ‖C h‖ / (‖C‖₂ ‖h‖), exact when every direction is kept."""
    adapters = [make_adapter("rotation", {"rank": 6}, basis, 11), make_adapter("svft", {"pattern": "banded", "d": 1},
                                                                              basis, 12),
                make_adapter("lora", {"rank": 2}, basis, 13),
                make_adapter("scale", {"rank": 8}, basis, 14, layers=[n for n in basis.layers if "q_proj" in n])]
    layers = basis.layer_names()
    k = basis[layers[0]].k
    table = SpectralTable.stack([spectral_profile(a, basis, directions=k) for a in adapters], layers, k, directions=k)
    h = torch.randn(len(layers), 5, k, generator=torch.Generator().manual_seed(0))  # (L, T, k)
    got = spectral_scores(h, table)
    for i, adapter in enumerate(adapters):
        per_layer = []
        for li, layer in enumerate(layers):
            if layer not in adapter.params:
                continue
            lb = basis[layer]
            c = adapter.core(layer, basis)
            c = torch.zeros(k, k) if c is None else c.float()
            res = adapter.residual(layer, basis)
            if res is not None:
                c = c + lb.U.T @ res[0] @ res[1] @ lb.V
            ch = (h[li] @ c.T).norm(dim=-1) / (torch.linalg.matrix_norm(c, ord=2) * h[li].norm(dim=-1))
            per_layer.append(ch.mean())
        assert got[i] == pytest.approx(float(torch.stack(per_layer).mean()), rel=1e-4), i


def test_spectral_table_prefers_the_adapter_whose_directions_the_tokens_follow(basis):
    from adapters_zoo.format import new_adapter

    k, layers = basis[basis.layer_names()[0]].k, basis.layer_names()
    adapters = []
    for j in range(3):  # adapter j reads basis direction j only
        a = new_adapter("core", {"diagonal": True}, basis)
        for params in a.params.values():
            params["c"][j] = 0.5
        adapters.append(a)
    table = SpectralTable.stack([spectral_profile(a, basis) for a in adapters], layers, k)
    h = torch.zeros(len(layers), 4, k)
    h[:, :, 1] = 1.0
    h[:, :, 5] = 0.5
    scores = spectral_scores(h, table)
    assert int(scores.argmax()) == 1 and float(scores[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(scores[1]) == pytest.approx(1 / 1.25**0.5, rel=1e-5)


# --------------------------------------------------------------------------- request options


def test_auto_spec_from_request_shapes():
    served = ("base", "tiny")
    assert auto_spec("base", None, served) is None and auto_spec("a:0.5,b:0.5", None, served) is None
    assert auto_spec("base", {"auto": 0.5}, served) is None  # an adapter named auto, with a weight
    assert auto_spec("auto", None, served) == AutoSpec()
    assert auto_spec("base", "auto", served) == AutoSpec()
    spec = auto_spec("tiny", {"auto": {"router": "spectral", "candidates": ["a", "b@2"], "top_m": 2,
                                       "temperature": 0.5, "threshold": 0.1}}, served)
    assert spec == AutoSpec("spectral", ("a", "b@2"), None, 2, 0.5, 0.1)
    with pytest.raises(InvalidMixture, match="not both"):
        auto_spec("math", "auto", served)
    with pytest.raises(InvalidMixture, match="combined"):
        auto_spec("base", {"auto": {}, "math": 0.5}, served)
    with pytest.raises(InvalidMixture, match="picks the adapters itself"):
        auto_spec("auto", {"math": 1.0}, served)


@pytest.mark.parametrize("options, param", [
    ({"router": "oracle"}, "adapters.auto.router"),
    ({"candidates": []}, "adapters.auto.candidates"),
    ({"candidates": "a,b"}, "adapters.auto.candidates"),
    ({"candidates": ["a"], "tag": "t"}, "adapters.auto.tag"),
    ({"tag": "../x"}, "adapters.auto.tag"),
    ({"top_m": 0}, "adapters.auto.top_m"),
    ({"top_m": 1.5}, "adapters.auto.top_m"),
    ({"temperature": 0}, "adapters.auto.temperature"),
    ({"temperature": float("nan")}, "adapters.auto.temperature"),
    ({"threshold": 2}, "adapters.auto.threshold"),
    ({"threshold": "high"}, "adapters.auto.threshold"),
    ({"topm": 2}, "adapters.auto.topm"),
    ({"base_margin": 2.5}, "adapters.auto.base_margin"),
    ({"base_margin": True}, "adapters.auto.base_margin"),
])
def test_bad_routing_options_name_the_field(options, param):
    with pytest.raises(InvalidRequest) as err:
        AutoSpec.parse(options)
    assert err.value.param == param


# --------------------------------------------------------------------------- engine probe and routers


@pytest.fixture(scope="module")
def engine(model, tokenizer, basis):
    return Engine(copy.deepcopy(model), tokenizer, basis, EngineConfig(slots=8, residual_slots=4))


def candidates_of(adapters: dict, explicit: bool = True) -> list[Candidate]:
    return [Candidate(f"{name}@1", f"sha-{name}", a, explicit) for name, a in sorted(adapters.items())]


def test_the_probe_is_a_phase_of_the_scheduler_loop(engine, tokenizer, monkeypatch):
    import threading

    from adapters_zoo.errors import ServiceUnavailable
    from serving.generation import SamplingParams
    from serving.scheduler import GenerationRequest, Scheduler, SchedulerConfig, SchedulerObserver

    prompts = [tokenizer(t)["input_ids"] for t in ("probe one", "a longer probe of two")]
    direct = engine.probe(prompts, projections=True)  # no scheduler: on this thread
    threads, steps, finished = [], [], threading.Event()
    run_probe = engine.run_probe
    monkeypatch.setattr(engine, "run_probe",
                        lambda *args: (threads.append(threading.current_thread().name), run_probe(*args))[1])

    class Steps(SchedulerObserver):
        def on_step(self, phase: str, rows: int, seconds: float) -> None:
            steps.append((phase, rows))

    scheduler = Scheduler(engine, SchedulerConfig(max_batch=4), Steps()).start()
    try:
        decoding = GenerationRequest(prompts[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        scheduler.submit(decoding, lambda event: event.kind == "done" and finished.set())
        via = engine.probe(prompts, projections=True)
        assert finished.wait(60), "the generation decoding meanwhile finishes"
    finally:
        scheduler.stop()
    assert threads == ["specfuse-scheduler"] and ("probe", 2) in steps and ("decode", 1) in steps
    torch.testing.assert_close(via.features, direct.features, rtol=0, atol=0)
    for layer, h in direct.projections.items():
        torch.testing.assert_close(via.projections[layer], h, rtol=0, atol=0)
    assert engine.prober is None, "a stopped scheduler runs no more probes"
    with pytest.raises(ServiceUnavailable):
        scheduler.probe(prompts)


def test_probe_features_equal_the_signature_features_and_ignore_padding(engine, model, tokenizer):
    from adapters_zoo.signatures import prompt_features

    texts = ["back:ABC=", "order:95341=", "x"]
    probe = engine.probe([tokenizer(t)["input_ids"] for t in texts], projections=True)
    torch.testing.assert_close(probe.features, prompt_features(model, tokenizer, texts), rtol=1e-5, atol=1e-5)
    alone = engine.probe([tokenizer(texts[2])["input_ids"]], projections=True)
    layers = engine.basis.layer_names()
    torch.testing.assert_close(probe.layer_inputs(2, layers), alone.layer_inputs(0, layers), rtol=1e-4, atol=1e-5)
    assert probe.layer_inputs(2, layers).shape == (len(layers), 2, engine.basis.rank)  # <s> x


def test_a_rendered_chat_prompt_pools_alike_as_a_signature_and_as_a_served_request(engine, model, tokenizer):
    """The tokenizer adds BOS and its chat template renders one too: the signature path and the
    server's chat encoding must both see one BOS, so a signature and a request's probe agree."""
    from adapters_zoo.signatures import prompt_features

    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                              add_generation_prompt=True) for c in ("ab", "order:95341")]
    assert all(t.startswith(tokenizer.bos_token) for t in rendered)
    served = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in rendered]  # as serving encodes chat
    assert all(ids[:2] == [tokenizer.bos_token_id, ids[1]] and ids[1] != tokenizer.bos_token_id for ids in served)
    probe = engine.probe(served)
    torch.testing.assert_close(prompt_features(model, tokenizer, rendered), probe.features, rtol=1e-5, atol=1e-5)


def test_prototype_router_picks_each_task_adapter(engine, tokenizer, task_adapters):
    router = AutoRouter(engine)
    candidates = candidates_of(task_adapters)
    for name in TASKS:
        prompts = [tokenizer(p)["input_ids"] for p in task_prompts(name, "test", 12)]
        decisions = router.route(prompts, AutoSpec(), candidates)
        assert [d.pairs for d in decisions] == [[(f"{name}@1", 1.0)]] * len(prompts), name
        assert all(d.scores[f"{name}@1"] == max(d.scores.values()) for d in decisions)
    assert router.routed == 4 * 12 and router.to_base == 0


def test_the_base_competes_with_its_own_signature(engine, model, tokenizer, task_adapters):
    """A candidate must outscore the base's signature (its features of BASE_PROMPTS) by base_margin."""
    router = AutoRouter(engine)
    candidates = candidates_of(task_adapters)
    expected = signature_from_prompts(model, tokenizer, list(BASE_PROMPTS))  # no chat template: the plain texts
    torch.testing.assert_close(router.base_signature(), expected, rtol=1e-5, atol=1e-5)
    prompts = [tokenizer(p)["input_ids"] for p in task_prompts("sort_digits", "test", 4)]
    general = [tokenizer(p)["input_ids"] for p in BASE_PROMPTS[:4]]
    features = engine.probe(prompts + general).features
    base = prototype_scores(features, expected[None])[:, 0]
    decisions = router.route(prompts + general, AutoSpec(threshold=-1.0), candidates)
    assert [d.base_score for d in decisions] == pytest.approx(base.tolist(), abs=1e-5)
    assert [bool(d.pairs) for d in decisions] == [max(d.scores.values()) >= d.base_score for d in decisions]
    assert [d.pairs[0][0] for d in decisions[:4]] == ["sort_digits@1"] * 4 and not any(d.pairs for d in decisions[4:])
    lead = min(max(d.scores.values()) - d.base_score for d in decisions[:4])  # > 0: the task prompts route
    below = router.route(prompts, AutoSpec(threshold=-1.0, base_margin=lead - 1e-3), candidates)
    above = router.route(prompts, AutoSpec(threshold=-1.0, base_margin=lead + 1e-3), candidates)
    assert all(d.pairs for d in below) and not all(d.pairs for d in above)  # the closest call falls back
    assert all(d.pairs for d in router.route(general, AutoSpec(threshold=-1.0, base_margin=-2.0), candidates))
    assert all(d.base_score is None for d in router.route(general, AutoSpec("spectral"), candidates))


def test_the_base_signature_reads_general_requests_as_chat_when_the_model_has_a_template(model, tokenizer, basis):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    engine = Engine(copy.deepcopy(model), chat, basis, EngineConfig(slots=2, residual_slots=1))
    ids = [chat(f"<user>{p}<assistant>", add_special_tokens=False)["input_ids"] for p in BASE_PROMPTS]
    expected = signature_from_features(engine.probe(ids).features)
    torch.testing.assert_close(AutoRouter(engine).base_signature(), expected, rtol=1e-6, atol=1e-6)
    plain = signature_from_features(engine.probe([chat(p)["input_ids"] for p in BASE_PROMPTS]).features)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the template is what is read


def test_spectral_router_picks_adapters_built_on_each_tasks_directions(engine, tokenizer, basis):
    """Adapter j's core reads the directions in which task j's tokens differ from the others' (per layer)."""
    from adapters_zoo.format import new_adapter

    layers = basis.layer_names()
    means = {}
    for name in TASKS:
        probe = engine.probe([tokenizer(p)["input_ids"] for p in task_prompts(name, "train", 32)], projections=True)
        h = torch.cat([torch.nn.functional.normalize(probe.layer_inputs(i, layers), dim=-1) for i in range(32)], 1)
        means[name] = h.mean(1)  # (L, k)
    adapters = {}
    for name in TASKS:
        a = new_adapter("core", {}, basis)
        others = torch.stack([means[o] for o in TASKS if o != name]).mean(0)
        for li, layer in enumerate(layers):
            q = torch.nn.functional.normalize(means[name][li] - others[li], dim=0)  # (k,)
            a.params[layer]["C"] = torch.outer(q, q)  # one input direction: C = q qᵀ
        adapters[name] = a
    router = AutoRouter(engine)
    candidates = candidates_of(adapters)
    hits = 0
    for name in TASKS:
        prompts = [tokenizer(p)["input_ids"] for p in task_prompts(name, "test", 12)]
        hits += sum(d.pairs[0][0] == f"{name}@1" for d in router.route(prompts, AutoSpec("spectral"), candidates))
    assert hits == 4 * 12


# --------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def home(tmp_path_factory, model, tokenizer, basis, task_adapters, make_adapter):
    home = tmp_path_factory.mktemp("routing-home")
    save_model(model, tokenizer, home / "base")
    with Registry(home) as registry:
        registry.add_basis(basis)
        for name, adapter in task_adapters.items():
            registry.add(adapter, name, tags=["routed"])
        registry.add(make_adapter("svft", {"pattern": "banded", "d": 1}, basis, 7), "plain", tags=["unsigned"])
    return home


@pytest.fixture(scope="module")
def service(home):
    with build_service(ServerSettings(home / "base", home, device="cpu", slots=12, residual_slots=4,
                                      max_batch=32, max_prompt_tokens=64, max_tokens=64, max_mixture=4)) as service:
        yield service


@pytest.fixture(scope="module")
def server(service):
    with ServerThread(create_app(service)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def complete(client, model, prompt, max_tokens=6, **extra):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True, **extra})
    return [c.text for c in sorted(r.choices, key=lambda c: c.index)] if isinstance(prompt, list) else r.choices[0].text


ROUTED = {"auto": {"tag": "routed"}}  # the signed task adapters only


def test_auto_serves_the_adapter_it_chose_and_equals_the_reference(client, service, model, tokenizer, basis,
                                                                   task_adapters):
    for name in TASKS:
        prompt = task_prompts(name, "test", 1)[0]
        ids = tokenizer(prompt)["input_ids"]
        [decision] = service.route([ids], AutoSpec(tag="routed"))
        assert decision.pairs == [(f"{name}@1", 1.0)]
        got = complete(client, "base", prompt, adapters=ROUTED)
        assert got == complete(client, f"{name}@1", prompt)
        expected = reference_generate(model, basis, ids, [(task_adapters[name], 1.0)], max_tokens=6)
        assert got == tokenizer.decode(expected, skip_special_tokens=True)
    # model "auto" routes over every adapter of the base; the unsigned one is skipped by the prototype router
    prompt = task_prompts("sort_digits", "test", 1)[0]
    assert complete(client, "auto", prompt) == complete(client, "sort_digits", prompt)


def test_the_routed_mixture_reaches_the_engine_without_another_registry_read(service, tokenizer, monkeypatch):
    from serving.generation import SamplingParams
    from serving.preparation import Job

    prompt = task_prompts("count_stars", "test", 1)[0]
    routed = Job("completion", "base", [prompt], None, SamplingParams(max_tokens=2), 1, False, False, ROUTED,
                 None, None)
    _, [first] = service.prepare(routed)  # candidates parsed and cached by content hash
    assert first.key.pairs == (("count_stars@1", 1.0),)
    assert first.key.digests == (service.registry.get("count_stars@1").sha256,)
    calls: list[str] = []
    get = service.registry.get
    monkeypatch.setattr(service.registry, "get", lambda ref: (calls.append(ref), get(ref))[1])
    _, [again] = service.prepare(routed)
    assert again is first and calls == [], "the router's choice is resolved already: no registry read"


def test_each_prompt_of_a_request_is_routed_on_its_own(client):
    prompts = [task_prompts(name, "test", 2)[1] for name in TASKS]
    got = complete(client, "auto", prompts, n=1)
    assert got == [complete(client, name, p) for name, p in zip(TASKS, prompts)]


def test_auto_in_a_mixed_batch_equals_auto_alone_and_explicit_requests_are_unchanged(client, service, model,
                                                                                     tokenizer, basis, task_adapters):
    auto_prompts = [p for name in TASKS for p in task_prompts(name, "test", 3)]
    explicit = [("reverse_upper:0.5,count_stars:0.5", "hello"), ("sort_digits", "order:31="), ("base", "abc"),
                ("close_brackets@1", "shut:((=")]
    alone_auto = [complete(client, "auto", p) for p in auto_prompts]
    alone_explicit = [complete(client, m, p) for m, p in explicit]
    routed = service.router.routed
    with ThreadPoolExecutor(max_workers=16) as pool:  # everything in flight at once: shared batches
        futures = [pool.submit(complete, client, "auto", p) for p in auto_prompts]
        futures += [pool.submit(complete, client, m, p) for m, p in explicit for _ in range(2)]
        results = [f.result() for f in futures]
    assert results[: len(auto_prompts)] == alone_auto
    assert results[len(auto_prompts):] == [t for t in alone_explicit for _ in range(2)]
    assert service.router.routed == routed + len(auto_prompts), "explicit requests are never routed"
    # and an explicit request still equals its dense reference
    ids = tokenizer("hello")["input_ids"]
    mix = [(task_adapters["reverse_upper"], 0.5), (task_adapters["count_stars"], 0.5)]
    expected = reference_generate(model, basis, ids, mix, max_tokens=6)
    assert alone_explicit[0] == tokenizer.decode(expected, skip_special_tokens=True)


def test_the_response_names_the_mixture_each_prompt_was_served_with(server):
    prompts = [task_prompts("count_stars", "test", 1)[0], task_prompts("reverse_upper", "test", 1)[0]]
    body = {"model": "auto", "prompt": prompts, "max_tokens": 2}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["x-specfuse-mixture"] == "count_stars@1:1;reverse_upper@1:1"
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "prompt": prompts[1], "stream": True},
                      timeout=30) as stream:
        assert stream.headers["x-specfuse-mixture"] == "reverse_upper@1:1"
    explicit = httpx.post(server.url + "/v1/completions", json={**body, "model": "base", "adapters": {
        "count_stars": 0.5, "sort_digits": 0.5}}, timeout=30)
    assert explicit.headers["x-specfuse-mixture"] == "count_stars@1:0.5,sort_digits@1:0.5"  # one for every prompt
    assert httpx.post(server.url + "/v1/completions", json={**body, "model": "base"},
                      timeout=30).headers["x-specfuse-mixture"] == "base"


def test_threshold_falls_back_to_the_base_model(client, service):
    prompt = task_prompts("count_stars", "test", 1)[0]
    before = service.router.to_base
    got = complete(client, "base", prompt, adapters={"auto": {"tag": "routed", "threshold": 1.0}})
    assert got == complete(client, "base", prompt) and service.router.to_base == before + 1


def test_spectral_router_needs_no_signature(client, service):
    prompt = task_prompts("reverse_upper", "test", 1)[0]
    [decision] = service.route([service.engine.tokenizer(prompt)["input_ids"]],
                               AutoSpec("spectral", candidates=("plain", "sort_digits")))
    assert set(decision.scores) == {"plain@1", "sort_digits@1"} and len(decision.pairs) == 1
    got = complete(client, "base", prompt, adapters={"auto": {"router": "spectral", "candidates": ["plain",
                                                                                                   "sort_digits"]}})
    assert got == complete(client, decision.pairs[0][0], prompt)


def test_top_m_mixes_the_best_adapters(client, service):
    prompt = task_prompts("close_brackets", "test", 1)[0]
    options = {"tag": "routed", "top_m": 2, "temperature": 0.05}
    [decision] = service.route([service.engine.tokenizer(prompt)["input_ids"]], AutoSpec(**options))
    assert decision.pairs[0][0] == "close_brackets@1" and sum(w for _, w in decision.pairs) == pytest.approx(1)
    mixture = ",".join(f"{ref}:{w}" for ref, w in decision.pairs)
    assert complete(client, "base", prompt, adapters={"auto": options}) == complete(client, mixture, prompt)


@pytest.mark.parametrize("body, status, param, text", [
    ({"adapters": {"auto": {"candidates": []}}}, 400, "adapters.auto.candidates", "empty"),
    ({"adapters": {"auto": {"tag": "nothing-has-this"}}}, 400, "adapters.auto.tag", "no adapter"),
    ({"adapters": {"auto": {"candidates": ["plain", "sort_digits"]}}}, 400, "adapters.auto.candidates",
     "specfuse registry sign"),
    ({"adapters": {"auto": {"tag": "unsigned"}}}, 400, "adapters.auto", "signature"),
    ({"adapters": {"auto": {"candidates": ["missing"]}}}, 404, None, "missing"),
    ({"adapters": {"auto": {"top_m": 8}}}, 400, "adapters.auto.top_m", "at most 4"),
    ({"adapters": {"auto": {"router": "oracle"}}}, 400, "adapters.auto.router", "unknown router"),
    ({"adapters": {"auto": {"topm": 1}}}, 400, "adapters.auto.topm", "unknown routing option"),
    ({"model": "auto", "adapters": {"sort_digits": 1.0}}, 400, None, "picks the adapters itself"),
    ({"model": "sort_digits", "adapters": "auto"}, 400, None, "not both"),
])
def test_bad_auto_requests_are_clear_errors(server, body, status, param, text):
    payload = {"model": "base", "prompt": "order:12=", "max_tokens": 2, **body}
    r = httpx.post(server.url + "/v1/completions", json=payload, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert text in error["message"] and error["param"] == param


def test_models_list_auto(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["base", "auto"] and client.models.retrieve("auto").id == "auto"


def test_chat_and_stream_route_too(client):
    prompt = task_prompts("sort_digits", "test", 1)[0]
    chat = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=6,
                                          temperature=0, extra_body={"ignore_eos": True})
    direct = client.chat.completions.create(model="sort_digits", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == direct.choices[0].message.content
    stream = client.completions.create(model="auto", prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == complete(client, "sort_digits", prompt)


def test_metrics_count_routed_prompts(server, service):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert f"specfuse_routed_prompts_total {service.router.routed}" in text
    assert "specfuse_routed_to_base_total" in text


# --------------------------------------------------------------------------- specfuse registry sign


def test_registry_sign_adds_a_signed_version(tmp_path, model, tokenizer, basis, make_adapter,
                                                               capsys):
    from serving.cli import main

    home = tmp_path / "home"
    model_dir = save_model(model, tokenizer, tmp_path / "base")
    with Registry(home) as registry:
        registry.add_basis(basis)
        registry.add(make_adapter("scale", {"rank": 8}, basis, 3), "imported", tags=["peft"],
                     metrics={"acc": 0.5}, description="from PEFT")
    task = next(t for t in suite_tasks("compatible") if t.name == "count_stars")
    data = write_jsonl(tmp_path / "sample.jsonl", make_split(task, "train", 40))
    assert main(["registry", "sign", "imported", "--data", str(data), "--model", str(model_dir), "--home", str(home),
                 "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["ref"] == "imported@2" and rec["tags"] == ["peft"] and rec["metrics"] == {"acc": 0.5}
    with Registry(home) as registry:
        signed, unsigned = registry.load("imported@2"), registry.load("imported@1")
        assert "signature" not in unsigned.meta
        expected = signature_from_prompts(model, tokenizer, task_prompts("count_stars", "train", 40))
        torch.testing.assert_close(torch.tensor(signed.meta["signature"]), expected, atol=1e-6, rtol=0)
        for name in unsigned.params:  # same tensors
            for p, t in unsigned.params[name].items():
                assert torch.equal(t, signed.params[name][p])

    other = save_model(build_tiny_model(5), tokenizer, tmp_path / "other")
    capsys.readouterr()
    assert main(["registry", "sign", "imported", "--data", str(data), "--model", str(other), "--home", str(home)]) == 2
    assert "another base" in error_line(capsys.readouterr().err)
    assert main(["registry", "sign", "imported", "--data", str(tmp_path / "none.jsonl"), "--model", str(model_dir),
                 "--home", str(home)]) == 2
    assert "not found" in error_line(capsys.readouterr().err)


def error_line(err: str) -> str:
    """The one error line of a failed command (progress bars may precede it on stderr), never a traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("specfuse registry: error: "), err
    return lines[-1]
