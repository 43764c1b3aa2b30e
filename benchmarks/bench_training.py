"""Training cost and quality: each spectral kind against PEFT LoRA, at equal steps and at equal wall time.

The spectral-adapter papers (SpecLoRA arXiv 2505.23099, SVFT arXiv 2405.19597, Spectral
Adapter arXiv 2405.13952) claim near-LoRA quality at a fraction of LoRA's trainable
parameters. On the real base (SmolLM2-135M-Instruct) this script measures where that holds:

- **equal steps**: the zoo's rows (every task × kind, and PEFT LoRA rank 4, each trained with
  the same 24 steps of batch 8 on the same data; read with the zoo's own reader, nothing
  retrained): test accuracy, trainable parameters, file bytes, training seconds;
- **cost per step**: for a few tasks, each kind and LoRA trained for a few steps in a fresh
  subprocess: wall and CPU seconds per step, and peak memory as the process's resident-set high-water
  mark (``VmHWM`` in ``/proc/self/status``: model, basis, activations, gradients and optimizer
  state; torch's allocations are invisible to ``tracemalloc``, and ``ru_maxrss`` of a forked child
  starts at its parent's size);
- **equal wall time**: on those tasks, PEFT LoRA trained for the time each kind needs for its
  24 steps (LoRA steps = 24 × kind CPU s/step ÷ LoRA CPU s/step, on the same train split),
  scored on the same test split. Time is the process's CPU time (``time.process_time``): on a
  shared machine other jobs stretch wall times unevenly, CPU time much less; on an idle
  machine the two are proportional.

Writes ``benchmarks/results/smollm2/training{_quick}.{json,md,png}``; probes and LoRA runs are
cached in ``benchmarks/results/tmp/training/`` (a rerun reuses them).

    python benchmarks/bench_training.py [--zoo /work/zoo-smollm2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_spectra: spinning threads on a busy machine

from common import RESULTS, SCRATCH, environment, environment_line, read_cached, set_threads, write_cached  # noqa: E402

from adapters_zoo.zoo import (  # noqa: E402
    KIND_SETTINGS,
    PEFT_LR,
    ZooEntry,
    ZooSettings,
    _build_peft,
    _data_digest,
    _finished,
    _lr,
    _split,
    _suite_tasks,
)

SPECTRAL_KINDS = ("scale", "svft", "rotation", "additive")
LORA = "peft-lora"
# "near-LoRA quality": within this many accuracy points of LoRA on the same task
NEAR = 0.05
PROBE_FIELDS = ("suite", "task", "kind", "steps", "params", "seconds_per_step", "cpu_seconds_per_step", "rss_peak_mb",
                "threads")  # what a probe reports (older cached probes may carry more)


@dataclass
class Settings:
    zoo: ZooSettings
    kinds: tuple[str, ...] = SPECTRAL_KINDS
    timed_tasks: tuple[str, ...] = ("order_date_iso", "phone_digits")  # one per suite: probes and equal time
    probe_steps: int = 4
    # LoRA's equal-time steps are rounded to a multiple of this: kinds whose times differ by less than the
    # probes can tell (a few steps of a few seconds each) share one LoRA run
    step_multiple: int = 4
    work: Path = field(default_factory=lambda: SCRATCH / "training")
    out: Path = field(default_factory=lambda: RESULTS / "smollm2")
    stem: str = "training"
    note: str = ""  # shown under the title (e.g. what a partial run left out)


# ---------------------------------------------------------------- the zoo's rows (equal steps)


def _task(zoo: ZooSettings, name: str) -> tuple[str, Any]:
    for suite in zoo.suites:
        for task in _suite_tasks(zoo, suite):
            if task.name == name:
                return suite, task
    raise KeyError(f"task {name!r} is in none of the zoo's suites {zoo.suites}")


def _splits(zoo: ZooSettings, task) -> tuple[list[dict], list[dict]]:
    return _split(zoo, task, "train", zoo.n_train), _split(zoo, task, "test", zoo.n_eval)


def zoo_row(zoo: ZooSettings, suite: str, task, kind: str) -> ZooEntry | None:
    """The zoo's finished row for ``task`` × ``kind`` trained with the zoo's current settings, else None
    (not trained yet, or trained with other settings: a row the zoo itself would retrain)."""
    return _finished(zoo, suite, kind, task.name, _data_digest(*_splits(zoo, task)))


def equal_steps(settings: Settings) -> list[dict]:
    """Every finished zoo row of the kinds, LoRA and the base, task by task."""
    rows = []
    for suite in settings.zoo.suites:
        for task in _suite_tasks(settings.zoo, suite):
            for kind in ("base", *settings.kinds, LORA):
                entry = zoo_row(settings.zoo, suite, task, kind)
                if entry is not None:
                    rows.append(asdict(entry))
    return rows


# ---------------------------------------------------------------- cost per step (a subprocess each)


def _peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux): unlike ru_maxrss, it starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError("no VmHWM in /proc/self/status")


def probe(zoo: ZooSettings, task_name: str, kind: str, steps: int) -> dict:
    """Train ``kind`` (or PEFT LoRA) on the task's zoo split for ``steps`` steps in this process: seconds per
    step and peak resident memory. Meant for a fresh process, so the peak is this run's alone."""
    import torch

    from adapters_zoo.basis import load_basis
    from adapters_zoo.models import load_model_dir
    from adapters_zoo.train import train_adapter
    from adapters_zoo.train_config import TrainConfig
    from adapters_zoo.zoo import _deterministic, _peft_train, base_model_dir

    _deterministic(zoo.threads)  # as the zoo trains
    suite, task = _task(zoo, task_name)
    model, tokenizer = load_model_dir(base_model_dir(zoo, progress=False), "cpu")
    basis = load_basis(zoo.out / "basis.safetensors")
    train, _ = _splits(zoo, task)
    start, cpu_start = time.perf_counter(), time.process_time()
    if kind == LORA:
        _, _, params = _peft_train(model, tokenizer, train, steps, zoo.batch_size, zoo.seed, _lr(zoo, LORA, PEFT_LR))
    else:
        kind_config, lr = KIND_SETTINGS[kind]
        cfg = TrainConfig(kind=kind, kind_config=dict(kind_config, seed=zoo.seed), steps=steps, lr=_lr(zoo, kind, lr),
                          batch_size=zoo.batch_size, seed=zoo.seed, device="cpu", signature=False)
        adapter, _ = train_adapter(model, tokenizer, basis, train, cfg, progress=False, verify_basis=False)
        params = adapter.num_params()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"suite": suite, "task": task_name, "kind": kind, "steps": steps, "params": params,
            "seconds_per_step": seconds / steps, "cpu_seconds_per_step": cpu_seconds / steps,
            "rss_peak_mb": round(_peak_rss_mb(), 1), "threads": torch.get_num_threads()}  # fmt: skip


