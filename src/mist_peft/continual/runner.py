"""Class-incremental runs: a host (SimpleCIL, RanPAC) on a backbone that is frozen or adapted before tasks.

One backbone trajectory per adaptation method; every host listed is fed the same features, so
`simplecil+mist` and `ranpac+mist` come from one MIST run. Adaptation happens before every task (the
reference) or before the first only, always on the current task's train split; test data is only
ever used for evaluation. With adaptation before every task, the hosts carry their old-class statistics
forward through the drift estimated on the current task (`drift_compensation`). The pre-trained backbone's
features never drift, so a host may also use them: `features="concat"` feeds [pre-trained || adapted] rows to
one host (APER, Zhou et al. 2023), `features="fuse"` sums the scores of a host on each half (`FusedHost`).
The drift map goes from the previous backbone's features (one map per adaptation, chained) or, with
`drift_anchor="pretrained"`, from the pre-trained backbone's (one map from statistics that never drift).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from ..config import MISTConfig
from ..encoders import FeatureEncoder, extract_features
from ..scoring import CrossTaskState
from ..training import MISTTrainingConfig, default_accelerator, train_mist
from .hosts import DRIFT_MODES, RESYNTHESIS, RIDGE_VALIDATION, FusedHost, RanPAC, SimpleCIL, fit_drift
from .metrics import continual_metrics
from .scenarios import Task

METHODS = ("frozen", "mist", "lora", "full", "mist-random", "mist-magnitude", "mist-ce", "mist-nodrop")
HOSTS = ("simplecil", "ranpac")
FEATURES = ("adapted", "concat", "fuse")
ADAPT = ("every", "first")
DRIFT_ANCHORS = ("previous", "pretrained")


def method_name(host: str, method: str) -> str:
    """`simplecil` for the frozen host, `simplecil+mist` etc. otherwise."""
    return host if method == "frozen" else f"{host}+{method}"


@dataclass
class ContinualConfig:
    """What a continual run compares and with which budget and recipe.

    The tuning recipe (optimizer, lr, steps, density, grad_drop, when to adapt) defaults to the one chosen on
    validation splits across data sets (README, "Continual learning"). `drift_compensation` is one of
    `DRIFT_MODES` for every host, or a mapping host -> mode. `diagnostics` adds, for every adapted method, the
    other compensation modes as extra rows (`host+method@mode`, same backbone trajectory) and the oracle
    (every statistic recomputed with the current backbone after each task: not exemplar-free, a ceiling only).
    `features` is what an adapted method's hosts see, for every host or per host like `drift_compensation`:
    the adapted backbone's features; those concatenated after the pre-trained backbone's (`concat`); or two
    hosts, one per half, whose scores are summed (`fuse`). The pre-trained features of each split are computed
    once per run and shared with the frozen method. `adapt` (per host like `drift_compensation`): run MIST before
    every task or the first only; hosts with different policies get one backbone trajectory each (the first
    task's adaptation is the same in both). `drift_anchor` (per host like `drift_compensation`): fit each
    drift map from the previous backbone's features and chain them (`previous`), or from the pre-trained
    backbone's features to the current ones, applied to class statistics kept in pre-trained space
    (`pretrained`: one map, nothing chained).
    """

    hosts: Sequence[str] = ("simplecil",)
    methods: Sequence[str] = ("frozen", "mist")
    # "every" task (the reference) or the "first" only, or per host; "first" with 30 steps won or tied for both
    # hosts on the validation splits of MNIST, Fashion-MNIST and CLINC150 (README, "Continual learning")
    adapt: str | Mapping[str, str] = "first"
    # 120 (with lr 3e-3, biases and norms) beat 60, as 60 beat 30, for both hosts on the validation splits of all
    # three data sets; the CLI's default too (a test keeps the two equal)
    steps_per_task: int = 120
    score_batches: int | None = None  # None: one full pass over the task's train data (spec §3.4)
    batch_size: int = 32
    eval_batch_size: int = 128
    density: float = 0.05
    grad_drop: float = 0.9
    optimizer: str = "sgd"
    lr: float = 3e-3  # chosen on validation splits (README, "How the default was chosen")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    full_lr: float = 1e-5
    head_lr: float = 1e-2
    lora_rank: int = 4
    pooling: str = "mean"
    projection_dim: int = 2000
    drift_compensation: str | Mapping[str, str] = "linear"
    features: str | Mapping[str, str] = field(default_factory=lambda: {"simplecil": "adapted", "ranpac": "fuse"})
    drift_anchor: str | Mapping[str, str] = "previous"
    drift_samples: int = 256
    ranpac_resynthesis: str = "full"  # RanPAC.compensate: rebuild old classes' G and Q ("full") or add the change
    ranpac_ridge: str = "all"  # RanPAC.ridge_validation: with old classes (chosen on validation) or the task alone
    diagnostics: bool = False
    overlap_decay: float | None = None
    frozen_quantile: float | None = None
    exclude_modules: Sequence[str] = field(default_factory=lambda: ["pooler.dense"])
    # MISTConfig.tune_biases_and_norms (the reference's behaviour; off in MISTConfig): dense bias and LayerNorm
    # deltas beside the sparse ones raised both hosts' gains on every validation cell
    # (README, "How the default was chosen")
    tune_biases_and_norms: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("hosts", HOSTS), ("methods", METHODS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"ContinualConfig.{name}={list(getattr(self, name))!r} is invalid: choose from "
                                 f"{list(allowed)}.")
        for name, modes, allowed in (("adapt", self.adapt_modes(), ADAPT), ("features", self.feature_modes(), FEATURES),
                                     ("drift_compensation", self.compensation_modes(), DRIFT_MODES),
                                     ("drift_anchor", self.anchor_modes(), DRIFT_ANCHORS)):
            if any(m not in allowed for m in modes.values()) or set(modes) - set(HOSTS):
                raise ValueError(f"ContinualConfig.{name}={getattr(self, name)!r} is invalid: use one of "
                                 f"{list(allowed)}, or a mapping from hosts {list(HOSTS)} to one.")
        if self.score_batches is not None and self.score_batches < 1:
            raise ValueError(f"ContinualConfig.score_batches={self.score_batches!r} is invalid: use None (one full "
                             "pass over the task) or a positive cap.")
        if self.ranpac_ridge not in RIDGE_VALIDATION:
            raise ValueError(f"ContinualConfig.ranpac_ridge={self.ranpac_ridge!r} is invalid: use one of "
                             f"{list(RIDGE_VALIDATION)}.")
        if self.ranpac_resynthesis not in RESYNTHESIS:
            raise ValueError(f"ContinualConfig.ranpac_resynthesis={self.ranpac_resynthesis!r} is invalid: use one "
                             f"of {list(RESYNTHESIS)}.")
        CrossTaskState(frozen_quantile=self.frozen_quantile, overlap_decay=self.overlap_decay)  # validates

    def adapt_modes(self) -> dict[str, str]:
        """When every host's backbone is adapted (`ADAPT`)."""
        return self._per_host("adapt")

    def compensation_modes(self) -> dict[str, str]:
        """Drift compensation mode of every host."""
        return self._per_host("drift_compensation")

    def feature_modes(self) -> dict[str, str]:
        """What every host of an adapted backbone sees (`FEATURES`)."""
        return self._per_host("features")

    def anchor_modes(self) -> dict[str, str]:
        """Where every host's drift maps start (`DRIFT_ANCHORS`)."""
        return self._per_host("drift_anchor")

    def _per_host(self, name: str) -> dict[str, str]:
        """Option `name` for every host: one value for all, or a mapping host -> value where a host left out keeps
        the option's default (`adapt={"ranpac": "every"}` leaves SimpleCIL on the default policy)."""
        def spread(value: str | Mapping[str, str]) -> dict[str, str]:
            return {h: value for h in HOSTS} if isinstance(value, str) else dict(value)

        default = ContinualConfig.__dataclass_fields__[name]
        default = default.default_factory() if callable(default.default_factory) else default.default
        return {**spread(default), **spread(getattr(self, name))}


def _make_host(host: str, config: ContinualConfig):
    return SimpleCIL() if host == "simplecil" else RanPAC(projection_dim=config.projection_dim, seed=config.seed,
                                                          resynthesis=config.ranpac_resynthesis,
                                                          ridge_validation=config.ranpac_ridge)


def _host_for(host: str, config: ContinualConfig, method: str):
    """The host that `method`'s features need: a pair of hosts for `features="fuse"` on an adapted backbone."""
    if method != "frozen" and config.feature_modes()[host] == "fuse":
        return FusedHost(_make_host(host, config), _make_host(host, config))
    return _make_host(host, config)


def adapt_backbone(backbone: nn.Module, method: str, loader: DataLoader, config: ContinualConfig, head: nn.Module | None,
                   num_classes: int, accelerator, task_index: int = 0,
                   cross_task: CrossTaskState | None = None) -> tuple[nn.Module, nn.Module]:
    """Tune the backbone on one task with the method's recipe; returns (plain backbone, head to keep)."""
    loss = "ce" if method == "mist-ce" else "mist"
    train_config = MISTTrainingConfig(loss=loss, pooling=config.pooling, max_steps=config.steps_per_task,
                                      max_score_batches=config.score_batches, optimizer=config.optimizer,
                                      lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                      head_lr=config.head_lr, num_classes=num_classes)
    if method == "full":
        backbone.requires_grad_(True)
        train_config.lr = config.full_lr
        result = train_mist(backbone, loader, head=head, config=train_config, accelerator=accelerator)
        backbone.requires_grad_(False)
        return backbone, result["head"]
    names = [n for n, _ in backbone.named_modules()]
    exclude = [m for m in config.exclude_modules if any(n == m or n.endswith("." + m) for n in names)] or None
    if method == "lora":
        model = get_peft_model(backbone, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                                    target_modules="all-linear", exclude_modules=exclude))
        result = train_mist(model, loader, head=head, config=train_config, accelerator=accelerator)
        return model.merge_and_unload(), result["head"]
    selection = {"mist-random": "random", "mist-magnitude": "magnitude"}.get(method, "mi_fisher")
    cross_task = cross_task if selection == "mi_fisher" else None
    model = get_peft_model(backbone, MISTConfig(
        target_modules="all-linear", exclude_modules=exclude, density=config.density,
        grad_drop=0.0 if method == "mist-nodrop" else config.grad_drop, selection=selection,
        tune_biases_and_norms=config.tune_biases_and_norms,
        seed=config.seed + task_index))  # a fresh random subset (and dropout stream) per task, like MI-Fisher's
    # the selection records the state's frozen_quantile / overlap_decay in the adapter's config (CrossTaskState.bind)
    result = train_mist(model, loader, head=head, config=train_config, accelerator=accelerator,
                        cross_task=cross_task)
    return model.merge_and_unload(), result["head"]


