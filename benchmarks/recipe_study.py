"""Choose MIST's continual recipe without the test split: every candidate recipe on validation splits carved from
the train data of each data set, scored by the paired gain of host+mist over the frozen host.

    python benchmarks/recipe_study.py --suite image --seeds 1993
    python benchmarks/recipe_study.py --suite clinc150 --data-dir ../shared/data/clinc150

Each (suite, seed) writes benchmarks/results/recipe_study/<suite>_<seed>.json as it goes (a rerun skips the recipes
already measured); `--summarise` merges every file there into summary.json / summary.md. The test split is never
read: the CLI's own `validation_split` (20% of every class of the train data) stands in for it. With
`--val-per-class N` the validation split is instead N rows per class of the train split that the run does not
train on (all of `--train-per-class` trains), and the files go to recipe_study/val<N>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import datasets

from mist_peft.cli import (
    _per_host_option,
    _subsample,
    build_parser,
    class_permutations,
    load_backbone,
    load_data,
    make_config,
    make_tasks,
    validation_split,
)
from mist_peft.continual.runner import HOSTS, ContinualConfig, run_continual

OUT = Path(__file__).resolve().parent / "results" / "recipe_study"
SUITES = {  # sized for a 2-core CPU; the validation split is 20% of these train rows
    "image": ["--dataset", "mnist", "--train-per-class", "100", "--batch-size", "16"],
    "fashion": ["--dataset", "fashion_mnist", "--train-per-class", "100", "--batch-size", "16"],
    "clinc150": ["--dataset", "clinc150", "--train-per-class", "20", "--batch-size", "32"],
}
BASE = {"optimizer": "sgd", "lr": 1e-3, "adapt": "every", "steps_per_task": 10, "density": 0.05, "grad_drop": 0.9,
        "features": "adapted", "drift_anchor": "previous", "ranpac_resynthesis": "full", "ranpac_ridge": "task",
        "tune_biases_and_norms": False}
_FIRST30 = {"adapt": "first", "features": "simplecil=adapted,ranpac=fuse", "steps_per_task": 30}
_FIRST30_RIDGE_ALL = {**_FIRST30, "ranpac_ridge": "all", "host": "ranpac", "baseline": "frozen-ridge-all"}
RECIPES = {  # name -> changes to BASE (the reference recipe, SGD momentum 0.9, weight decay 5e-4)
    "sgd-1e-3-every": {},
    "sgd-1e-3-first": {"adapt": "first"},
    "sgd-3e-3-every": {"lr": 3e-3},
    "sgd-3e-3-first": {"lr": 3e-3, "adapt": "first"},
    "sgd-1e-3-every-20steps": {"steps_per_task": 20},
    "sgd-1e-3-every-density0.10": {"density": 0.10},
    "sgd-1e-3-every-drop0.8": {"grad_drop": 0.8},
    "adamw-1e-4-every": {"optimizer": "adamw", "lr": 1e-4},
    "sgd-1e-3-every-concat": {"features": "concat"},
    "sgd-1e-3-first-concat": {"adapt": "first", "features": "concat"},
    "sgd-1e-3-every-fuse": {"features": "fuse"},
    "sgd-1e-3-first-fuse": {"adapt": "first", "features": "fuse"},
    # the current per-host features, old statistics kept in pre-trained space and mapped once
    "sgd-1e-3-every-default-anchored": {"features": "simplecil=adapted,ranpac=fuse", "drift_anchor": "pretrained"},
    # the current per-host features with the reference's cross-task state (spec: overlap decay 0.9, q_f = 1.0)
    "sgd-1e-3-every-default-crosstask": {"features": "simplecil=adapted,ranpac=fuse", "overlap_decay": 0.9,
                                         "frozen_quantile": 1.0},
    # the current per-host features with a larger budget: more steps, a denser selection, a weaker dropout
    "sgd-1e-3-every-default-20steps": {"features": "simplecil=adapted,ranpac=fuse", "steps_per_task": 20},
    "sgd-1e-3-every-default-density0.10": {"features": "simplecil=adapted,ranpac=fuse", "density": 0.10},
    "sgd-1e-3-every-default-drop0.8": {"features": "simplecil=adapted,ranpac=fuse", "grad_drop": 0.8},
    # the current per-host features, the backbone adapted on the first task only
    "sgd-1e-3-first-default": {"adapt": "first", "features": "simplecil=adapted,ranpac=fuse"},
    "sgd-1e-3-every-default": {"features": "simplecil=adapted,ranpac=fuse"},
    # the backbone adapted once, with a larger budget for that one adaptation (RanPAC's first-session policy)
    "sgd-1e-3-first-default-30steps": _FIRST30,
    "sgd-3e-3-first-default": {"adapt": "first", "features": "simplecil=adapted,ranpac=fuse", "lr": 3e-3},
    # RanPAC's old statistics corrected by the change the drift makes to Gaussian draws, not rebuilt from them
    "sgd-1e-3-every-default-delta": {"features": "simplecil=adapted,ranpac=fuse", "ranpac_resynthesis": "delta"},
    # RanPAC's ridge validated with the earlier classes' statistics in the system. It changes the frozen RanPAC
    # too, so these rows are compared with their own frozen run (`baseline`); SimpleCIL does not read it.
    "frozen-ridge-all": {"ranpac_ridge": "all", "host": "ranpac"},
    "sgd-1e-3-first-default-30steps-ridge-all": _FIRST30_RIDGE_ALL,
    # the default (ridge all) with a larger budget for its one adaptation: RanPAC's Fashion-MNIST gain is its
    # last missed target (+0.6 to +0.7 Avg on the test runs)
    "sgd-1e-3-first-default-60steps-ridge-all": {**_FIRST30_RIDGE_ALL, "steps_per_task": 60},
    "sgd-3e-3-first-default-30steps-ridge-all": {**_FIRST30_RIDGE_ALL, "lr": 3e-3},
    "sgd-1e-3-first-default-30steps-density0.10-ridge-all": {**_FIRST30_RIDGE_ALL, "density": 0.10},
    # SimpleCIL on the same backbones (it does not read the ridge, so its baseline is the plain frozen run)
    "sgd-3e-3-first-default-30steps-simplecil": {**_FIRST30, "lr": 3e-3, "host": "simplecil"},
    "sgd-1e-3-first-default-30steps-density0.10-simplecil": {**_FIRST30, "density": 0.10, "host": "simplecil"},
    # the lr 3e-3 default with the two budgets that also helped RanPAC on Fashion-MNIST at lr 1e-3
    "sgd-3e-3-first-default-60steps-ridge-all": {**_FIRST30_RIDGE_ALL, "lr": 3e-3, "steps_per_task": 60},
    "sgd-3e-3-first-default-30steps-density0.10-ridge-all": {**_FIRST30_RIDGE_ALL, "lr": 3e-3, "density": 0.10},
    "sgd-3e-3-first-default-60steps-simplecil": {**_FIRST30, "lr": 3e-3, "steps_per_task": 60, "host": "simplecil"},
    "sgd-3e-3-first-default-30steps-density0.10-simplecil": {**_FIRST30, "lr": 3e-3, "density": 0.10,
                                                             "host": "simplecil"},
    # a still larger learning rate: does the trend from 1e-3 to 3e-3 go on?
    "sgd-1e-2-first-default-30steps-ridge-all": {**_FIRST30_RIDGE_ALL, "lr": 1e-2},
    "sgd-1e-2-first-default-30steps-simplecil": {**_FIRST30, "lr": 1e-2, "host": "simplecil"},
    # the default with the reference's dense bias and LayerNorm deltas (RanPAC's own first-session adaptation
    # tunes scales and shifts, SSF): more plasticity where the 60-step default is closest to its targets
    "sgd-3e-3-first-default-60steps-norms-ridge-all": {**_FIRST30_RIDGE_ALL, "lr": 3e-3, "steps_per_task": 60,
                                                       "tune_biases_and_norms": True},
    "sgd-3e-3-first-default-60steps-norms-simplecil": {**_FIRST30, "lr": 3e-3, "steps_per_task": 60,
                                                       "tune_biases_and_norms": True, "host": "simplecil"},
    # the default (60 steps, biases and norms) with twice the steps: does the trend from 30 to 60 go on?
    "sgd-3e-3-first-default-120steps-norms-ridge-all": {**_FIRST30_RIDGE_ALL, "lr": 3e-3, "steps_per_task": 120,
                                                        "tune_biases_and_norms": True},
    "sgd-3e-3-first-default-120steps-norms-simplecil": {**_FIRST30, "lr": 3e-3, "steps_per_task": 120,
                                                        "tune_biases_and_norms": True, "host": "simplecil"},
    # RanPAC on the adapted features alone: fusion was chosen when the backbone moved before every task and the
    # per-task ridge could collapse; with one adaptation nothing drifts and the old-class ridge holds the head
    "sgd-3e-3-first-120steps-norms-ridge-all-adapted": {**_FIRST30_RIDGE_ALL, "lr": 3e-3, "steps_per_task": 120,
                                                        "tune_biases_and_norms": True, "features": "adapted"},
}
RUN_ONLY = ("host", "baseline")  # recipe keys that choose what runs and what it is compared with
TIE = 0.5  # points: worst cells this close count as equal when choosing a host's features


def held_out_validation(train: datasets.Dataset, per_class: int, val_per_class: int, seed: int
                        ) -> datasets.DatasetDict:
    """The run's train rows (the same rows as the CLI's `_subsample` of `per_class`) and `val_per_class` other
    rows of every class of the train split as validation, so validating takes nothing from training."""
    perms = class_permutations(train, seed)
    if any(len(p) < per_class + val_per_class for p in perms):
        raise ValueError(f"a class has fewer than {per_class} + {val_per_class} train rows; lower --val-per-class")
    return datasets.DatasetDict({"train": train.select(sorted(i for p in perms for i in p[:per_class])),
                                 "test": train.select(sorted(i for p in perms
                                                             for i in p[per_class:per_class + val_per_class]))})


def run_suite(suite: str, seed: int, recipes: list[str], data_dir: str | None, out: Path = OUT,
              val_per_class: int | None = None) -> Path:
    argv = ["continual", *SUITES[suite], "--seed", str(seed)] + (["--data-dir", data_dir] if data_dir else [])
    args = build_parser().parse_args(argv)
    data, kind = load_data(args)
    if val_per_class:
        data = held_out_validation(data["train"], args.train_per_class, val_per_class, seed)
    else:
        data = validation_split({"train": _subsample(data["train"], args.train_per_class, seed)}, 0.2, seed)
    make_backbone, collate, _ = load_backbone(args, kind)
    tasks = make_tasks(data, args)
    path = out / f"{suite}_{seed}.json"
    done = json.loads(path.read_text()) if path.exists() else {"suite": suite, "seed": seed, "runs": {}}
    for name in ["frozen", *recipes]:
        if name in done["runs"]:
            continue
        recipe = {**BASE, **RECIPES.get(name, {})}
        frozen = name.startswith("frozen")
        config = make_config(argparse.Namespace(**{**vars(args), **recipe, "methods": "frozen" if frozen else "mist"}))
        methods = run_continual(make_backbone, tasks, collate, config)["methods"]
        done["runs"][name] = {"recipe": recipe, "rows": {k: {m: v[m] for m in ("avg_acc", "last_acc", "forgetting")}
                                                         for k, v in methods.items()}}
        print(f"{suite} seed {seed} {name}: " + ", ".join(f"{k} {v['avg_acc']:.2f}" for k, v in methods.items()))
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done, indent=1))
    return path


def summarise(out: Path = OUT) -> str:
    """Mean paired gains (host+mist minus the frozen host, validation Avg / Last / forgetting) per suite and
    host, and the worst case over them. The default is the recipe whose worst cell is best, a cell scoring the
    smaller of its Avg and Last gains (issue 9's target: Avg up, Last not lower)."""
    per = {}  # recipe -> (suite, host) -> seed -> (dAvg, dLast, dForgetting)
    for path in sorted(out.glob("*_*.json")):
        done = json.loads(path.read_text())
        for name, run in done["runs"].items():
            if name.startswith("frozen"):
                continue
            baseline = RECIPES.get(name, {}).get("baseline", "frozen")
            frozen = done["runs"].get(baseline, {}).get("rows", {})
            for host in HOSTS:
                row, base = run["rows"].get(f"{host}+mist"), frozen.get(host)
                if row and base:
                    per.setdefault(name, {}).setdefault((done["suite"], host), {})[done["seed"]] = \
                        tuple(row[k] - base[k] for k in ("avg_acc", "last_acc", "forgetting"))
    cells = sorted({c for r in per.values() for c in r})
    lines = ["| recipe | " + " | ".join(f"{s} {h}" for s, h in cells) + " | worst Avg gain | worst min(Avg, Last) |",
             "|---|" + "---:|" * (len(cells) + 2)]
    summary = {}
    for name, by_cell in per.items():
        means = {c: [statistics.mean(x[i] for x in by_cell[c].values()) for i in range(3)] for c in by_cell}
        worst = min(m[0] for m in means.values())
        worst_both = min(min(m[0], m[1]) for m in means.values())
        summary[name] = {"recipe": {**BASE, **RECIPES.get(name, {})}, "worst_avg_gain": worst,
                         "worst_min_avg_last_gain": worst_both,
                         "gains": {f"{s}/{h}": {"avg": m[0], "last": m[1], "forgetting": m[2],
                                                "seeds": len(by_cell[(s, h)])} for (s, h), m in means.items()}}
        lines.append(f"| {name} | " + " | ".join(
            f"{means[c][0]:+.2f} / {means[c][1]:+.2f} / {means[c][2]:+.2f}" if c in means else "-" for c in cells)
            + f" | {worst:+.2f} | {worst_both:+.2f}{'' if len(means) == len(cells) else ' (partial)'} |")
        summary[name]["complete"] = len(means) == len(cells)
    lines += ["", "Cells: validation Avg / Last / forgetting of host+mist minus the frozen host (points), mean over "
              "the seeds run; '-': not run. The default is the recipe, among those run on every suite, with the best worst "
              "min(Avg, Last) gain; a partial recipe's worst case covers only its cells.", ""]
    lines += features_per_host(per, cells)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


# options a host may take on its own: what it sees, where its drift maps start, when its backbone adapts (hosts
# with different adapt policies get one backbone trajectory each) and how RanPAC carries its statistics
HOST_SIDE = ("features", "drift_anchor", "adapt", "ranpac_resynthesis", "ranpac_ridge", *RUN_ONLY)


def host_variant(recipe: dict, host: str) -> str:
    """What `host` does under `recipe`: its features mode, plus ", anchored" for pre-trained drift anchors and
    ", first task" when only the first task adapts the backbone, ", delta" for RanPAC's delta re-synthesis."""
    config = ContinualConfig(features=_per_host_option(recipe["features"]), adapt=_per_host_option(recipe["adapt"]),
                             drift_anchor=_per_host_option(recipe["drift_anchor"]))
    anchored = config.anchor_modes()[host] == "pretrained"
    first = config.adapt_modes()[host] == "first"
    delta = host == "ranpac" and recipe["ranpac_resynthesis"] == "delta"
    ridge_all = host == "ranpac" and recipe["ranpac_ridge"] == "all"
    return config.feature_modes()[host] + (", anchored" if anchored else "") + (", first task" if first else "") \
        + (", delta" if delta else "") + (", ridge all" if ridge_all else "")


def features_per_host(per: dict, cells: list) -> list[str]:
    """Hosts do not steer the backbone, so each host may take its own host-side options (`HOST_SIDE`) on one
    backbone recipe: for every backbone recipe (a recipe without its host-side options) and host, the variant with
    the best worst min(Avg, Last) cell over the suites, among the variants run on every suite. Worst cells within
    TIE points of the best are a tie (one validation image is 0.5 points of a 200-image split), broken by the mean
    cell over the suites. Every recipe giving a host the same variant on the same backbone recipe contributes its
    seeds; a seed measured by several such recipes counts once, as their mean. (They agree since the runner keeps
    the pre-trained feature passes off the global RNG; runs made before that drew the adapted run's MI heads from
    a stream that the other host's options had advanced, so they are different samples of the same variant.)"""
    suites = sorted({s for s, _ in cells})
    # backbone recipe -> host -> variant -> suite -> seed -> gains, and the recipe names behind each variant
    groups: dict[tuple, dict[str, dict[str, dict[str, dict]]]] = {}
    names: dict[tuple, list[str]] = {}
    repeated = set()
    for name in per:
        recipe = {**BASE, **RECIPES.get(name, {})}
        key = tuple(sorted((k, v) for k, v in recipe.items() if k not in HOST_SIDE))
        for host in HOSTS:
            variant = host_variant(recipe, host)
            pooled = groups.setdefault(key, {}).setdefault(host, {}).setdefault(variant, {})
            names.setdefault((key, host, variant), []).append(name)
            for (suite, h), by_seed in per[name].items():
                if h != host:
                    continue
                for seed, gains in by_seed.items():
                    runs = pooled.setdefault(suite, {}).setdefault(seed, [])
                    runs.append(gains)
                    if len(runs) > 1:
                        repeated.add(f"{host} {variant} {suite} {seed}")
    variants = sorted({v for g in groups.values() for by in g.values() for v in by}, key=lambda v: (len(v), v))
    lines = ["Per host, on one backbone recipe: worst min(Avg, Last) gain of each host-side variant over the suites, "
             "then its worst forgetting difference (complete variants only; seeds pooled over the recipes that give "
             "the host that variant)", "", "| backbone recipe | host | " + " | ".join(variants) + " | choice |",
             "|---|---|" + "---:|" * (len(variants) + 1)]
    for key, by_host in groups.items():
        for host, pooled in by_host.items():
            label = min((n for v in pooled for n in names[(key, host, v)]), key=len)
            worst, mean, forgetting = {}, {}, {}
            for variant, by_suite in pooled.items():
                if all(by_suite.get(s) for s in suites):
                    cell = {s: [statistics.mean(statistics.mean(r[i] for r in runs) for runs in by_suite[s].values())
                                for i in range(3)] for s in suites}
                    both = [min(c[0], c[1]) for c in cell.values()]
                    worst[variant], mean[variant] = min(both), statistics.mean(both)
                    forgetting[variant] = max(c[2] for c in cell.values())
            if len(worst) > 1:
                best = max(worst.values())
                choice = max((v for v in worst if worst[v] >= best - TIE), key=mean.get)
                lines.append(f"| {label} | {host} | " + " | ".join(
                    f"{worst[v]:+.2f} / {forgetting[v]:+.2f}" if v in worst else "-" for v in variants)
                    + f" | {choice} |")
    return lines + (["", "Seeds measured by several recipes (their mean counts): " + ", ".join(sorted(repeated))]
                    if repeated else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES))
    parser.add_argument("--seeds", default="1993", help="comma-separated seeds")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    parser.add_argument("--data-dir", default=None, help="CLINC150 folder for --suite clinc150")
    parser.add_argument("--val-per-class", type=int, default=None,
                        help="validate on this many train rows per class outside the run's train rows "
                             "(results under recipe_study/val<N>/) instead of 20%% of them")
    parser.add_argument("--summarise", action="store_true", help="only merge the result files into a summary")
    args = parser.parse_args()
    out = OUT / f"val{args.val_per_class}" if args.val_per_class else OUT
    if not args.summarise:
        if args.suite is None:
            parser.error("--suite is required unless --summarise")
        for seed in (int(s) for s in args.seeds.split(",")):
            run_suite(args.suite, seed, args.recipes.split(","), args.data_dir, out, args.val_per_class)
    print(summarise(out))


if __name__ == "__main__":
    main()
