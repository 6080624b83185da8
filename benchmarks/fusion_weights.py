"""How much should the adapted half of a fused host count? A validation study of the fusion weight.

`features="fuse"` scores a class as pre-trained host + adapted host. This study weighs the adapted half by w,
score = pre-trained + w * adapted (w = 0: the frozen host; w = inf: the adapted host alone; w = 1: the default
fused host), for both hosts, on the validation splits of `recipe_study.py` (`--val-per-class`: rows of the
train split the run does not train on). With the default recipe the backbone adapts on the first task only, so
both halves' inputs are fixed once recorded: one run per (suite, seed) records what the runner's hosts see, and
every weight is replayed on that record. Replaying w = 1 must give the runner's own row bit for bit (checked).

    python benchmarks/fusion_weights.py --suite fashion --seeds 1993,1994,1995 --val-per-class 200
    python benchmarks/fusion_weights.py --suite clinc150 --seeds 1993,1994 --val-per-class 50 --data-dir DIR
    python benchmarks/fusion_weights.py --summarise

Results: benchmarks/results/fusion_weights/<suite>_<seed>.json and summary.md. The recording patches two private
functions of the runner (`_host_for`, `_accuracies`) and the replay builds hosts with its `_make_host`: a study
of host-side weights needs the hosts' inputs, which no public API returns; if the runner changes under it, the
w = 1 check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from recipe_study import SUITES, held_out_validation

from mist_peft.cli import build_parser, load_backbone, load_data, make_config, make_tasks
from mist_peft.continual import runner
from mist_peft.continual.metrics import continual_metrics
from mist_peft.continual.runner import ContinualConfig

OUT = Path(__file__).resolve().parent / "results" / "fusion_weights"
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, float("inf"))
METRICS = ("avg_acc", "last_acc", "forgetting")


def record(suite: str, seed: int, val_per_class: int, data_dir: str | None
           ) -> tuple[dict, ContinualConfig, dict]:
    """One default-recipe run with both hosts fused; returns (per-host fits and evaluations, config, rows)."""
    argv = ["continual", *SUITES[suite], "--seed", str(seed), "--features", "fuse", "--host", "simplecil,ranpac",
            "--methods", "mist"] + (["--data-dir", data_dir] if data_dir else [])
    args = build_parser().parse_args(argv)
    data, kind = load_data(args)
    data = held_out_validation(data["train"], args.train_per_class, val_per_class, seed)
    make_backbone, collate, _ = load_backbone(args, kind)
    config = make_config(args)
    records: dict[str, dict[str, list]] = {}
    host_for, accuracies = runner._host_for, runner._accuracies

    def recording_host(name, cfg, method):
        host = host_for(name, cfg, method)
        rec = records.setdefault(name, {"fits": [], "tests": []})
        fit = host.fit_task

        def fit_task(x, y, **kwargs):
            rec["fits"].append((x.clone(), y.clone()))
            return fit(x, y, **kwargs)
        host.fit_task, host.record = fit_task, rec
        return host

    def recording_accuracies(host, tests):
        host.record["tests"].append([(x.clone(), y.clone()) for x, y in tests])
        return accuracies(host, tests)

    runner._host_for, runner._accuracies = recording_host, recording_accuracies
    try:
        methods = runner.run_continual(make_backbone, make_tasks(data, args), collate, config)["methods"]
    finally:
        runner._host_for, runner._accuracies = host_for, accuracies
    rows = {name: {m: methods[f"{name}+mist"][m] for m in METRICS} for name in records}
    return records, config, rows


def replay(rec: dict, host: str, config: ContinualConfig) -> dict[float, dict[str, float]]:
    """Both halves built and fitted once per task as the runner's fused host does; every weight scored on the
    recorded evaluations."""
    pretrained, adapted = runner._make_host(host, config), runner._make_host(host, config)
    matrices: dict[float, list[list[float]]] = {w: [] for w in WEIGHTS}
    for (x, y), tests in zip(rec["fits"], rec["tests"], strict=True):
        split = x.shape[1] // 2
        pretrained.fit_task(x[:, :split], y)
        adapted.fit_task(x[:, split:], y)
        classes = torch.tensor(adapted.seen_classes)
        rows: dict[float, list[float]] = {w: [] for w in WEIGHTS}
        for tx, ty in tests:
            pre, ada = pretrained.scores(tx[:, :split]).double(), adapted.scores(tx[:, split:]).double()
            for w in WEIGHTS:
                scores = pre if w == 0 else ada if w == float("inf") else pre + w * ada
                rows[w].append(100.0 * float((classes[scores.argmax(dim=1)] == ty).float().mean()))
        for w in WEIGHTS:
            matrices[w].append(rows[w])
    sizes = [len(y) for _, y in rec["tests"][-1]]
    return {w: {m: continual_metrics(matrix, task_sizes=sizes)[m] for m in METRICS} for w, matrix in matrices.items()}


def run(suite: str, seed: int, val_per_class: int, data_dir: str | None, out: Path = OUT) -> Path:
    records, config, rows = record(suite, seed, val_per_class, data_dir)
    result = {"suite": suite, "seed": seed, "val_per_class": val_per_class, "runner_rows": rows, "weights": {}}
    for host, rec in records.items():
        replayed = replay(rec, host, config)
        if replayed[1.0] != rows[host]:
            raise RuntimeError(f"replaying weight 1 gave {replayed[1.0]}, the runner {rows[host]}: the runner "
                               "changed under this study's recording")
        result["weights"][host] = {repr(w): metrics for w, metrics in replayed.items()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}_{seed}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def summarise(out: Path = OUT) -> str:
    """Mean gain over the frozen host (w = 0) per suite, host and weight, and the worst min(Avg, Last) cell."""
    gains: dict[tuple[str, str], dict[str, list[list[float]]]] = {}
    for path in sorted(out.glob("*_*.json")):
        result = json.loads(path.read_text())
        for host, by_weight in result["weights"].items():
            base = by_weight["0.0"]
            for w, metrics in by_weight.items():
                if w != "0.0":
                    gains.setdefault((host, w), {}).setdefault(result["suite"], []).append(
                        [metrics[m] - base[m] for m in METRICS])
    suites = sorted({s for by_suite in gains.values() for s in by_suite})
    lines = ["| host | adapted weight w | " + " | ".join(suites) + " | worst min(Avg, Last) | mean min(Avg, Last) "
             "| worst seed: Avg gain / forgetting |", "|---|---:|" + "---|" * len(suites) + "---:|---:|---:|"]
    summary = {}
    for (host, w), by_suite in gains.items():
        means = {s: [statistics.mean(g[i] for g in runs) for i in range(3)] for s, runs in by_suite.items()}
        both = [min(m[0], m[1]) for m in means.values()]
        runs = [g for by_seed in by_suite.values() for g in by_seed]
        worst_seed = (min(g[0] for g in runs), max(g[2] for g in runs))
        summary.setdefault(host, {})[w] = {"gains": means, "worst_min_avg_last": min(both),
                                           "mean_min_avg_last": statistics.mean(both),
                                           "worst_seed_avg_gain": worst_seed[0],
                                           "worst_seed_forgetting": worst_seed[1],
                                           "seeds": {s: len(by_seed) for s, by_seed in by_suite.items()}}
        label = " (default)" if (host, w) in (("ranpac", "1.0"), ("simplecil", "inf")) else ""
        lines.append(f"| {host} | {w}{label} | " + " | ".join(
            "{:+.2f} / {:+.2f} / {:+.2f}".format(*means[s]) if s in means else "-" for s in suites)
            + f" | {min(both):+.2f} | {statistics.mean(both):+.2f} | {worst_seed[0]:+.2f} / {worst_seed[1]:+.2f} |")
    lines += ["", "Cells: validation Avg / Last / forgetting of the fused host minus the frozen host (w = 0), mean "
              "over the seeds run; w = inf is the adapted host alone (SimpleCIL's default), w = 1 the default "
              "fused host (RanPAC's). Worst seed: the smallest Avg gain and the largest forgetting difference of "
              "any (suite, seed) run."]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES))
    parser.add_argument("--seeds", default="1993", help="comma-separated seeds")
    parser.add_argument("--val-per-class", type=int, default=200)
    parser.add_argument("--data-dir", default=None, help="CLINC150 folder for --suite clinc150")
    parser.add_argument("--summarise", action="store_true", help="only rebuild summary.md from the result files")
    args = parser.parse_args()
    if not args.summarise:
        if args.suite is None:
            parser.error("--suite is required unless --summarise")
        for seed in (int(s) for s in args.seeds.split(",")):
            print(f"wrote {run(args.suite, seed, args.val_per_class, args.data_dir)}")
    print(summarise())


if __name__ == "__main__":
    main()