def _zoo_to_json(zoo: ZooSettings) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(zoo).items()}


def _zoo_from_json(record: dict) -> ZooSettings:
    fields = dict(record)
    fields["out"] = Path(fields["out"])
    fields["bases_home"] = Path(fields["bases_home"]) if fields["bases_home"] else None
    fields["suites"], fields["kinds"] = tuple(fields["suites"]), tuple(fields["kinds"])
    return ZooSettings(**fields)


def probed(settings: Settings, task_name: str, kind: str) -> dict:
    """``probe`` in a fresh subprocess (cached): a process of its own, so its peak memory is this run's."""
    key = {"zoo": _zoo_to_json(settings.zoo), "task": task_name, "kind": kind, "steps": settings.probe_steps}
    path = settings.work / "probes" / f"{task_name}-{kind}.json"
    done = read_cached(path, key)
    if done is not None:
        return done
    print(f"[probe] {task_name} {kind}: {settings.probe_steps} steps", file=sys.stderr)
    return write_cached(path, key, probe_in_subprocess({**key, "task": task_name}))


def probe_in_subprocess(spec: dict) -> dict:
    """``python bench_training.py --probe SPEC``: what ``probe`` returns, from a process of its own."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(spec)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- equal wall time


def lora_for_steps(settings: Settings, task_name: str, steps: int) -> dict:
    """PEFT LoRA trained ``steps`` steps on the task's zoo train split, scored on its test split (cached)."""
    zoo = dataclasses.replace(settings.zoo, out=settings.work / f"lora-{steps}", steps=steps)
    key = {"zoo": _zoo_to_json(settings.zoo), "task": task_name, "steps": steps}
    path = settings.work / "lora" / f"{task_name}-{steps}.json"
    done = read_cached(path, key)
    if done is not None:
        return done
    import torch

    from adapters_zoo.models import load_model_dir
    from adapters_zoo.zoo import _deterministic, base_model_dir

    print(f"[lora] {task_name}: {steps} steps", file=sys.stderr)
    previous = _deterministic(zoo.threads)
    try:
        suite, task = _task(zoo, task_name)
        model, tokenizer = load_model_dir(base_model_dir(settings.zoo, progress=False), "cpu")
        train, test = _splits(settings.zoo, task)  # the zoo's own splits, whatever the step count
        base = zoo_row(settings.zoo, suite, task, "base")
        entry = _build_peft(zoo, suite, task, model, tokenizer, train, test, base.accuracy if base else float("nan"))
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
    return write_cached(path, key, asdict(entry))