def changed_fraction(backbone: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Share of the pre-trained weights whose value differs now."""
    changed = total = 0
    for name, value in backbone.state_dict().items():
        if name in reference and value.is_floating_point():
            changed += int((value != reference[name]).sum())
            total += value.numel()
    return changed / max(1, total)


class FrozenFeatures:
    """The pre-trained backbone's features of each task split, computed once per run and shared by every method
    (the frozen method's own features, the pre-trained half of `features="concat"` and `"fuse"`)."""

    def __init__(self, make_backbone: Callable[[], nn.Module], collate: Callable, config: ContinualConfig,
                 device: torch.device | str = "cpu") -> None:
        self.make_backbone, self.collate, self.config, self.device = make_backbone, collate, config, device
        self.backbone: nn.Module | None = None
        self.cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, task: Task, split: str, backbone: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of `task`'s `split`; `backbone` may pass a pre-trained model already in memory."""
        key = (task.index, split)
        if key not in self.cache:
            # Without a frozen method this runs mid-run, for hosts that need pre-trained features. Building the
            # backbone (initial weights) and iterating a DataLoader (its base seed) draw from the global RNG, which
            # must not move the adapted run's draws: one host's options would change another host's rows.
            with torch.random.fork_rng(devices=[]):
                if backbone is None:
                    self.backbone = self.backbone or self.make_backbone().eval().to(self.device)
                    backbone = self.backbone
                loader = DataLoader(getattr(task, split), batch_size=self.config.eval_batch_size,
                                    collate_fn=self.collate)
                self.cache[key] = extract_features(FeatureEncoder(backbone, self.config.pooling), loader,
                                                   desc=f"pre-trained task {task.index} {split} features")
        return self.cache[key]


def _accuracies(host, tests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    return [100.0 * float((host.predict(x) == y).float().mean()) for x, y in tests]


def run_method(method: str, make_backbone: Callable[[], nn.Module], tasks: Sequence[Task], collate: Callable,
               config: ContinualConfig, accelerator=None,
               frozen_features: FrozenFeatures | None = None) -> dict[str, dict[str, Any]]:
    """One adaptation method through all tasks, evaluated with every host in `config.hosts`.

    Before each adaptation the current task's train features are taken with the old backbone; after it, with
    the new one, in the same order and with the evaluation transform, so the pairs fit the drift map.
    """
    adapt_modes = {config.adapt_modes()[h] for h in config.hosts}
    if len(adapt_modes) > 1:
        raise ValueError(f"run_method got hosts {list(config.hosts)} with different adapt policies "
                         f"{config.adapt!r}: run them separately (run_continual does).")
    adapt = adapt_modes.pop()
    drifts = method != "frozen" and adapt == "every"  # the backbone moves after old classes were learnt
    accelerator = accelerator or default_accelerator()
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    backbone = make_backbone().eval().to(accelerator.device)
    reference = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    modes = config.compensation_modes()
    diagnose = config.diagnostics and method != "frozen"
    # (host, mode) -> host instance; the first mode listed per host is the configured one (no other compensation
    # to compare where the backbone never moves after the first task).
    variants = {(h, m): _host_for(h, config, method)
                for h in config.hosts for m in ([modes[h]] + ([x for x in DRIFT_MODES if x != modes[h]]
                                                              if diagnose and drifts else []))}
    matrices: dict[tuple[str, str], list[list[float]]] = {key: [] for key in variants}
    oracle: dict[str, list[list[float]]] = {h: [] for h in config.hosts}
    choices: dict[tuple[str, str], list] = {key: [] for key in variants}
    num_classes = 1 + max(max(t.classes) for t in tasks)
    head = None
    cross_task = CrossTaskState(frozen_quantile=config.frozen_quantile, overlap_decay=config.overlap_decay)
    cached_test: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    cached_train: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    g = torch.Generator().manual_seed(config.seed)

    frozen_features = frozen_features or FrozenFeatures(make_backbone, collate, config, accelerator.device)
    feature_modes = config.feature_modes()

    def features(task, split, desc):
        """The current backbone's features of a split (the frozen method's come from the shared cache)."""
        if method == "frozen":
            return frozen_features(task, split, backbone)
        loader = DataLoader(getattr(task, split), batch_size=config.eval_batch_size, collate_fn=collate)
        return extract_features(FeatureEncoder(backbone, config.pooling), loader, desc=desc)

    def host_input(name, x, task, split):
        """What host `name` sees: `x`, or the pre-trained features of the same rows followed by `x`."""
        if method == "frozen" or feature_modes[name] == "adapted":
            return x  # "concat" and "fuse" see both halves
        return torch.cat([frozen_features(task, split)[0], x], dim=1)

    def accuracies(name, host, tests):
        return _accuracies(host, [(host_input(name, x, seen, "test"), y) for seen, (x, y) in tests])

    # (host, mode) -> whether its statistics are kept in pre-trained space and mapped from there
    anchored = {(h, m): m != "none" and drifts
                and config.anchor_modes()[h] == "pretrained" for h, m in variants}

    for task in tasks:
        adapt_now = method != "frozen" and (adapt == "every" or task.index == 0)
        compensate_now = adapt_now and task.index > 0
        before = None
        if adapt_now:
            if compensate_now and any(m != "none" and not anchored[(h, m)] for h, m in variants):
                before, _ = features(task, "train", f"{method} task {task.index} train features before adapting")
            loader = DataLoader(task.train, batch_size=config.batch_size, shuffle=True, collate_fn=collate,
                                generator=g, drop_last=len(task.train) > config.batch_size)
            backbone, head = adapt_backbone(backbone, method, loader, config, head, num_classes, accelerator,
                                            task.index, cross_task)
            backbone.eval()
            accelerator.free_memory()
            cached_test.clear()  # the backbone changed: old features are stale
            cached_train.clear()
        train_x, train_y = features(task, "train", f"{method} task {task.index} train features")
        pretrained_x = None
        if any(anchored.values()):
            pretrained_x, pretrained_y = frozen_features(task, "train")
            if not torch.equal(pretrained_y, train_y):
                raise RuntimeError("The pre-trained and current train features are not the same rows in the same order.")
        for (name, mode), host in variants.items():
            x = host_input(name, train_x, task, "train")
            # the same rows through the pre-trained backbone, for a host whose statistics live there
            anchor = host_input(name, pretrained_x, task, "train") if anchored[(name, mode)] else None
            if compensate_now and mode != "none":
                view = getattr(host, "drift_view", lambda rows: rows)  # FusedHost: only the adapted half drifts
                source = anchor if anchor is not None else host_input(name, before, task, "train")
                drift = fit_drift(view(source), view(x), train_y, mode, old_means=host.means(anchor is not None))
                extra = {} if name == "simplecil" else {"samples": config.drift_samples}
                host.compensate(drift, anchored=anchor is not None, **extra)
                choices[(name, mode)].append(drift.choice)
            host.fit_task(x, train_y, anchor=anchor)
        for seen in tasks[: task.index + 1]:
            if seen.index not in cached_test:
                cached_test[seen.index] = features(seen, "test", f"{method} task {seen.index} test features")
        tests = [(seen, cached_test[seen.index]) for seen in tasks[: task.index + 1]]
        for (name, mode), host in variants.items():
            matrices[(name, mode)].append(accuracies(name, host, tests))
        if diagnose:
            cached_train[task.index] = (train_x, train_y)
            for seen in tasks[: task.index]:
                if seen.index not in cached_train:
                    cached_train[seen.index] = features(seen, "train", f"{method} task {seen.index} oracle features")
            for name in config.hosts:
                fresh = _host_for(name, config, method)
                for seen in tasks[: task.index + 1]:
                    x, y = cached_train[seen.index]
                    x = host_input(name, x, seen, "train")
                    fresh.fit_task(x, y) if seen.index == task.index or name == "simplecil" else \
                        fresh.fit_task(x, y, solve=False)
                oracle[name].append(accuracies(name, fresh, tests))
    seconds = time.perf_counter() - start
    changed = changed_fraction(backbone, reference)
    sizes = [len(t.test) for t in tasks]

    def summary(matrix):
        metrics = continual_metrics(matrix, task_sizes=sizes)
        return {k: metrics[k] for k in ("avg_acc", "last_acc", "forgetting", "new_task_acc")}

    out = {}
    for (name, mode), matrix in matrices.items():
        row = {**summary(matrix), "acc_matrix": matrix, "seconds": seconds, "changed_fraction": changed,
               "drift_compensation": mode if drifts else "none",
               "drift_anchor": "pretrained" if anchored[(name, mode)] else
               "previous" if drifts and mode != "none" else "none",
               "features": feature_modes[name] if method != "frozen" else "pre-trained",
               "adapt": adapt if method != "frozen" else "none"}
        if choices[(name, mode)]:
            row["drift_choices"] = choices[(name, mode)]
        if mode == modes[name]:
            if diagnose:
                row["oracle"] = {**summary(oracle[name]), "acc_matrix": oracle[name]}
            out[method_name(name, method)] = row
        else:
            out[f"{method_name(name, method)}@{mode}"] = row
    return out


def run_continual(make_backbone: Callable[[], nn.Module], tasks: Sequence[Task], collate: Callable,
                  config: ContinualConfig, accelerator=None) -> dict[str, Any]:
    """Every method of `config`, each from a fresh pre-trained backbone (one per adapt policy among the hosts);
    returns the results.json shape."""
    results: dict[str, Any] = {}
    accelerator = accelerator or default_accelerator()
    frozen_features = FrozenFeatures(make_backbone, collate, config, accelerator.device)
    for method in config.methods:
        policies = {"every": config.hosts} if method == "frozen" else {
            mode: tuple(h for h in config.hosts if config.adapt_modes()[h] == mode)
            for mode in dict.fromkeys(config.adapt_modes()[h] for h in config.hosts)}
        for mode, hosts in policies.items():
            part = replace(config, hosts=hosts, adapt=mode)
            results.update(run_method(method, make_backbone, tasks, collate, part, accelerator, frozen_features))
    return {"config": asdict(config), "methods": results}
