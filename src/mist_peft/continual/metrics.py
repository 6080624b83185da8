"""Continual-learning metrics: the ``continual_accuracy`` evaluate module and a matrix-level shortcut.

The maths lives once, in ``mist_peft/metrics/continual_accuracy/continual_accuracy.py`` (a self-contained
``evaluate`` module, shipped as package data); this file loads it from the installed package, never the Hub.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

__all__ = ["CONTINUAL_METRIC_PATH", "continual_metrics", "load_continual_metric"]

CONTINUAL_METRIC_PATH = Path(__file__).resolve().parent.parent / "metrics" / "continual_accuracy"
"""Folder of the ``continual_accuracy`` evaluate module inside the installed package."""


@lru_cache(maxsize=1)
def _metric_module() -> ModuleType:
    script = CONTINUAL_METRIC_PATH / "continual_accuracy.py"
    spec = importlib.util.spec_from_file_location("mist_peft_continual_accuracy", script)
    if spec is None or spec.loader is None or not script.is_file():
        raise FileNotFoundError(
            f"The continual_accuracy metric module is missing from the package: {script}."
        )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def continual_metrics(acc_matrix: Sequence[Sequence[float]], task_sizes: Sequence[int] | None = None) -> dict:
    """Average / last accuracy, forgetting and new-task accuracy from an accuracy matrix in percent.

    ``acc_matrix[i][j]`` is the accuracy on task j after training stage i; only j <= i is read, so a square
    matrix or a lower-triangular list of rows both work. ``task_sizes`` (test samples per task) weights the
    per-stage accuracy by samples, which matches the evaluate module on raw predictions; without it, tasks
    weigh equally (the same when tasks have equal test sets).
    """
    num_stages = len(acc_matrix)
    if task_sizes is not None and len(task_sizes) < num_stages:
        raise ValueError(f"task_sizes has {len(task_sizes)} entries for {num_stages} stages.")
    sizes = [1.0] * num_stages if task_sizes is None else [float(n) for n in task_sizes[:num_stages]]
    correct = [
        [acc_matrix[i][j] / 100.0 * sizes[j] for j in range(min(i + 1, len(acc_matrix[i])))]
        for i in range(num_stages)
    ]
    total = [sizes[: i + 1] for i in range(num_stages)]
    return _metric_module().metrics_from_counts(correct, total)


def load_continual_metric(**kwargs) -> evaluate.EvaluationModule:
    """``evaluate.load`` the packaged ``continual_accuracy`` module from its local folder (no network)."""
    import evaluate

    return evaluate.load(str(CONTINUAL_METRIC_PATH), **kwargs)
