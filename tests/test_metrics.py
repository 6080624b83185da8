"""Continual accuracy metrics: hand-computed matrix values, and the evaluate module on raw predictions."""

from __future__ import annotations

import pytest

from mist_peft.continual.metrics import CONTINUAL_METRIC_PATH, continual_metrics, load_continual_metric

# acc[i][j]: accuracy (%) on task j after training stage i; the upper triangle is never read.
ACC = [
    [90.0, 0.0, 0.0],
    [80.0, 70.0, 0.0],
    [60.0, 50.0, 40.0],
]
SIZES = [10, 20, 10]  # test samples per task


def test_hand_computed_values_equal_task_weights():
    m = continual_metrics(ACC)
    assert m["acc_matrix"] == [[90.0], [80.0, 70.0], [60.0, 50.0, 40.0]]
    assert m["stage_acc"] == pytest.approx([90.0, 75.0, 50.0])
    assert m["avg_acc"] == pytest.approx((90 + 75 + 50) / 3)  # 71.667
    assert m["last_acc"] == pytest.approx(50.0)
    assert m["forgetting"] == pytest.approx(((90 - 60) + (70 - 50)) / 2)  # 25
    assert m["new_task_acc"] == pytest.approx((90 + 70 + 40) / 3)  # 66.667
    assert m["num_stages"] == 3


def test_hand_computed_values_sample_weighted():
    m = continual_metrics(
        [row[: i + 1] for i, row in enumerate(ACC)], task_sizes=SIZES
    )  # ragged rows work too
    stage1 = (80 * 10 + 70 * 20) / 30  # 73.333
    stage2 = (60 * 10 + 50 * 20 + 40 * 10) / 40  # 50
    assert m["stage_acc"] == pytest.approx([90.0, stage1, stage2])
    assert m["avg_acc"] == pytest.approx((90 + stage1 + stage2) / 3)  # 71.111
    assert m["last_acc"] == pytest.approx(50.0)
    assert m["forgetting"] == pytest.approx(25.0)  # per-task accuracies, no weighting


def test_forgetting_uses_the_best_earlier_stage_and_is_zero_for_one_task():
    m = continual_metrics([[50.0], [70.0, 90.0], [65.0, 90.0, 80.0]])
    assert m["forgetting"] == pytest.approx(((70 - 65) + (90 - 90)) / 2)
    assert continual_metrics([[88.0]])["forgetting"] == 0.0
    with pytest.raises(ValueError, match="tasks 0..1"):
        continual_metrics([[50.0], [60.0]])


def raw_samples():
    """Predictions reproducing ACC with SIZES: at stage i, the first acc*size/100 samples of task j are correct."""
    predictions, references, task, stage = [], [], [], []
    for i, row in enumerate(ACC):
        for j in range(i + 1):
            hits = round(row[j] * SIZES[j] / 100)
            for k in range(SIZES[j]):
                ref = 10 * j + k % 3  # 3 classes per task
                predictions.append(ref if k < hits else ref + 1 if k % 3 < 2 else ref - 1)
                references.append(ref)
                task.append(j)
                stage.append(i)
    # Samples of tasks not yet trained (task > stage) are ignored by the metric.
    predictions += [99, 99]
    references += [20, 21]
    task += [2, 2]
    stage += [0, 1]
    return predictions, references, task, stage


def test_evaluate_module_from_local_path_matches_the_matrix_function():
    assert (CONTINUAL_METRIC_PATH / "continual_accuracy.py").is_file()
    metric = load_continual_metric()
    predictions, references, task, stage = raw_samples()
    result = metric.compute(predictions=predictions, references=references, task=task, stage=stage)
    expected = continual_metrics(ACC, task_sizes=SIZES)
    assert [len(row) for row in result["acc_matrix"]] == [1, 2, 3]
    assert sum(result["acc_matrix"], []) == pytest.approx([90.0, 80.0, 70.0, 60.0, 50.0, 40.0])
    for key in ("avg_acc", "last_acc", "forgetting", "new_task_acc"):
        assert result[key] == pytest.approx(expected[key]), key
    assert result["avg_acc"] == pytest.approx(71.1111, abs=1e-4)
    # Incremental use: add_batch per stage, compute once.
    metric = load_continual_metric()
    for i in range(3):
        rows = [k for k, s in enumerate(stage) if s == i]
        metric.add_batch(
            predictions=[predictions[k] for k in rows],
            references=[references[k] for k in rows],
            task=[task[k] for k in rows],
            stage=[stage[k] for k in rows],
        )
    assert metric.compute()["avg_acc"] == pytest.approx(expected["avg_acc"])
