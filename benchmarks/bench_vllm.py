"""vLLM beside specfuse on the real base: greedy agreement, then throughput with distinct adapters per batch.

Both engines serve the demo registry (SmolLM2-135M-Instruct, its k = 32 basis, the eight
shipped task adapters) from their own processes over HTTP, one after the other in one run,
on the same machine, threads and requests; the vLLM server is the one ``specfuse vllm-args``
prints (every adapter a ``--lora-modules`` entry, mixtures resolved by the specfuse plugin).

  agree      each demo adapter on its own task's test prompts and five mixtures on their
             components' prompts, greedy, up to 32 tokens, stopping at end of turn: the texts of
             the two engines compared; for each prompt that differs, the reference model
             (dense W + Σ w ΔW, fp32) scores the first token where they part: the top-2 logit
             margin there names a near-tie
  speed      16 requests at once, 32 prompt tokens, exactly 32 generated (eos ignored), greedy:
             base; 1, 4 and 16 distinct adapters per batch (16 distinct 2-adapter mixtures of the
             demo's adapters, all resolved before timing: vLLM's exported LoRAs loaded, specfuse's
             mixtures cached); rounds interleave base and adapter runs, each engine's ratio is to
             its own base runs in the same rounds

    python benchmarks/bench_vllm.py --vllm /path/to/vllm-venv/bin/vllm          # ~25 min on 2 cores
    python benchmarks/bench_vllm.py --vllm ... --agree-only --per-model 4         # the agreement alone

Results: ``benchmarks/results/smollm2/serving_vllm_cpu.{json,md,png}`` (agreement:
``vllm_agreement.{json,md}``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from common import RESULTS, environment, environment_line, set_threads, write_results  # noqa: E402
from vllm_peer import completions, cpu_seconds, specfuse_server, vllm_server  # noqa: E402

MIXTURES = [  # mixtures of the demo adapters: the first weight is the task asked
    "order_date_iso:0.8,name_last_first:0.2",
    "contact_json:0.6,email_domain_json:0.4",
    "total_cents:0.7,items_bullets:0.3",
    "job_upper:0.5,phone_digits:0.5",
    "order_date_iso:0.5,total_cents:0.3,contact_json:0.2",
]
DISTINCT = (1, 4, 16)


def demo_prompts(tokenizer, task_name: str, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` test prompts of a demo task, as the chat template renders them, in token ids."""
    from adapters_zoo.tasks.chat import chat_task, make_chat_split, prompt_messages, render_prompt

    examples = make_chat_split(chat_task(task_name), "test", n, seed=seed)
    return [tokenizer(render_prompt(tokenizer, prompt_messages(ex)), add_special_tokens=False)["input_ids"]
            for ex in examples]


def agreement_plan(tokenizer, names: list[str], per_model: int) -> list[tuple[str, list[int]]]:
    """(model, prompt) pairs: every adapter on its task, every mixture on its first component's task."""
    plan = []
    for name in names:
        plan += [(name, p) for p in demo_prompts(tokenizer, name, per_model)]
    for mixture in MIXTURES:
        first = mixture.split(",")[0].split(":")[0]
        plan += [(mixture, p) for p in demo_prompts(tokenizer, first, per_model, seed=1)]
    return plan


def first_split(tokenizer, a: str, b: str) -> tuple[list[int], int, int]:
    """(common token prefix, a's next token, b's next token) of two generated texts."""
    ta = tokenizer(a, add_special_tokens=False)["input_ids"] + [-1]
    tb = tokenizer(b, add_special_tokens=False)["input_ids"] + [-1]
    i = next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y)
    return ta[:i], ta[i], tb[i]


def margin_at(model, basis, registry, mixture: str, ids: list[int], picks: tuple[int, int]) -> dict:
    """The reference model's top-2 logits after ``ids`` under ``mixture``, and the two engines' picks' logits."""
    import torch

    from adapters_zoo.registry.mixture import parse_mixture
    from serving.reference import reference_logits

    pairs = [(registry.load(ref), w) for ref, w in parse_mixture(mixture)]
    with torch.no_grad():
        logits = reference_logits(model, basis, ids, pairs).float()
    top = torch.topk(logits, 2)
    pick = {f"logit_{name}": (round(float(logits[t]), 4) if t >= 0 else None) for name, t in zip(("specfuse", "vllm"),
                                                                                                 picks)}
    return {"top1": int(top.indices[0]), "top2": int(top.indices[1]),
            "margin": round(float(top.values[0] - top.values[1]), 4), **pick}


