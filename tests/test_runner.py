"""The continual runner's feature sources: `features="concat"` and `"fuse"` put the pre-trained backbone's features
next to the adapted ones, computed once per run; that half never drifts."""

import pytest
import torch

from mist_peft import assets
from mist_peft.cli import _subsample
from mist_peft.continual import runner
from mist_peft.continual.hosts import RanPAC, SimpleCIL
from mist_peft.continual.runner import ContinualConfig, run_continual
from mist_peft.continual.scenarios import class_incremental
from mist_peft.encoders import image_collate
from mist_peft.training import train_mist


def recording(host_class, log):
    """A host class whose instances append (host name, fitted features) to `log`."""

    class Recording(host_class):
        def fit_task(self, features, labels, *args, **kwargs):
            log.append((host_class.__name__, torch.as_tensor(features).clone()))
            return super().fit_task(features, labels, *args, **kwargs)

    return Recording


@pytest.fixture(scope="module")
def mnist_tasks():
    data = assets.load_mnist()
    data = {"train": _subsample(data["train"], 8, 0).filter(lambda r: r["label"] < 4),
            "test": _subsample(data["test"], 4, 0).filter(lambda r: r["label"] < 4)}
    return class_incremental(data, num_tasks=2, seed=1993)


def test_concat_features_keep_an_exact_frozen_half_and_apply_per_host(mnist_tasks, monkeypatch):
    calls, log = [], []

    def make_backbone():
        calls.append(1)
        return assets.load_vit(28)

    hosts = {"simplecil": recording(SimpleCIL, log), "ranpac": recording(RanPAC, log)}
    monkeypatch.setattr(runner, "_make_host", lambda host, config: hosts[host]() if host == "simplecil" else
                        hosts[host](projection_dim=64, seed=config.seed))
    config = ContinualConfig(adapt="every", hosts=("simplecil", "ranpac"), methods=("frozen", "mist"), steps_per_task=2,
                             features={"ranpac": "concat"}, batch_size=8, lr=1e-2, drift_compensation="none", seed=0)
    results = run_continual(make_backbone, mnist_tasks, image_collate(28), config)["methods"]
    assert len(calls) == 2  # the frozen method's backbone also serves the pre-trained half of "concat"
    fits = {name: [x for n, x in log if n == name] for name in ("SimpleCIL", "RanPAC")}
    frozen = fits["SimpleCIL"][:2]  # the frozen method's fits, task 0 and task 1
    assert [len(v) for v in fits.values()] == [4, 4] and torch.equal(fits["RanPAC"][0], frozen[0])
    hidden = frozen[0].shape[1]
    for task, base in enumerate(frozen):
        adapted, concat = fits["SimpleCIL"][2 + task], fits["RanPAC"][2 + task]
        assert adapted.shape == base.shape and concat.shape == (base.shape[0], 2 * hidden)
        assert torch.equal(concat[:, :hidden], base)  # the pre-trained half is the frozen host's input
        assert torch.equal(concat[:, hidden:], adapted)  # the adapted half is what an "adapted" host sees
        assert not torch.allclose(adapted, base)
    assert set(results) == {"simplecil", "ranpac", "simplecil+mist", "ranpac+mist"}


def test_concat_drift_compensation_leaves_the_frozen_half_of_old_prototypes_exact(mnist_tasks, monkeypatch):
    hosts = []

    def make_host(host, config):
        hosts.append(SimpleCIL())
        return hosts[-1]

    monkeypatch.setattr(runner, "_make_host", make_host)
    config = ContinualConfig(adapt="every", hosts=("simplecil",), methods=("frozen", "mist"), features="concat",
                             steps_per_task=2, batch_size=8, lr=1e-2, drift_compensation="linear", seed=0)
    run_continual(lambda: assets.load_vit(28), mnist_tasks, image_collate(28), config)
    frozen, concat = hosts
    hidden = frozen.prototypes.shape[1]
    first = len(mnist_tasks[0].classes)
    # Task 0's prototypes went through the drift map fitted at task 1; its frozen columns are the identity.
    assert torch.equal(concat.classes, frozen.classes)
    assert torch.equal(concat.prototypes[:first, :hidden], frozen.prototypes[:first])
    assert not torch.allclose(concat.prototypes[:first, hidden:], concat.prototypes[:first, :hidden])


