"""Class-incremental scenarios: class order, disjoint tasks, no test leakage, input validation."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest

from mist_peft.continual.scenarios import Task, class_incremental, class_order, clinc150_domain_groups

CLINC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"


def toy(num_classes: int = 10, train_per_class: int = 3, test_per_class: int = 2) -> datasets.DatasetDict:
    """Rows tagged with their split, so leakage between splits is visible."""

    def split(name: str, per_class: int) -> datasets.Dataset:
        labels = [c for c in range(num_classes) for _ in range(per_class)]
        return datasets.Dataset.from_dict(
            {"origin": [f"{name}-{i}" for i in range(len(labels))], "label": labels}
        )

    return datasets.DatasetDict(train=split("train", train_per_class), test=split("test", test_per_class))


def test_class_order_matches_global_numpy_seed_semantics():
    state = np.random.get_state()
    try:
        np.random.seed(1993)
        reference = np.random.permutation(100).tolist()
        after_reference = np.random.rand()
        np.random.seed(1993)
        np.random.permutation(100)
        ours = class_order(range(100), seed=1993)
        assert np.random.rand() == after_reference  # our call did not consume the global generator
    finally:
        np.random.set_state(state)
    assert ours == reference
    # The well-known iCaRL/PyCIL CIFAR-100 order (seed 1993), published as a constant in many CL code bases.
    assert ours[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert class_order([30, 10, 20], seed=None) == [10, 20, 30]


def test_tasks_are_disjoint_cover_all_classes_and_follow_the_order():
    dd = toy()
    tasks = class_incremental(dd, num_tasks=5)
    assert [t.index for t in tasks] == list(range(5)) and all(isinstance(t, Task) for t in tasks)
    order = [c for t in tasks for c in t.classes]
    assert order == class_order(range(10), 1993) and sorted(order) == list(range(10))
    for task in tasks:
        assert len(task.classes) == 2
        assert set(task.train["label"]) == set(task.classes) and task.train.num_rows == 6
        assert set(task.test["label"]) == set(task.classes) and task.test.num_rows == 4
        assert all(o.startswith("train-") for o in task.train["origin"])
        assert all(o.startswith("test-") for o in task.test["origin"])  # test rows never reach training
    again = class_incremental(dd, num_tasks=5)
    assert [t.classes for t in again] == [t.classes for t in tasks]
    assert [t.classes for t in class_incremental(dd, num_tasks=5, seed=0)] != [t.classes for t in tasks]


def test_smaller_last_task_and_initial_classes():
    cars_like = toy(num_classes=196, train_per_class=1, test_per_class=1)
    sizes = [len(t.classes) for t in class_incremental(cars_like, num_tasks=10)]
    assert sizes == [20] * 9 + [16]
    assert [len(t.classes) for t in class_incremental(toy(7), num_tasks=3)] == [3, 3, 1]
    assert [len(t.classes) for t in class_incremental(toy(10), num_tasks=4, initial_classes=4)] == [
        4,
        2,
        2,
        2,
    ]
    assert [len(t.classes) for t in class_incremental(toy(10), num_tasks=1)] == [10]


def test_invalid_inputs_name_the_problem():
    dd = toy()
    with pytest.raises(ValueError, match="Cannot split 10 classes into 6 tasks"):
        class_incremental(dd, num_tasks=6)  # 2 per task leaves the 6th empty
    with pytest.raises(ValueError, match="exactly one of num_tasks"):
        class_incremental(dd)
    with pytest.raises(ValueError, match="exactly one of num_tasks"):
        class_incremental(dd, num_tasks=2, class_groups=[[0]])
    with pytest.raises(ValueError, match="more than one group"):
        class_incremental(dd, class_groups=[[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match=r"in no group.*add them"):
        class_incremental(dd, class_groups=[[0, 1, 2], [3, 4, 5, 6, 7, 8]])
    with pytest.raises(ValueError, match="no training examples"):
        class_incremental(dd, class_groups=[list(range(10)), [42]])
    with pytest.raises(ValueError, match="Split 'test'"):
        class_incremental(datasets.DatasetDict(train=dd["train"]), num_tasks=2)
    with pytest.raises(ValueError, match="label_column"):
        class_incremental(dd, num_tasks=2, label_column="intent")
    leaky = datasets.DatasetDict(
        train=dd["train"], test=datasets.Dataset.from_dict({"origin": ["x"], "label": [11]})
    )
    with pytest.raises(ValueError, match=r"Test classes \[11\]"):
        class_incremental(leaky, num_tasks=2)


def test_explicit_groups_keep_their_order():
    tasks = class_incremental(toy(), class_groups=[[9, 8], [0, 1, 2, 3], [4, 5, 6, 7]])
    assert [t.classes for t in tasks] == [[9, 8], [0, 1, 2, 3], [4, 5, 6, 7]]
    assert [t.train.num_rows for t in tasks] == [6, 12, 12]


def test_clinc150_domain_groups_give_ten_tasks_of_fifteen():
    if not (CLINC_DIR / "data_full.json").is_file():
        pytest.skip(f"CLINC150 not found at {CLINC_DIR} (../shared/data/clinc150 beside the repo)")
    from mist_peft.assets import load_clinc150

    dd = load_clinc150(CLINC_DIR)
    groups = clinc150_domain_groups(dd)
    assert len(groups) == 10 and all(len(g) == 15 for g in groups)
    names = dd["train"].features["label"].names
    assert "freeze_account" in [names[c] for c in groups[0]]  # banking comes first, as in domains.json
    tasks = class_incremental(dd, class_groups=groups)
    assert [t.train.num_rows for t in tasks] == [1500] * 10
    assert [t.test.num_rows for t in tasks] == [450] * 10
    for task in tasks:
        assert len(set(task.train["domain"])) == 1 and set(task.test["domain"]) == set(task.train["domain"])