def run_agreement(args, home: Path, model_dir: Path) -> dict:
    import torch

    from adapters_zoo.registry import Registry, basis_for_model
    from serving.engine import load_model_dir

    model, tokenizer = load_model_dir(model_dir)
    model = model.float().eval()
    with Registry(home) as registry:
        names = sorted({r.name for r in registry.compatible(basis_for_model(registry, model_dir).fingerprint)})
    plan = agreement_plan(tokenizer, names, args.per_model)
    models, prompts = [m for m, _ in plan], [p for _, p in plan]
    answers = {}
    for engine in ("specfuse", "vllm"):
        server = specfuse_server(home, model_dir, args.threads) if engine == "specfuse" else \
            vllm_server(args.vllm, home, model_dir, args.threads, args.kv_cache_gib)
        with server as (url, _):
            got = []
            for i in range(0, len(plan), 16):  # 16 at a time, as a client pool would send them
                got += completions(url, models[i:i + 16], prompts[i:i + 16], args.max_tokens)[0]
            answers[engine] = got
        print(f"agree: {engine} answered {len(got)}", flush=True)
    rows, differ = [], []
    with Registry(home) as registry:
        basis = basis_for_model(registry, model_dir)
        for i, (m, p) in enumerate(plan):
            a, b = answers["specfuse"][i], answers["vllm"][i]
            row = {"model": m, "prompt_tokens": [a.prompt_tokens, b.prompt_tokens], "specfuse": a.text,
                   "vllm": b.text, "equal": a.text == b.text}
            if not row["equal"]:
                common, ta, tb = first_split(tokenizer, a.text, b.text)
                row["split_at_token"] = len(common)
                row["reference"] = margin_at(model, basis, registry, m, p + common, (ta, tb))
                row["reference"]["agrees_with"] = [e for e, t in (("specfuse", ta), ("vllm", tb))
                                                   if t == row["reference"]["top1"]]
                differ.append(row)
            rows.append(row)
    torch.set_num_threads(args.threads)
    equal = sum(r["equal"] for r in rows)
    return {"prompts": len(rows), "equal": equal, "rate": round(equal / len(rows), 4), "max_tokens": args.max_tokens,
            "models": sorted(set(models)), "differ": differ, "rows": rows}


def mixture_set(names: list[str], count: int, seed: int = 0) -> list[str]:
    """``count`` distinct 2-adapter mixtures of ``names``."""
    rng = random.Random(seed)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    rng.shuffle(pairs)
    return [f"{a}:0.6,{b}:0.4" for a, b in pairs[:count]]


def speed_rows(url: str, proc, engine: str, base_model: str, mixtures: list[str], prompts: list[list[int]],
               max_tokens: int, rounds: int) -> list[dict]:
    """Interleaved rounds: base, then 1, 4, 16 distinct adapters per batch, then base again."""
    n = len(prompts)
    plans = {0: [base_model] * n, **{d: [mixtures[i % d] for i in range(n)] for d in DISTINCT}}
    for models in plans.values():  # warm-up: vLLM loads the LoRAs, specfuse fuses and caches the mixtures
        completions(url, models, prompts, max_tokens, ignore_eos=True)
    rows = []
    order = [0] + [d for _ in range(rounds) for d in (*DISTINCT, 0)]
    for d in order:
        cpu = cpu_seconds(proc)
        done, wall = completions(url, plans[d], prompts, max_tokens, ignore_eos=True)
        tokens = sum(c.completion_tokens for c in done)
        assert tokens == n * max_tokens, f"{engine}: {tokens} tokens generated, asked {n * max_tokens}"
        rows.append({"engine": engine, "distinct": d, "tokens": tokens, "wall_s": round(wall, 3),
                     "tokens_per_s": round(tokens / wall, 1), "cpu_s": round(cpu_seconds(proc) - cpu, 2),
                     "p50_s": round(statistics.median(c.seconds for c in done), 3)})
        print(f"speed: {engine} distinct={d}: {rows[-1]['tokens_per_s']} tok/s", flush=True)
    bases = [i for i, r in enumerate(rows) if r["distinct"] == 0]
    for i, row in enumerate(rows):
        near = [j for j in bases if j != i and abs(j - i) <= len(DISTINCT) + 1] if row["distinct"] == 0 else \
            [max(j for j in bases if j < i), min(j for j in bases if j > i)]
        row["ratio_to_base"] = round(statistics.mean(rows[j]["tokens_per_s"] for j in near) / row["tokens_per_s"], 3)
    return rows


def served_base(url: str) -> str:
    """The base model's id as the server lists it (vLLM names it by the directory it loaded:
    the model view without the basis, not the model directory itself); LoRAs have a parent."""
    import httpx

    models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    return next(m["id"] for m in models if not m.get("parent"))


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for engine in ("specfuse", "vllm"):
        for d in (0, *DISTINCT):
            sel = [r for r in rows if r["engine"] == engine and r["distinct"] == d]
            if sel:
                out.append({"engine": engine, "distinct": d, "runs": len(sel),
                            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in sel), 1),
                            "ratio_to_base": round(statistics.median(r["ratio_to_base"] for r in sel), 3),
                            "cpu_ms_per_token": round(1000 * statistics.median(r["cpu_s"] / r["tokens"] for r in sel),
                                                      2)})
    return out


