"""Peak memory and time per training step on the real base: fp32 vs bf16, with and without checkpointing.

Each setting runs in a fresh process (peak RSS is a per-process high-water mark): the base is
loaded in the setting's dtype, a `scale` adapter (basis k = 32) trains a few steps of one
fixed batch size and length, and the process reports its peak resident memory and the mean
time of the steps after the first. Writes benchmarks/results/smollm2/training_memory.{json,md,png}.

    nice -n 10 python benchmarks/bench_train_memory.py --base /work/devhome/bases/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, set_threads  # noqa: E402

SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def one(base: str, precision: str, checkpointing: bool, steps: int, batch: int, length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters_zoo.basis import compute_basis
    from adapters_zoo.loop import optimize
    from adapters_zoo.train import train_adapter
    from adapters_zoo.train_config import TrainConfig
    from adapters_zoo.train_runtime import DTYPES

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=DTYPES[precision]).eval()
    basis = compute_basis(base, 32)
    word = "spectral adapters train in a frozen basis "
    examples = [{"prompt": f"{i}: " + word * (length // 16), "completion": word * (length // 16)}
                for i in range(batch)]
    times: list[float] = []
    real_optimize = optimize

    def timed(*args, **kwargs):
        on_step = kwargs.pop("on_step")
        last = [time.perf_counter()]

        def tick(step, loss):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            return on_step(step, loss)

        return real_optimize(*args, on_step=tick, **kwargs)

    import adapters_zoo.train as train_module

    train_module.optimize = timed
    cfg = TrainConfig(kind="scale", kind_config={"rank": 32}, steps=steps, batch_size=batch, max_length=length,
                      precision=precision, gradient_checkpointing=checkpointing, signature=False, device="cpu")
    _, stats = train_adapter(model, tokenizer, basis, examples, cfg, progress=False, verify_basis=False)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"precision": precision, "gradient_checkpointing": checkpointing, "steps": steps, "batch_size": batch,
            "max_length": length, "peak_rss_mib": round(peak_mib, 1),
            "seconds_per_step": round(sum(times[1:]) / max(1, len(times) - 1), 3),
            "first_loss": stats.first_loss, "final_loss": stats.final_loss,
            "model_weights_mib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
            "torch_threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("PRECISION", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.base, args.one[0], args.one[1] == "1", args.steps, args.batch_size,
                             args.max_length)))
        return 0
    rows = []
    for precision, ckpt in SETTINGS:  # one process each, one after another (side by side on one machine)
        out = subprocess.run([sys.executable, __file__, "--base", args.base, "--steps", str(args.steps),
                              "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                              "--threads", str(args.threads), "--one", precision, str(int(ckpt))],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    env = environment() | {"torch_threads": args.threads}
    command = " ".join(["python", "benchmarks/bench_train_memory.py", *sys.argv[1:]])
    out_dir = RESULTS / "smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training_memory.json").write_text(json.dumps({"env": env, "command": command, "rows": rows},
                                                             indent=2) + "\n")
    ref = rows[0]
    lines = ["# Training memory and time per step: fp32 vs bf16, with and without gradient checkpointing", "",
             f"Base `{Path(args.base).name}`, `scale` adapter (k = 32, rank 32), batch {args.batch_size} × "
             f"{args.max_length} tokens, {args.steps} steps per setting, each in a fresh process on CPU. Peak "
             "memory is the process's peak resident set (model load included); time per step is the mean "
             "over the steps after the first.", "",
             f"Hardware: {env['cpu']} ({env['logical_cpus']} logical CPUs, {args.threads} torch threads); torch "
             f"{env['torch']}, transformers {env['transformers']}; {env['date']}; commit `{env['commit']}`.", "",
             f"Reproduce: `{command}`", "",
             "| precision | gradient checkpointing | base weights MiB | peak RSS MiB | vs fp32 | s / step | vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{r['model_weights_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}× | {r['seconds_per_step']:.2f} | "
                     f"{r['seconds_per_step'] / ref['seconds_per_step']:.2f}× |")
    (out_dir / "training_memory.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r['precision']}{' +ckpt' if r['gradient_checkpointing'] else ''}" for r in rows]
    a.bar(labels, [r["peak_rss_mib"] for r in rows])
    a.set_ylabel("peak RSS (MiB)")
    b.bar(labels, [r["seconds_per_step"] for r in rows])
    b.set_ylabel("seconds per step")
    fig.suptitle(f"{Path(args.base).name}: training a scale adapter on CPU (commit {env['commit']})")
    fig.tight_layout()
    fig.savefig(out_dir / "training_memory.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