def test_fuse_keeps_an_exact_pretrained_ranpac_beside_the_compensated_adapted_one(mnist_tasks, monkeypatch):
    made = []

    def make_host(host, config):
        made.append(RanPAC(projection_dim=64, seed=config.seed))
        return made[-1]

    monkeypatch.setattr(runner, "_make_host", make_host)
    config = ContinualConfig(adapt="every", hosts=("ranpac",), methods=("frozen", "mist"), features="fuse", steps_per_task=2,
                             batch_size=8, lr=1e-2, drift_compensation="linear", seed=0)
    results = run_continual(lambda: assets.load_vit(28), mnist_tasks, image_collate(28), config)["methods"]
    frozen, pretrained, adapted = made
    # The pre-trained half went through a drift compensation at task 1 in the fused host, and was left alone.
    assert torch.equal(pretrained.gram, frozen.gram) and torch.equal(pretrained.w_out, frozen.w_out)
    assert adapted._synthetic and not pretrained._synthetic
    assert results["ranpac+mist"]["drift_compensation"] == "linear"


def test_pretrained_anchor_keeps_old_statistics_in_pretrained_space(mnist_tasks, monkeypatch):
    """`drift_anchor="pretrained"`: the hosts store their classes' pre-trained statistics (the frozen hosts' own,
    bit for bit), fit the drift from the cached pre-trained features and never extract "before" features."""
    made, descs = [], []

    def make_host(host, config):
        made.append(SimpleCIL() if host == "simplecil" else RanPAC(projection_dim=64, seed=config.seed))
        return made[-1]

    def extract(encoder, loader, desc=None):
        descs.append(desc)
        return extract_features(encoder, loader, desc=desc)

    extract_features = runner.extract_features
    monkeypatch.setattr(runner, "_make_host", make_host)
    monkeypatch.setattr(runner, "extract_features", extract)
    config = ContinualConfig(adapt="every", hosts=("simplecil", "ranpac"), methods=("frozen", "mist"), steps_per_task=2,
                             batch_size=8, lr=1e-2, drift_anchor="pretrained", seed=0)
    results = run_continual(lambda: assets.load_vit(28), mnist_tasks, image_collate(28), config)["methods"]
    frozen_sc, frozen_rp, sc, rp_pretrained, rp_adapted = made
    assert not any("before" in d for d in descs)
    for c, prototype in frozen_sc.means().items():
        assert torch.equal(sc.anchors[c], prototype)
    for c, (n, total, second) in frozen_rp.class_stats.items():
        assert rp_adapted.anchor_stats[c][0] == n and torch.equal(rp_adapted.anchor_stats[c][1], total)
        assert torch.equal(rp_adapted.anchor_stats[c][2], second)
    assert not rp_pretrained.anchor_stats and rp_adapted._synthetic  # compensated once, from the anchors
    assert [results[k]["drift_anchor"] for k in ("simplecil", "simplecil+mist", "ranpac+mist")] == \
        ["none", "pretrained", "pretrained"]
    first = len(mnist_tasks[0].classes)
    assert not torch.allclose(sc.prototypes[:first], frozen_sc.prototypes[:first])  # mapped, not copied


def test_features_option_is_checked():
    with pytest.raises(ValueError, match="features='both'.*adapted"):
        ContinualConfig(features="both")
    with pytest.raises(ValueError, match="features=.*mapping from hosts"):
        ContinualConfig(features={"lda": "concat"})
    assert ContinualConfig(features={"ranpac": "concat"}).feature_modes() == {"simplecil": "adapted",
                                                                             "ranpac": "concat"}
    with pytest.raises(ValueError, match="drift_anchor='first'.*pretrained"):
        ContinualConfig(drift_anchor="first")