def equal_time(settings: Settings, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(probes, one row per timed task × kind: the kind at the zoo's steps against LoRA at the same wall time)."""
    zoo = settings.zoo
    probes, out = [], []
    for name in settings.timed_tasks:
        suite, task = _task(zoo, name)
        cost = {kind: {k: v for k, v in probed(settings, name, kind).items() if k in PROBE_FIELDS}
                for kind in (*settings.kinds, LORA)}
        probes += cost.values()
        lora_cpu = cost[LORA]["cpu_seconds_per_step"]
        zoo_lora = next((r for r in rows if r["task"] == name and r["kind"] == LORA), None)
        for kind in settings.kinds:
            # CPU time, not wall time: other jobs on a shared machine stretch wall times unevenly
            cpu = zoo.steps * cost[kind]["cpu_seconds_per_step"]
            steps = max(settings.step_multiple, settings.step_multiple * round(cpu / lora_cpu / settings.step_multiple))
            lora = zoo_lora if zoo_lora is not None and steps == zoo.steps else lora_for_steps(settings, name, steps)
            own = next((r for r in rows if r["task"] == name and r["kind"] == kind), None)
            out.append({"suite": suite, "task": name, "kind": kind, "kind_steps": zoo.steps,
                        "kind_accuracy": own["accuracy"] if own else None, "cpu_seconds": round(cpu, 1),
                        "lora_steps": steps, "lora_accuracy": lora["accuracy"],
                        "lora_accuracy_equal_steps": zoo_lora["accuracy"] if zoo_lora else None})  # fmt: skip
    return probes, out


# ---------------------------------------------------------------- report


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _f(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def summary(rows: list[dict], kinds: tuple[str, ...]) -> list[dict]:
    """Per kind, over the tasks where both it and LoRA have a row: accuracies, LoRA's, near-LoRA count."""
    lora = {r["task"]: r for r in rows if r["kind"] == LORA}
    out = []
    for kind in (*kinds, LORA):
        mine = [r for r in rows if r["kind"] == kind and r["task"] in lora]
        if not mine:
            continue
        near = [r["task"] for r in mine if r["accuracy"] >= lora[r["task"]]["accuracy"] - NEAR]
        out.append({"kind": kind, "tasks": len(mine), "accuracy": _mean([r["accuracy"] for r in mine]),
                    "lora_accuracy": _mean([lora[r["task"]]["accuracy"] for r in mine]), "near_lora": near,
                    "params": mine[0]["params"], "params_vs_lora": mine[0]["params"] / lora[mine[0]["task"]]["params"],
                    "bytes": _mean([r["bytes"] for r in mine]), "seconds": _mean([r["seconds"] for r in mine])})
    return out


def verdict(record: dict) -> list[str]:
    lines = []
    for s in record["summary"]:
        if s["kind"] == LORA:
            continue
        holds = len(s["near_lora"]) == s["tasks"]
        lines.append(
            f"`{s['kind']}` ({s['params']:,} parameters, {s['params_vs_lora']:.1%} of LoRA's"
            + ("; not a fraction, so this kind is outside the claim" if s["params_vs_lora"] >= 1 else "")
            + f"): mean accuracy "
            f"{_f(s['accuracy'])} vs LoRA {_f(s['lora_accuracy'])} over {s['tasks']} tasks; within {NEAR:.2f} of "
            f"LoRA (or above) on {len(s['near_lora'])}/{s['tasks']}"
            + (f" ({', '.join(s['near_lora'])})" if s["near_lora"] and not holds else "")
            + (": the claim holds here." if holds else ": the claim " + ("holds on these tasks only."
                                                                          if s["near_lora"] else "does not hold.")))
    timed = [r for r in record["equal_time"] if r["kind_accuracy"] is not None]
    if timed:
        ahead = [r for r in timed if r["kind_accuracy"] >= r["lora_accuracy"] - NEAR]
        lines.append(f"At equal wall time, a kind is within {NEAR:.2f} of LoRA (or above) in {len(ahead)} of "
                     f"{len(timed)} task × kind pairs; LoRA gets {min(r['lora_steps'] for r in timed)}–"
                     f"{max(r['lora_steps'] for r in timed)} steps in the time the kinds take for "
                     f"{timed[0]['kind_steps']}.")
    return lines


def markdown(record: dict) -> str:
    zoo = record["zoo"]
    kinds = [s["kind"] for s in record["summary"]]
    rows = record["equal_steps"]
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["kind"] != "base"))
    cell = {(r["task"], r["kind"]): r for r in rows}
    lines = [
        "# Training: spectral kinds vs PEFT LoRA, at equal steps and equal wall time",
        "",
        *([f"> {record['settings']['note']}", ""] if record["settings"].get("note") else []),
        "Claim tested (SpecLoRA arXiv 2505.23099, SVFT arXiv 2405.19597, Spectral Adapter arXiv 2405.13952): "
        "near-LoRA quality at a fraction of LoRA's trainable parameters. \"Near\": within "
        f"{NEAR:.2f} accuracy of LoRA on the same task, or above.",
        "",
        f"Setup: base `{zoo['base']}`, basis k = {zoo['rank']}; every adapter trained by the zoo "
        f"(`{zoo['out']}`) with {zoo['steps']} steps of batch {zoo['batch_size']} on {zoo['n_train']} examples, "
        f"warmup + cosine, seed {zoo['seed']}; test accuracy on {zoo['n_eval']} examples (greedy, the task's "
        "checker). Kind settings: " + ", ".join(f"`{k}` {v['config']} lr {v['lr']:g}"
                                              for k, v in record["kind_settings"].items() if k in kinds)
        + f"; PEFT LoRA rank {record['peft']['rank']}, alpha {record['peft']['alpha']:g}, lr "
          f"{record['peft']['lr']:g}, on q,k,v,o,gate,up,down.",
        "",
        f"Hardware: {environment_line(record['environment'])}.",
        "",
        f"Reproduce: `{record['command']}`",
        "",
        "## Where the claim holds",
        "",
        *[f"- {line}" for line in verdict(record)],
        "",
        f"## Equal steps ({zoo['steps']} × batch {zoo['batch_size']}): test accuracy",
        "",
        "| task | base | " + " | ".join(kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for task in tasks:
        base = cell.get((task, "base"))
        lines.append(f"| {task} | {_f(base['accuracy'] if base else None)} | "
                     + " | ".join(_f(cell[(task, k)]["accuracy"]) if (task, k) in cell else "–" for k in kinds) + " |")
    lines += ["", "Rows the zoo has not finished (or trained with other settings) show –; the summary below "
              "compares each kind with LoRA on the tasks where both have a row.", ""]
    lines += ["| kind | tasks | mean accuracy | LoRA on the same tasks | trainable params | vs LoRA | file bytes "
              "(mean) | zoo training s (mean) |", "|---|---|---|---|---|---|---|---|"]
    for s in record["summary"]:
        lines.append(f"| {s['kind']} | {s['tasks']} | {_f(s['accuracy'])} | {_f(s['lora_accuracy'])} | "
                     f"{s['params']:,} | {s['params_vs_lora']:.1%} | {s['bytes']:,.0f} | {s['seconds']:.0f} |")
    lines += ["", "Zoo training seconds are wall times of whole runs on a shared machine (other jobs ran beside "
              "them), and the spectral kinds' include computing the routing signature (a forward pass over 64 "
              "prompts); the probes below time the training steps alone, back to back.", ""]
    lines += ["## Cost per step and peak memory", "",
              f"Each kind and LoRA trained {record['settings']['probe_steps']} steps of batch {zoo['batch_size']} "
              "in a fresh process (no routing signature). Peak memory: the process's resident-set high-water mark "
              "at the end of training (base model, basis, activations, gradients, optimizer state; the float32 "
              "base alone is 540 MB).", "",
              "| task | kind | trainable params | wall s / step | CPU s / step | CPU vs LoRA | peak RSS (MB) |",
              "|---|---|---|---|---|---|---|"]
    lora_cpu = {p["task"]: p["cpu_seconds_per_step"] for p in record["probes"] if p["kind"] == LORA}
    for p in record["probes"]:
        lines.append(f"| {p['task']} | {p['kind']} | {p['params']:,} | {p['seconds_per_step']:.2f} | "
                     f"{p['cpu_seconds_per_step']:.2f} | {p['cpu_seconds_per_step'] / lora_cpu[p['task']]:.2f}× | "
                     f"{p['rss_peak_mb']:,.0f} |")
    lines += ["", "## Equal wall time", "",
              f"LoRA trained for the time a kind needs for its {zoo['steps']} steps (steps = {zoo['steps']} × kind "
              f"CPU s/step ÷ LoRA CPU s/step, rounded to a multiple of {record['settings']['step_multiple']}, from "
              "the probes: CPU time, since other jobs on a shared machine "
              "stretch wall times unevenly; the same train split, so more steps are more passes over it), scored "
              "on the same test split.", "",
              "| task | kind | kind accuracy | its CPU time (s) | LoRA steps in that time | LoRA accuracy then | "
              f"LoRA at {zoo['steps']} steps |", "|---|---|---|---|---|---|---|"]
    for r in record["equal_time"]:
        lines.append(f"| {r['task']} | {r['kind']} | {_f(r['kind_accuracy'])} | {r['cpu_seconds']:.0f} | "
                     f"{r['lora_steps']} | {_f(r['lora_accuracy'])} | {_f(r['lora_accuracy_equal_steps'])} |")
    lines += ["", f"![training]({record['settings']['stem']}.png)", ""]
    return "\n".join(lines)


def figure(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    for i, s in enumerate(record["summary"]):
        mine = [r for r in record["equal_steps"] if r["kind"] == s["kind"]]
        left.scatter([r["params"] for r in mine], [r["accuracy"] for r in mine], color=f"C{i}", alpha=0.3, s=14)
        left.scatter([s["params"]], [s["accuracy"]], color=f"C{i}", s=70, marker="D", label=s["kind"])
    left.set(xscale="log", xlabel="trainable parameters", ylabel="test accuracy (diamond: mean over tasks)",
             ylim=(-0.03, 1.03), title=f"equal steps ({record['zoo']['steps']})")
    left.legend(fontsize=8)
    timed = record["equal_time"]
    labels = [f"{r['task']}\n{r['kind']}" for r in timed]
    x = range(len(timed))
    right.bar([i - 0.2 for i in x], [r["kind_accuracy"] or 0 for r in timed], 0.4, label="kind")
    right.bar([i + 0.2 for i in x], [r["lora_accuracy"] for r in timed], 0.4, label="LoRA, same wall time")
    right.set_xticks(list(x), labels, fontsize=7, rotation=30, ha="right")
    right.set(ylabel="test accuracy", ylim=(0, 1.05), title="equal wall time")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(settings: Settings, command: str) -> dict:
    """Read the zoo's rows, probe, train LoRA at equal time; writes JSON, Markdown and plot; returns the record."""
    from adapters_zoo.zoo import PEFT_ALPHA, PEFT_RANK

    start = time.perf_counter()
    rows = equal_steps(settings)
    probes, timed = equal_time(settings, rows)
    zoo = settings.zoo
    record = {
        "settings": {"kinds": settings.kinds, "timed_tasks": settings.timed_tasks,
                     "probe_steps": settings.probe_steps, "step_multiple": settings.step_multiple,
                     "stem": settings.stem, "note": settings.note},
        "zoo": _zoo_to_json(zoo), "command": command, "environment": environment(),
        "kind_settings": {k: {"config": c, "lr": _lr(zoo, k, lr)} for k, (c, lr) in KIND_SETTINGS.items()},
        "peft": {"rank": PEFT_RANK, "alpha": PEFT_ALPHA, "lr": _lr(zoo, LORA, PEFT_LR)},
        "near": NEAR, "equal_steps": rows, "summary": summary(rows, settings.kinds), "probes": probes,
        "equal_time": timed, "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    record = json.loads(json.dumps(record))  # as it reads back from disk (tuples become lists)
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / f"{settings.stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    (settings.out / f"{settings.stem}.md").write_text(markdown(record))
    figure(record, settings.out / f"{settings.stem}.png")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=Path(os.environ.get("SPECFUSE_ZOO", SCRATCH / "zoo-smollm2")),
                   help="the real-base zoo (bench_zoo.py builds it)")
    p.add_argument("--bases-home", type=Path, help="where fetched bases live (default: $SPECFUSE_HOME)")
    p.add_argument("--quick", action="store_true", help="one timed task, the scale kind only: minutes")
    p.add_argument("--kinds", default=",".join(SPECTRAL_KINDS))
    p.add_argument("--timed-tasks", default=None, help="tasks probed and trained at equal wall time")
    p.add_argument("--probe-steps", type=int, default=4)
    p.add_argument("--step-multiple", type=int, default=4, help="LoRA's equal-time steps, rounded to a multiple")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=SCRATCH / "training")
    p.add_argument("--out", type=Path, default=RESULTS / "smollm2")
    p.add_argument("--note", default="", help="a line shown under the report's title")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one probe, in a subprocess
    args = p.parse_args(argv)
    if args.probe:
        spec = json.loads(args.probe)
        print(json.dumps(probe(_zoo_from_json(spec["zoo"]), spec["task"], spec["kind"], spec["steps"])))
        return 0
    zoo = ZooSettings(out=args.zoo, bases_home=args.bases_home, threads=args.threads)
    set_threads(args.threads)  # what training used, so the report's environment line says it too
    kinds = tuple(args.kinds.split(","))
    timed = tuple(args.timed_tasks.split(",")) if args.timed_tasks else Settings.timed_tasks
    if args.quick:
        kinds, timed = kinds[:1], timed[:1]
    settings = Settings(zoo=zoo, kinds=kinds, timed_tasks=timed, probe_steps=args.probe_steps,
                        step_multiple=args.step_multiple, work=args.work,
                        out=args.out, stem="training_quick" if args.quick else "training", note=args.note)
    command = "python " + shlex.join(["benchmarks/bench_training.py", *(argv if argv is not None else sys.argv[1:])])
    print(markdown(run(settings, command)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
