"""MI-Fisher selection: one pass of the MI loss, squared gradients accumulated per targeted weight.

Score(w) = mean over minibatches of (dL_MI/dw)^2 (the reference's extra 1/N does not change rankings).
Memory: one fp32 score tensor per targeted weight; each weight's gradient is folded into its score by a
post-accumulate hook and freed at once. Under several processes every process scores its own shard and
the scores are summed (Accelerate's `reduce`), so every process installs the same mask.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import MISTConfig, check_cross_task
from .layer import MISTLayer
from .objectives import MIObjective
from .selection import install_selection, mist_layers, top_entries

PEFT_PREFIX = "base_model.model."


def weight_name(module_name: str) -> str:
    """Module names without PEFT's wrapper prefix: stable keys for caches and cross-task state."""
    return module_name.removeprefix(PEFT_PREFIX)


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, MISTLayer]:
    return {weight_name(n): m for n, m in mist_layers(model, adapter_name).items()}


def active_adapter(model: nn.Module) -> str:
    name = getattr(model, "active_adapter", None)
    return name if isinstance(name, str) else "default"


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def mi_fisher_scores(objective: MIObjective, dataloader: Iterable, layers: Mapping[str, MISTLayer],
                     accelerator=None, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Accumulate squared minibatch gradients of the MI loss for each targeted base weight."""
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    scores = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    handles, was_trainable = [], {name: w.requires_grad for name, w in weights.items()}

    def fold(name: str):
        def hook(param: torch.Tensor) -> None:
            scores[name].add_(param.grad.detach().float().pow(2))
            param.grad = None
        return hook

    for name, w in weights.items():
        w.requires_grad_(True)
        handles.append(w.register_post_accumulate_grad_hook(fold(name)))
    trainable = [p for p in objective.parameters() if p.requires_grad and not any(p is w for w in weights.values())]
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    was_training = objective.training
    objective.train()  # the reference scores in train mode (dropout views for text need it too)
    batches = 0
    total = min(len(dataloader), max_batches) if hasattr(dataloader, "__len__") and max_batches else None
    show = accelerator is None or accelerator.is_local_main_process
    try:
        for batch in tqdm(dataloader, total=total, desc="MI-Fisher scoring", disable=not show):
            if max_batches is not None and batches >= max_batches:
                break
            objective(_to_device(batch, device)).backward()
            for p in trainable:
                p.grad = None
            batches += 1
    finally:
        for h in handles:
            h.remove()
        for name, w in weights.items():
            w.requires_grad_(was_trainable[name])
        objective.train(was_training)
    count = torch.tensor(float(batches), device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        count = accelerator.reduce(count, "sum")
        scores = {name: accelerator.reduce(s, "sum") for name, s in scores.items()}
    if float(count) == 0:
        raise ValueError("The scoring dataloader yielded no batch; MI-Fisher selection needs data.")
    return {name: s.div_(float(count)) for name, s in scores.items()}


def at_or_above_quantile(scores: torch.Tensor, q: float) -> torch.Tensor:
    """Entries with score >= the linear-interpolation quantile q of the tensor (q = 1.0: the maximum and its
    ties), as the reference's `torch.quantile` threshold; `kthvalue` works on tensors of any size."""
    flat = scores.reshape(-1).float()
    pos = q * (flat.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, flat.numel() - 1)
    v_lo, v_hi = flat.kthvalue(lo + 1).values, flat.kthvalue(hi + 1).values
    return scores >= v_lo + (v_hi - v_lo) * (pos - lo)


@dataclass
class CrossTaskState:
    """The reference's two cross-task mechanisms (MIST_SPEC §3.7), both off by default.

    - `frozen_quantile` q_f: after each task, entries scoring at or above the per-tensor quantile q_f of that
      task's scores join the frozen set (1.0: the maximum plus ties, the reference's SimpleCIL file; 0.9995: its
      RanPAC file). Frozen entries' scores are zeroed before selection in every later task, as in the reference.
    - `overlap_decay`: a selected entry's gradient is multiplied by decay**C, C = earlier tasks that
      selected it (reference: 0.9).
    Costs one bool (frozen) and one uint8 (counts) per targeted weight, only when switched on. The parameters are
    also `MISTConfig` fields: `CrossTaskState.from_config(config)` makes the state, and a selection checks that
    the two agree.
    """

    frozen_quantile: float | None = None
    overlap_decay: float | None = None
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_cross_task(self.frozen_quantile, self.overlap_decay, "CrossTaskState")

    @classmethod
    def from_config(cls, config: MISTConfig) -> CrossTaskState:
        """An empty state with the adapter config's parameters: make it before the first task, pass the same
        object to every later task's selection."""
        return cls(frozen_quantile=config.frozen_quantile, overlap_decay=config.overlap_decay)

    def update(self, scores: Mapping[str, torch.Tensor], chosen: Mapping[str, torch.Tensor]) -> None:
        for name, s in scores.items():
            if self.frozen_quantile is not None:
                top = at_or_above_quantile(s, self.frozen_quantile)
                self.frozen[name] = self.frozen.get(name, torch.zeros_like(top)) | top
            if self.overlap_decay is not None:
                counts = self.counts.setdefault(name, torch.zeros(s.shape, dtype=torch.uint8, device=s.device))
                flat_counts = counts.view(-1)
                flat_counts[chosen[name]] = (flat_counts[chosen[name]] + 1).clamp_max(255)

    def bind(self, config: MISTConfig) -> None:
        """Check that this state and the adapter's config agree; a config that leaves both parameters unset takes
        the state's, so the saved adapter config records what the selection used."""
        mine = (self.frozen_quantile, self.overlap_decay)
        if not config.uses_cross_task:
            config.frozen_quantile, config.overlap_decay = mine
        elif (config.frozen_quantile, config.overlap_decay) != mine:
            raise ValueError(
                f"cross_task has frozen_quantile={mine[0]!r}, overlap_decay={mine[1]!r} but the adapter's MISTConfig "
                f"has frozen_quantile={config.frozen_quantile!r}, overlap_decay={config.overlap_decay!r}: make the "
                "state with CrossTaskState.from_config(config) before the first task and pass that same object on."
            )

    def grad_scale(self, name: str, indices: torch.Tensor) -> torch.Tensor | None:
        if self.overlap_decay is None or name not in self.counts:
            return None
        return self.overlap_decay ** self.counts[name].view(-1)[indices.to(self.counts[name].device)].float()


def select_mi_fisher(model: nn.Module, objective: MIObjective, dataloader: Iterable, *,
                     adapter_name: str | None = None, accelerator=None, max_batches: int | None = None,
                     cache_file: str | os.PathLike | None = None,
                     exclude: Mapping[str, torch.Tensor] | None = None,
                     cross_task: CrossTaskState | None = None) -> dict[str, torch.Tensor]:
    """Score, pick the top `density` (per tensor or global, from the adapter's config) and install it.

    `exclude` maps weight names to boolean masks of entries that may not be selected. `cross_task` applies
    and then updates the frozen set and overlap decay of earlier tasks (required when the adapter's config sets
    `frozen_quantile` or `overlap_decay`; it must agree with them). `cache_file` stores the scores; a
    later call with the same layers reuses them. Returns the installed indices by weight name.
    """
    adapter_name = adapter_name or active_adapter(model)
    config = model.peft_config[adapter_name]
    layers = adapter_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"The model has no MIST layers for adapter '{adapter_name}'.")
    if cross_task is not None:
        cross_task.bind(config)
    elif config.uses_cross_task:
        raise ValueError(
            f"Adapter '{adapter_name}' sets frozen_quantile={config.frozen_quantile!r} / overlap_decay="
            f"{config.overlap_decay!r}, whose frozen set and selection counts must be carried from task to task: "
            "make `state = CrossTaskState.from_config(config)` before the first task and pass `cross_task=state` "
            "to every task's train_mist / MISTTrainer / select_mi_fisher."
        )
    shapes = {name: tuple(m.get_base_layer().weight.shape) for name, m in layers.items()}
    scores = _load_cache(cache_file, shapes)
    if scores is None:
        scores = mi_fisher_scores(objective, dataloader, layers, accelerator, max_batches)
        is_main = accelerator is None or accelerator.is_main_process
        if cache_file is not None and is_main:
            tmp = f"{cache_file}.tmp"
            torch.save({"shapes": shapes, "scores": {k: v.cpu() for k, v in scores.items()}}, tmp)
            os.replace(tmp, cache_file)
    ranked = dict(scores)
    for name, frozen in (cross_task.frozen.items() if cross_task else ()):
        ranked[name] = ranked[name].masked_fill(frozen.to(ranked[name].device), 0.0)  # the reference zeroes them
    for name, mask in (exclude or {}).items():
        ranked[name] = ranked[name].masked_fill(mask.to(ranked[name].device), -1.0)  # negative: never
    chosen = top_entries(ranked, config.density, config.granularity)
    del ranked
    prefix = {weight_name(n): n for n in mist_layers(model, adapter_name)}
    install_selection(model, adapter_name, {prefix[name]: idx for name, idx in chosen.items()})
    if cross_task is not None:
        for name, layer in layers.items():
            scale = cross_task.grad_scale(name, chosen[name])
            if scale is not None:
                layer.mist_grad_scale[adapter_name] = scale.to(layer.mist_values[adapter_name].device)
        cross_task.update(scores, chosen)
    return chosen


def _load_cache(cache_file, shapes: Mapping[str, tuple]) -> dict[str, torch.Tensor] | None:
    if cache_file is None or not os.path.exists(cache_file):
        return None
    data = torch.load(cache_file, map_location="cpu", weights_only=True)
    if {k: tuple(v) for k, v in data["shapes"].items()} != dict(shapes):
        raise ValueError(f"The score cache {cache_file} was computed for other weights (names or shapes differ); "
                         "delete it or pass another cache_file.")
    return data["scores"]
