"""`benchmarks/continual.py`'s summary: the per-seed target counts the README quotes, and `--summarise` rebuilding a
summary from stored per-seed results exactly as the run that wrote them did."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "continual.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("continual_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(avg, last, forgetting):
    return {"avg_acc": avg, "last_acc": last, "forgetting": forgetting, "new_task_acc": avg,
            "changed_fraction": 0.0, "seconds": 1.0, "acc_matrix": [[avg]]}


def test_targets_count_ties_as_met_and_misses_by_a_hair(bench):
    paired = {"avg_acc": [1.0, 0.95, 2.0], "last_acc": [-1e-9, -0.25, 3.0], "forgetting": [3.0, 3.01, -5.0]}
    assert bench.targets_met(paired) == {"Avg >= frozen + 1.0": 2, "Last >= frozen": 2, "forgetting <= frozen + 3": 2}


def test_summarise_from_stored_seeds_matches_the_run(bench, tmp_path):
    out = tmp_path / "continual_image"
    config = {"adapt": "every", "hosts": ["simplecil", "ranpac"]}
    runs = {"1993": (row(50, 40, 10), row(60, 45, 14), row(90, 88, 5), row(90.5, 88, 4)),
            "1994": (row(52, 41, 12), row(52.5, 42, 12), row(91, 89, 4), row(93, 90, 8))}
    for seed, (s, sm, r, rm) in runs.items():
        (out / f"seed{seed}").mkdir(parents=True)
        (out / f"seed{seed}" / "results.json").write_text(json.dumps({"config": config, "methods": {
            "simplecil": s, "simplecil+mist": sm, "ranpac": r, "ranpac+mist": rm}}))
    for seed, adapt in (("1993", {"simplecil": "first", "ranpac": "first"}), ("1994", "first")):
        (out / f"seed{seed}-first").mkdir()
        (out / f"seed{seed}-first" / "results.json").write_text(json.dumps({"config": {**config, "adapt": adapt},
            "methods": {"simplecil+mist": row(70, 50, 9), "ranpac+mist": row(92, 90, 3)}}))

    first = bench.load_seed(out, "1993")
    assert sorted(first["methods"]) == ["ranpac", "ranpac+mist", "ranpac+mist[first]", "simplecil", "simplecil+mist",
                                        "simplecil+mist[first]"]
    summary = bench.summarise([bench.load_seed(out, s) for s in runs])
    assert summary["simplecil+mist"]["paired"] == {"avg_acc": [10, 0.5], "last_acc": [5, 1], "forgetting": [4, 0]}
    assert summary["simplecil+mist"]["targets_met"] == {"Avg >= frozen + 1.0": 1, "Last >= frozen": 2,
                                                         "forgetting <= frozen + 3": 1}
    assert summary["ranpac+mist"]["targets_met"] == {"Avg >= frozen + 1.0": 1, "Last >= frozen": 2,
                                                      "forgetting <= frozen + 3": 1}
    assert summary["simplecil+mist[first]"]["paired"]["avg_acc"] == [20, 18]
    table = bench.table(summary, 2)
    assert "| simplecil+mist | 1 | 2 | 1 |" in table and "| ranpac+mist | 1 | 2 | 1 |" in table


def test_the_other_policys_diagnostic_rows_keep_their_policy_and_close_a_gap(bench):
    """With `--adapt first` the default, the every-task run brings the drift diagnostics: its stale twin must be
    found under the same policy label, or the share of the oracle gap closed is lost from the summary."""
    every = row(80, 70, 10) | {"oracle": row(85, 76, 8)}
    runs = [{"config": {"adapt": "first", "hosts": ["simplecil"]}, "methods": {
        "simplecil": row(50, 40, 10), "simplecil+mist": row(70, 60, 9)}} for _ in range(2)]
    for run, stale in zip(runs, (64, 66), strict=True):
        bench.merge_other_policy(run, {"config": {"adapt": "every", "hosts": ["simplecil"]}, "methods": {
            "simplecil+mist": every, "simplecil+mist@none": row(75, stale, 12), "simplecil+mist@sdc": row(78, 68, 11)}})
    assert sorted(runs[0]["methods"]) == ["simplecil", "simplecil+mist", "simplecil+mist[every]",
                                          "simplecil+mist[every]@none", "simplecil+mist[every]@sdc"]
    summary = bench.summarise(runs)
    assert summary["simplecil+mist[every]"]["gap_closed"] == pytest.approx((6 + 4) / (12 + 10))
    assert summary["simplecil+mist[every]@none"]["paired"]["last_acc"] == [24, 26]
    assert "gap_closed" not in summary["simplecil+mist"]  # nothing drifts on the first-task run


@pytest.fixture(scope="module")
def fusion_study():
    """`benchmarks/fusion_weights.py` (it imports `recipe_study` from its own folder, as when run as a script)."""
    import sys
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec = importlib.util.spec_from_file_location("fusion_weights", BENCH.parent / "fusion_weights.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


@pytest.mark.parametrize("host", ["simplecil", "ranpac"])
def test_fusion_replay_reproduces_the_fused_host_and_both_ends(fusion_study, host):
    """The study's replay must score weight 1 exactly as the runner's FusedHost, weight 0 as the host on the
    pre-trained half alone (the frozen host) and weight inf as the host on the adapted half alone."""
    import torch

    from mist_peft.continual.hosts import FusedHost, RanPAC, SimpleCIL
    from mist_peft.continual.metrics import continual_metrics
    from mist_peft.continual.runner import ContinualConfig, _accuracies

    config = ContinualConfig(projection_dim=64, seed=3)  # RanPAC's ridge validated with the old classes (default)

    def make():
        return SimpleCIL() if host == "simplecil" else RanPAC(projection_dim=64, seed=3, ridge_validation="all")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g)

    def rows(classes, n):
        y = torch.tensor(classes).repeat_interleave(n)
        return centres[y] + 1.5 * torch.randn(len(y), 16, generator=g), y
    fits = [rows([0, 1, 2], 20), rows([3, 4, 5], 20)]
    tests = [rows([0, 1, 2], 15), rows([3, 4, 5], 15)]
    record = {"fits": fits, "tests": [tests[:1], tests]}
    replayed = fusion_study.replay(record, host, config)

    def expected(fit_one, score_one):
        matrix = []
        for stage, (x, y) in enumerate(fits):
            fit_one(x, y)
            matrix.append(score_one(tests[: stage + 1]))
        return {m: continual_metrics(matrix, task_sizes=[45, 45])[m] for m in fusion_study.METRICS}
    fused = FusedHost(make(), make())
    assert replayed[1.0] == expected(fused.fit_task, lambda seen: _accuracies(fused, seen))
    for weight, half in ((0.0, slice(0, 8)), (float("inf"), slice(8, 16))):
        alone = make()
        assert replayed[weight] == expected(
            lambda x, y, alone=alone, half=half: alone.fit_task(x[:, half], y),
            lambda seen, alone=alone, half=half: _accuracies(alone, [(x[:, half], y) for x, y in seen]))
    assert replayed[0.0] != replayed[float("inf")]  # the two halves differ, so the ends are really checked
