"""Class-incremental task streams built from a ``datasets.DatasetDict``.

A scenario splits the classes into disjoint groups, one per task ("B0 IncK": no base session, K new classes per
task). Each task's train set comes only from the ``train`` split and its test set only from the ``test`` split,
so test data can never leak into training. Labels keep their original values; ``Task.classes`` says which.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

__all__ = ["Task", "class_incremental", "class_order", "clinc150_domain_groups"]


@dataclass
class Task:
    """One step of a class-incremental stream: its new classes and their train/test examples."""

    index: int
    classes: list[int]
    train: datasets.Dataset
    test: datasets.Dataset

    def __repr__(self) -> str:
        return (
            f"Task(index={self.index}, classes={self.classes}, train={self.train.num_rows} rows, "
            f"test={self.test.num_rows} rows)"
        )


def _label_array(dataset: datasets.Dataset, label_column: str) -> np.ndarray:
    if label_column not in dataset.column_names:
        raise ValueError(f"Label column {label_column!r} not in {dataset.column_names}; pass label_column=.")
    return np.asarray(dataset.with_format("numpy", columns=[label_column])[label_column]).astype(np.int64)


def class_order(classes: Sequence[int], seed: int | None = 1993) -> list[int]:
    """Shuffle ``classes`` (sorted first) like PyCIL/PILOT's data manager: ``np.random.seed(seed)`` followed by
    ``np.random.permutation(len(classes))``. A private ``RandomState(seed)`` draws the identical permutation
    without touching NumPy's global random state. ``seed=None`` keeps the sorted order."""
    ordered = sorted(int(c) for c in classes)
    if seed is None:
        return ordered
    permutation = np.random.RandomState(seed).permutation(len(ordered))
    return [ordered[i] for i in permutation]


def _groups_from_count(order: list[int], num_tasks: int, initial_classes: int | None) -> list[list[int]]:
    """Cut ``order`` into ``num_tasks`` consecutive groups; only the last one may be smaller."""
    n = len(order)
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}.")
    first = initial_classes if initial_classes is not None else math.ceil(n / num_tasks)
    if not 0 < first <= n:
        raise ValueError(f"initial_classes must be between 1 and the number of classes ({n}), got {first}.")
    if num_tasks == 1:
        if first != n:
            raise ValueError(
                f"With num_tasks=1 the only task holds all {n} classes; drop initial_classes={first}."
            )
        return [order]
    rest = n - first
    # B0 IncK: every task has K = ceil(C / num_tasks) classes; with initial_classes the rest is split evenly.
    increment = first if initial_classes is None else math.ceil(rest / (num_tasks - 1))
    sizes = [first] + [min(increment, rest - k * increment) for k in range(num_tasks - 1)]
    if increment == 0 or sizes[-1] <= 0:
        raise ValueError(
            f"Cannot split {n} classes into {num_tasks} tasks"
            + (f" after a first task of {first}" if initial_classes is not None else "")
            + f": with {increment} new classes per task some tasks would be empty. Use fewer tasks "
            "(at most a smaller last task is allowed, e.g. 196 classes in 10 tasks = 9 x 20 + 16) or pass "
            "class_groups= explicitly."
        )
    groups, start = [], 0
    for size in sizes:
        groups.append(order[start : start + size])
        start += size
    return groups


def _check_groups(class_groups: Sequence[Sequence[int]], classes: set[int]) -> list[list[int]]:
    groups = [[int(c) for c in group] for group in class_groups]
    if not groups or any(len(group) == 0 for group in groups):
        raise ValueError("class_groups must be a non-empty list of non-empty class lists.")
    counts = Counter(c for group in groups for c in group)
    repeated = sorted(c for c, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(
            f"Classes {repeated[:10]} appear in more than one group; each class must be in exactly one."
        )
    seen = set(counts)
    unknown = sorted(seen - classes)
    if unknown:
        raise ValueError(f"Classes {unknown[:10]} of class_groups have no training examples; remove them.")
    missing = sorted(classes - seen)
    if missing:
        raise ValueError(
            f"Classes {missing[:10]} ({len(missing)} in all) are in the training split but in no group; add them "
            "to a group or filter them out of the dataset first."
        )
    return groups


def class_incremental(
    dataset_dict: datasets.DatasetDict,
    num_tasks: int | None = None,
    class_groups: Sequence[Sequence[int]] | None = None,
    seed: int | None = 1993,
    label_column: str = "label",
    initial_classes: int | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> list[Task]:
    """Split a data set into class-incremental tasks (B0 IncK, or explicit groups).

    Give either ``num_tasks`` (classes are ordered by :func:`class_order` with ``seed``, then cut into tasks of
    ``ceil(C / num_tasks)`` classes; the last task may be smaller, like Cars' 9 x 20 + 16; ``initial_classes``
    sets the size of the first task, the rest being split evenly), or ``class_groups`` (a list of disjoint class
    lists covering every training class, used in the given order, e.g. :func:`clinc150_domain_groups`).

    Task t trains on the rows of ``train_split`` whose label is one of its classes and is tested on the matching
    rows of ``test_split``.
    """
    for split in (train_split, test_split):
        if split not in dataset_dict:
            raise ValueError(f"Split {split!r} not in {list(dataset_dict)}; pass train_split=/test_split=.")
    if (num_tasks is None) == (class_groups is None):
        raise ValueError(
            "Pass exactly one of num_tasks= (seeded class order) or class_groups= (explicit tasks)."
        )
    if class_groups is not None and initial_classes is not None:
        raise ValueError(
            "initial_classes only applies with num_tasks=; class_groups already fix every task size."
        )
    train, test = dataset_dict[train_split], dataset_dict[test_split]
    train_labels, test_labels = _label_array(train, label_column), _label_array(test, label_column)
    classes = {int(c) for c in np.unique(train_labels)}
    test_only = sorted({int(c) for c in np.unique(test_labels)} - classes)
    if test_only:
        raise ValueError(
            f"Test classes {test_only[:10]} have no training examples, so no task could learn them; filter them "
            "out of the test split."
        )
    if class_groups is not None:
        groups = _check_groups(class_groups, classes)
    else:
        groups = _groups_from_count(class_order(classes, seed), int(num_tasks), initial_classes)
    tasks = []
    for index, group in enumerate(groups):
        tasks.append(
            Task(
                index=index,
                classes=list(group),
                train=train.select(np.flatnonzero(np.isin(train_labels, group))),
                test=test.select(np.flatnonzero(np.isin(test_labels, group))),
            )
        )
    return tasks


def clinc150_domain_groups(dataset: datasets.Dataset | datasets.DatasetDict) -> list[list[int]]:
    """CLINC150's natural 10 tasks: the intent labels of each domain (15 each), domains in ``domains.json`` order.

    Needs the ``label`` and ``domain`` columns of :func:`mist_peft.assets.load_clinc150`.
    """
    import datasets

    ds = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
    if "domain" not in ds.column_names:
        raise ValueError(
            "clinc150_domain_groups needs a 'domain' column; load the data with load_clinc150()."
        )
    labels, domains = _label_array(ds, "label"), _label_array(ds, "domain")
    feature = ds.features["domain"]
    domain_ids = (
        range(feature.num_classes) if isinstance(feature, datasets.ClassLabel) else np.unique(domains)
    )
    groups = [sorted({int(c) for c in labels[domains == d]}) for d in domain_ids]
    return [group for group in groups if group]
