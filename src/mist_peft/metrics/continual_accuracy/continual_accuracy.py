"""Class-incremental accuracy metrics as an ``evaluate`` module.

This file is self-contained (``evaluate`` copies it into its module cache), so it imports nothing from
mist_peft. ``mist_peft.continual.metrics`` loads it and reuses :func:`metrics_from_counts` for its matrix API.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Accuracy of a class-incremental learner evaluated after every training stage. Each sample carries the task its
class belongs to (`task`) and the stage after which it was evaluated (`stage`, the index of the last task
trained). Only samples with task <= stage count (the classes seen so far); others are ignored.

Returned values are percentages:
- acc_matrix: lower-triangular list, acc_matrix[i][j] = accuracy on task j's samples after stage i (j <= i);
- stage_acc: accuracy over all samples seen so far, per stage;
- avg_acc: mean of stage_acc, the CIL "average incremental accuracy";
- last_acc: stage_acc at the last stage;
- forgetting: mean over tasks j < T-1 of max_{j <= i < T-1} acc[i][j] - acc[T-1][j] (0 with one task);
- new_task_acc: mean over stages of acc[i][i], accuracy on the newly added classes.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    task (`list` of `int`): index of the task that each sample's true class belongs to.
    stage (`list` of `int`): index of the training stage (task) after which the sample was evaluated.
Returns:
    dict with `acc_matrix`, `stage_acc`, `avg_acc`, `last_acc`, `forgetting`, `new_task_acc`, `num_stages`.
Example:
    >>> metric = evaluate.load("path/to/continual_accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2], task=[0, 0, 0, 1], stage=[0, 0, 1, 1])
"""

_CITATION = """\
@article{rebuffi2017icarl,
  title={iCaRL: Incremental Classifier and Representation Learning},
  author={Rebuffi, Sylvestre-Alvise and Kolesnikov, Alexander and Sperl, Georg and Lampert, Christoph H.},
  journal={CVPR},
  year={2017}
}
"""


def metrics_from_counts(correct: Sequence[Sequence[float]], total: Sequence[Sequence[float]]) -> dict:
    """Continual metrics from per-(stage, task) counts; only entries with task <= stage are read.

    ``correct[i][j]`` and ``total[i][j]`` are the number of correct and evaluated samples of task j after stage
    i. Sample weighting follows from the counts: pass ``total = 1`` everywhere for task-averaged metrics.
    """
    num_stages = len(total)
    if num_stages == 0 or len(correct) != num_stages:
        raise ValueError("Need at least one stage, and as many rows of correct counts as of totals.")
    acc, stage_acc = [], []
    for i in range(num_stages):
        if len(total[i]) < i + 1 or len(correct[i]) < i + 1:
            raise ValueError(f"Stage {i} needs entries for tasks 0..{i}.")
        row_total = np.asarray(total[i][: i + 1], dtype=np.float64)
        row_correct = np.asarray(correct[i][: i + 1], dtype=np.float64)
        if np.any(row_total <= 0):
            empty = [j for j in range(i + 1) if row_total[j] <= 0]
            raise ValueError(
                f"No samples of task(s) {empty} evaluated after stage {i}; every seen task needs some."
            )
        acc.append((100.0 * row_correct / row_total).tolist())
        stage_acc.append(float(100.0 * row_correct.sum() / row_total.sum()))
    last = num_stages - 1
    drops = [max(acc[i][j] for i in range(j, last)) - acc[last][j] for j in range(last)]
    return {
        "acc_matrix": acc,
        "stage_acc": stage_acc,
        "avg_acc": float(np.mean(stage_acc)),
        "last_acc": float(stage_acc[last]),
        "forgetting": float(np.mean(drops)) if drops else 0.0,
        "new_task_acc": float(np.mean([acc[i][i] for i in range(num_stages)])),
        "num_stages": num_stages,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ContinualAccuracy(evaluate.Metric):
    """Accuracy matrix, average incremental accuracy, last accuracy, forgetting and new-task accuracy."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "task": datasets.Value("int64"),
                    "stage": datasets.Value("int64"),
                }
            ),
            format="numpy",
        )

    def _compute(self, predictions, references, task, stage) -> dict:
        predictions, references = np.asarray(predictions), np.asarray(references)
        task, stage = np.asarray(task), np.asarray(stage)
        if task.size == 0:
            raise ValueError("No samples to evaluate.")
        if task.min() < 0 or stage.min() < 0:
            raise ValueError("task and stage must be non-negative indices.")
        seen = task <= stage
        num_stages = int(stage.max()) + 1
        correct = np.zeros((num_stages, num_stages))
        total = np.zeros((num_stages, num_stages))
        hits = (predictions == references)[seen].astype(np.float64)
        np.add.at(correct, (stage[seen], task[seen]), hits)
        np.add.at(total, (stage[seen], task[seen]), 1.0)
        return metrics_from_counts(correct.tolist(), total.tolist())
