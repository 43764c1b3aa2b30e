"""The zoo on the real base: accuracy per task × kind against the base model, bytes, parameters, time.

    python benchmarks/bench_zoo.py [--zoo DIR] [--quick] [--kinds scale,svft,...] [--threads 2]

Runs ``specfuse zoo build`` on SmolLM2-135M-Instruct (resumable: finished adapters are
reused, so an interrupted run, or a run after ``zoo build`` itself, only reports) and writes
``benchmarks/results/smollm2/zoo{_quick}.{json,md,png}`` with the commit, machine, command
and settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import RESULTS, SCRATCH, environment, environment_line, set_threads, write_results

from adapters_zoo.zoo import ZooSettings, build_zoo, report_markdown

OUT = RESULTS / "smollm2"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["entries"]
    tasks = list(dict.fromkeys(e["task"] for e in entries))
    kinds = list(dict.fromkeys(e["kind"] for e in entries))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(tasks)), 4.2))
    width = 0.8 / (len(kinds) + 1)
    base = [next(e["base_accuracy"] for e in entries if e["task"] == t) for t in tasks]
    ax.bar([i - 0.4 + width / 2 for i in range(len(tasks))], base, width, label="base", color="0.6")
    for j, kind in enumerate(kinds):
        acc = [next((e["accuracy"] for e in entries if e["task"] == t and e["kind"] == kind), float("nan"))
               for t in tasks]  # nan: not trained yet, no bar
        ax.bar([i - 0.4 + width * (j + 1.5) for i in range(len(tasks))], acc, width, label=kind)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{report['settings']['base']}: one adapter per task × kind ({report['settings']['steps']} steps)")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", default=str(SCRATCH / "zoo-smollm2"), help="zoo directory (resumable)")
    p.add_argument("--bases-home", default=None, help="where the fetched base lives (default: $SPECFUSE_HOME)")
    p.add_argument("--quick", action="store_true", help="2 tasks per suite, 12 steps: minutes")
    p.add_argument("--kinds", default="scale,svft,rotation,additive")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="report the finished adapters, train nothing")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    set_threads(args.threads)
    settings = ZooSettings(out=Path(args.zoo), bases_home=args.bases_home, quick=args.quick,
                           kinds=tuple(args.kinds.split(",")), peft_lora=not args.no_peft, threads=args.threads,
                           train_missing=not args.report_only)
    report = build_zoo(settings)
    report["environment"] = environment()
    report["command"] = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    stem = "zoo_quick" if args.quick else "zoo"
    markdown = report_markdown(report) + f"\n{environment_line(report['environment'])}\n\n" \
        f"Command: `{report['command']}`\n"
    out = Path(args.out)
    write_results(stem, report, markdown, out)
    plot(report, out / f"{stem}.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