def test_a_host_left_out_of_a_per_host_option_keeps_that_options_default():
    """`--adapt ranpac=every` must leave SimpleCIL on the default policy (it used to fall back to "every", the
    default of an earlier recipe), and the same for every per-host option."""
    from mist_peft.cli import build_parser, make_config

    def modes(*flags):
        config = make_config(build_parser().parse_args(["continual", *flags, "--output-dir", "unused"]))
        return (config.adapt_modes(), config.compensation_modes(), config.feature_modes(), config.anchor_modes())

    default = modes()
    assert default == ({"simplecil": "first", "ranpac": "first"}, {"simplecil": "linear", "ranpac": "linear"},
                       {"simplecil": "adapted", "ranpac": "fuse"}, {"simplecil": "previous", "ranpac": "previous"})
    for i, (flag, value) in enumerate((("--adapt", "every"), ("--drift-compensation", "sdc"),
                                       ("--features", "concat"), ("--drift-anchor", "pretrained"))):
        for host, other in (("simplecil", "ranpac"), ("ranpac", "simplecil")):
            got = modes(flag, f"{host}={value}")
            assert got[i] == {host: value, other: default[i][other]}
            assert got[:i] + got[i + 1:] == default[:i] + default[i + 1:]


def test_cli_features_flag_reaches_the_config():
    from mist_peft.cli import build_parser, make_config

    def parse(*flags):
        return make_config(build_parser().parse_args(["continual", *flags]))

    assert parse().feature_modes() == ContinualConfig().feature_modes() == {"simplecil": "adapted", "ranpac": "fuse"}
    assert parse("--features", "concat").feature_modes() == {"simplecil": "concat", "ranpac": "concat"}
    assert parse("--features", "ranpac=concat").feature_modes() == {"simplecil": "adapted", "ranpac": "concat"}
    assert parse().anchor_modes() == ContinualConfig().anchor_modes() == {"simplecil": "previous",
                                                                          "ranpac": "previous"}
    assert parse("--drift-anchor", "ranpac=pretrained").anchor_modes() == {"simplecil": "previous",
                                                                           "ranpac": "pretrained"}
    for flag in ("task", "all"):  # RanPAC's ridge validation reaches both hosts of a fused RanPAC
        fused = runner._host_for("ranpac", parse("--ranpac-ridge", flag), "mist")
        assert fused.pretrained.ridge_validation == fused.adapted.ridge_validation == flag
    with pytest.raises(ValueError, match="ranpac_ridge='old'.*task"):
        ContinualConfig(ranpac_ridge="old")


def test_per_host_adapt_policies_run_one_trajectory_each_with_the_single_policy_rows(mnist_tasks, monkeypatch):
    """`adapt={"simplecil": "first", "ranpac": "every"}` gives each host exactly the rows of a run with its policy
    alone (one backbone trajectory per policy), and run_method refuses hosts with different policies."""
    calls = []

    def make_backbone():
        calls.append(1)
        return assets.load_vit(28)

    monkeypatch.setattr(runner, "_make_host", lambda host, config: SimpleCIL() if host == "simplecil" else
                        RanPAC(projection_dim=64, seed=config.seed))

    def run(adapt, hosts=("simplecil", "ranpac")):
        config = ContinualConfig(hosts=hosts, methods=("frozen", "mist"), steps_per_task=2, batch_size=8, lr=1e-2,
                                 adapt=adapt, seed=0)
        return run_continual(make_backbone, mnist_tasks, image_collate(28), config)["methods"]

    mixed = run({"simplecil": "first", "ranpac": "every"})
    assert len(calls) == 3  # frozen, then one MIST trajectory per policy
    first, every = run("first", ("simplecil",)), run("every", ("ranpac",))
    for name, alone in (("simplecil+mist", first), ("ranpac+mist", every)):
        assert mixed[name]["acc_matrix"] == alone[name]["acc_matrix"], name
        assert mixed[name]["changed_fraction"] == alone[name]["changed_fraction"], name
    assert (mixed["simplecil+mist"]["adapt"], mixed["ranpac+mist"]["adapt"], mixed["ranpac"]["adapt"]) == \
        ("first", "every", "none")
    assert mixed["simplecil+mist"]["changed_fraction"] < mixed["ranpac+mist"]["changed_fraction"]

    with pytest.raises(ValueError, match="different adapt policies"):
        runner.run_method("mist", make_backbone, mnist_tasks, image_collate(28),
                          ContinualConfig(hosts=("simplecil", "ranpac"), adapt={"ranpac": "every"}))
    with pytest.raises(ValueError, match="adapt='sometimes'.*every"):
        ContinualConfig(adapt="sometimes")
    from mist_peft.cli import build_parser, make_config

    assert make_config(build_parser().parse_args(["continual", "--adapt", "simplecil=every"])).adapt_modes() == \
        {"simplecil": "every", "ranpac": "first"}  # a host left out keeps the default policy


