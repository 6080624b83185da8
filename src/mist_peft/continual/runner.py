"""Class-incremental runs: a host (SimpleCIL, RanPAC) on a backbone that is frozen or adapted before tasks.

One backbone trajectory per adaptation method; every host listed is fed the same features, so
`simplecil+mist` and `ranpac+mist` come from one MIST run. Adaptation happens before every task (the
reference) or before the first only, always on the current task's train split; test data is only
ever used for evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from ..config import MISTConfig
from ..encoders import FeatureEncoder, extract_features
from ..training import MISTTrainingConfig, default_accelerator, train_mist
from .hosts import RanPAC, SimpleCIL
from .metrics import continual_metrics
from .scenarios import Task

METHODS = ("frozen", "mist", "lora", "full", "mist-random", "mist-magnitude", "mist-ce", "mist-nodrop")
HOSTS = ("simplecil", "ranpac")


def method_name(host: str, method: str) -> str:
    """`simplecil` for the frozen host, `simplecil+mist` etc. otherwise."""
    return host if method == "frozen" else f"{host}+{method}"


@dataclass
class ContinualConfig:
    """What a continual run compares and with which budget (defaults sized for a 2-core CPU)."""

    hosts: Sequence[str] = ("simplecil",)
    methods: Sequence[str] = ("frozen", "mist")
    adapt: str = "every"  # "every" task (reference) or "first" task only
    steps_per_task: int = 20
    score_batches: int = 4
    batch_size: int = 32
    eval_batch_size: int = 128
    density: float = 0.05
    grad_drop: float = 0.9
    lr: float = 1e-4
    full_lr: float = 1e-5
    head_lr: float = 1e-2
    lora_rank: int = 4
    pooling: str = "mean"
    projection_dim: int = 2000
    exclude_modules: Sequence[str] = field(default_factory=lambda: ["pooler.dense"])
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("hosts", HOSTS), ("methods", METHODS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"ContinualConfig.{name}={list(getattr(self, name))!r} is invalid: choose from "
                                 f"{list(allowed)}.")
        if self.adapt not in ("every", "first"):
            raise ValueError(f"ContinualConfig.adapt={self.adapt!r} is invalid: use 'every' or 'first'.")


def _make_host(host: str, config: ContinualConfig):
    return SimpleCIL() if host == "simplecil" else RanPAC(projection_dim=config.projection_dim, seed=config.seed)


def adapt_backbone(backbone: nn.Module, method: str, loader: DataLoader, config: ContinualConfig, head: nn.Module | None,
           num_classes: int, accelerator) -> tuple[nn.Module, nn.Module]:
    """Tune the backbone on one task with the method's recipe; returns (plain backbone, head to keep)."""
    loss = "ce" if method == "mist-ce" else "mist"
    train_config = MISTTrainingConfig(loss=loss, pooling=config.pooling, max_steps=config.steps_per_task,
                                      max_score_batches=config.score_batches, lr=config.lr, head_lr=config.head_lr,
                                      num_classes=num_classes)
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
    else:
        selection = {"mist-random": "random", "mist-magnitude": "magnitude"}.get(method, "mi_fisher")
        model = get_peft_model(backbone, MISTConfig(
            target_modules="all-linear", exclude_modules=exclude, density=config.density,
            grad_drop=0.0 if method == "mist-nodrop" else config.grad_drop, selection=selection, seed=config.seed))
    result = train_mist(model, loader, head=head, config=train_config, accelerator=accelerator)
    return model.merge_and_unload(), result["head"]


def changed_fraction(backbone: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Share of the pre-trained weights whose value differs now."""
    changed = total = 0
    for name, value in backbone.state_dict().items():
        if name in reference and value.is_floating_point():
            changed += int((value != reference[name]).sum())
            total += value.numel()
    return changed / max(1, total)


def run_method(method: str, make_backbone: Callable[[], nn.Module], tasks: Sequence[Task], collate: Callable,
               config: ContinualConfig, accelerator=None) -> dict[str, dict[str, Any]]:
    """One adaptation method through all tasks, evaluated with every host in `config.hosts`."""
    accelerator = accelerator or default_accelerator()
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    backbone = make_backbone().eval()
    reference = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    hosts = {h: _make_host(h, config) for h in config.hosts}
    matrices: dict[str, list[list[float]]] = {h: [] for h in config.hosts}
    num_classes = 1 + max(max(t.classes) for t in tasks)
    head = None
    cached_test: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    g = torch.Generator().manual_seed(config.seed)

    def features(dataset, desc):
        loader = DataLoader(dataset, batch_size=config.eval_batch_size, collate_fn=collate)
        return extract_features(FeatureEncoder(backbone, config.pooling), loader, desc=desc)

    for task in tasks:
        adapt_now = method != "frozen" and (config.adapt == "every" or task.index == 0)
        if adapt_now:
            loader = DataLoader(task.train, batch_size=config.batch_size, shuffle=True, collate_fn=collate,
                                generator=g, drop_last=len(task.train) > config.batch_size)
            backbone, head = adapt_backbone(backbone, method, loader, config, head, num_classes, accelerator)
            backbone.eval()
            accelerator.free_memory()
            cached_test.clear()  # the backbone changed: old test features are stale
        train_x, train_y = features(task.train, f"{method} task {task.index} train features")
        for host in hosts.values():
            host.fit_task(train_x, train_y)
        for name in config.hosts:
            matrices[name].append([])
        for seen in tasks[: task.index + 1]:
            if seen.index not in cached_test:
                cached_test[seen.index] = features(seen.test, f"{method} task {seen.index} test features")
            x, y = cached_test[seen.index]
            for name, host in hosts.items():
                matrices[name][-1].append(100.0 * float((host.predict(x) == y).float().mean()))
    seconds = time.perf_counter() - start
    changed = changed_fraction(backbone, reference)
    sizes = [len(t.test) for t in tasks]
    out = {}
    for name in config.hosts:
        metrics = continual_metrics(matrices[name], task_sizes=sizes)
        out[method_name(name, method)] = {
            "avg_acc": metrics["avg_acc"], "last_acc": metrics["last_acc"], "forgetting": metrics["forgetting"],
            "new_task_acc": metrics["new_task_acc"], "acc_matrix": matrices[name], "seconds": seconds,
            "changed_fraction": changed,
        }
    return out


def run_continual(make_backbone: Callable[[], nn.Module], tasks: Sequence[Task], collate: Callable,
                  config: ContinualConfig, accelerator=None) -> dict[str, Any]:
    """Every method of `config`, each from a fresh pre-trained backbone; returns the results.json shape."""
    results: dict[str, Any] = {}
    for method in config.methods:
        results.update(run_method(method, make_backbone, tasks, collate, config, accelerator))
    return {"config": asdict(config), "methods": results}