def run_speed(args, home: Path, model_dir: Path) -> list[dict]:
    from adapters_zoo.registry import Registry, basis_for_model
    from serving.engine import load_model_dir

    _, tokenizer = load_model_dir(model_dir)
    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(tokenizer.vocab_size) if t not in special]
    prompts = [[rng.choice(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    with Registry(home) as registry:
        names = sorted({r.name for r in registry.compatible(basis_for_model(registry, model_dir).fingerprint)})
    mixtures = mixture_set(names, max(DISTINCT))
    rows = []
    with vllm_server(args.vllm, home, model_dir, args.threads, args.kv_cache_gib) as (url, proc):
        rows += speed_rows(url, proc, "vllm", served_base(url), mixtures, prompts, args.speed_tokens, args.rounds)
    with specfuse_server(home, model_dir, args.threads) as (url, proc):
        rows += speed_rows(url, proc, "specfuse", "base", mixtures, prompts, args.speed_tokens, args.rounds)
    return rows


def vllm_version(vllm_bin: str) -> str:
    python = Path(vllm_bin).with_name("python")
    out = subprocess.run([str(python), "-c", "import vllm, torch, transformers; print(vllm.__version__, "
                          "torch.__version__, transformers.__version__)"], capture_output=True, text=True, timeout=300)
    return out.stdout.strip()


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# vLLM beside specfuse on {result['base']}", "", environment_line(env),
             f"vLLM (torch, transformers in its venv): {result['vllm']}", "", f"`{result['command']}`", ""]
    agree = result.get("agreement")
    if agree:
        lines += [f"## Greedy agreement: {agree['equal']}/{agree['prompts']} prompts equal ({agree['rate']:.1%})", "",
                  f"Up to {agree['max_tokens']} tokens, stopping at end of turn; models: "
                  + ", ".join(f"`{m}`" for m in agree["models"]), ""]
        if agree["differ"]:
            lines += ["| model | at token | reference top-2 margin | reference agrees with | specfuse | vLLM |",
                      "|---|---:|---:|---|---|---|"]
            for r in agree["differ"]:
                ref = r["reference"]
                lines.append(f"| `{r['model']}` | {r['split_at_token']} | {ref['margin']} | "
                             f"{', '.join(ref['agrees_with']) or 'neither'} | {json.dumps(r['specfuse'])[:60]} | "
                             f"{json.dumps(r['vllm'])[:60]} |")
            lines.append("")
    if result.get("summary"):
        lines += ["## Throughput: 16 concurrent requests, 32 prompt + 32 generated tokens, greedy", "",
                  "| engine | distinct adapters per batch | tokens/s | ratio to own base (time/token) | "
                  "CPU ms/token | runs |", "|---|---:|---:|---:|---:|---:|"]
        for r in result["summary"]:
            lines.append(f"| {r['engine']} | {r['distinct'] or 'base'} | {r['tokens_per_s']} | {r['ratio_to_base']} |"
                         f" {r['cpu_ms_per_token']} | {r['runs']} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, marker in (("specfuse", "o"), ("vllm", "s")):
        sel = [r for r in summary if r["engine"] == engine]
        xs = [r["distinct"] for r in sel]
        ax1.plot(xs, [r["tokens_per_s"] for r in sel], marker=marker, label=engine)
        ax2.plot(xs, [r["ratio_to_base"] for r in sel], marker=marker, label=engine)
    ax1.set(xlabel="distinct adapters per batch (0 = base)", ylabel="tokens/s", title="throughput")
    ax2.set(xlabel="distinct adapters per batch (0 = base)", ylabel="time per token / own base",
            title="cost of adapters")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm", required=True, help="the `vllm` executable of a vLLM install (its own venv)")
    p.add_argument("--home", default=os.environ.get("SPECFUSE_HOME"), help="the demo registry (specfuse demo's home)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument("--per-model", type=int, default=8, help="agreement prompts per adapter and per mixture")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--agree-only", action="store_true")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "smollm2"))
    args = p.parse_args(argv)
    from serving.demo import demo_home, prepare_demo

    set_threads(args.threads)
    home = Path(args.home).expanduser() if args.home else demo_home()
    model_dir = prepare_demo(home, progress=False)
    result = {"base": "smollm2-135m-instruct", "environment": environment(), "vllm": vllm_version(args.vllm),
              "command": "python benchmarks/bench_vllm.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "threads": args.threads, "kv_cache_gib": args.kv_cache_gib}
    out = Path(args.out)
    t0 = time.time()
    if not args.speed_only:
        result["agreement"] = run_agreement(args, home, model_dir)
        write_results("vllm_agreement", result, markdown(result), out)
        print(f"agreement: {result['agreement']['equal']}/{result['agreement']['prompts']}", flush=True)
    if not args.agree_only:
        agreement = result.pop("agreement", None)
        result["rows"] = run_speed(args, home, model_dir)
        result["summary"] = summarize(result["rows"])
        result["agreement_rate"] = agreement and agreement["rate"]
        write_results("serving_vllm_cpu", result, markdown(result), out)
        plot(result["summary"], out / "serving_vllm_cpu.png")
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