def test_one_hosts_features_do_not_change_another_hosts_rows(mnist_tasks, monkeypatch):
    """Without a frozen method the pre-trained backbone is built mid-run for a fused RanPAC; that must not advance
    the adapted run's global RNG (it did: the MI head of task 1 was drawn differently and SimpleCIL's row moved)."""
    monkeypatch.setattr(runner, "_make_host", lambda host, config: SimpleCIL() if host == "simplecil" else
                        RanPAC(projection_dim=64, seed=config.seed))
    rows = []
    for features in ("adapted", {"ranpac": "fuse"}):
        config = ContinualConfig(adapt="every", hosts=("simplecil", "ranpac"), methods=("mist",), steps_per_task=2, batch_size=8,
                                 lr=1e-2, features=features, seed=0)
        rows.append(run_continual(lambda: assets.load_vit(28), mnist_tasks, image_collate(28), config)["methods"])
    assert rows[0]["simplecil+mist"]["acc_matrix"] == rows[1]["simplecil+mist"]["acc_matrix"]
    assert [r["ranpac+mist"]["features"] for r in rows] == ["adapted", "fuse"]  # the option did reach RanPAC


def test_cross_task_options_reach_each_mi_fisher_adapter_with_one_state_across_tasks(mnist_tasks, monkeypatch):
    """`--frozen-quantile/--overlap-decay`: every MI-Fisher adapter's MISTConfig records them (so a saved adapter
    says how it was selected) and one state is carried through the tasks; the random subset takes neither."""
    calls = []

    def spy(model, *args, cross_task=None, **kwargs):
        frozen_before = sum(int(f.sum()) for f in cross_task.frozen.values()) if cross_task else 0
        result = train_mist(model, *args, cross_task=cross_task, **kwargs)
        config = model.peft_config["default"]  # as the adapter would be saved after its selection
        calls.append((config.selection, config.frozen_quantile, config.overlap_decay, cross_task))
        if cross_task is not None:
            assert sum(int(f.sum()) for f in cross_task.frozen.values()) > frozen_before  # the task froze entries
        return result

    monkeypatch.setattr(runner, "train_mist", spy)
    config = ContinualConfig(adapt="every", hosts=("simplecil",), methods=("mist", "mist-random"), steps_per_task=2,
                             batch_size=8, lr=1e-2, frozen_quantile=1.0, overlap_decay=0.9, seed=0)
    run_continual(lambda: assets.load_vit(28), mnist_tasks, image_collate(28), config)
    fisher = [c for c in calls if c[0] == "mi_fisher"]
    assert [c[:3] for c in fisher] == [("mi_fisher", 1.0, 0.9)] * 2
    assert fisher[0][3] is fisher[1][3] is not None
    assert [c for c in calls if c[0] == "random"] == [("random", None, None, None)] * 2
