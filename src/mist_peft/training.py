"""Tuning the selected entries with the MI loss under gradient dropout: an Accelerate loop and a Trainer.

Both paths: select with MI-Fisher when the adapter still has placeholders, optimise the MIST values (and
the projection head, at its own learning rate), make the optimizer strictly sparse (`attach_optimizer`),
log the MI loss and the share of selected entries that got a gradient in each step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .encoders import FeatureEncoder
from .layer import MISTLayer
from .objectives import MIObjective
from .optim import attach_optimizer
from .scoring import active_adapter, select_mi_fisher
from .selection import is_selected, mist_layers


@dataclass
class MISTTrainingConfig:
    """Knobs of the tuning phase. Reference values (MIST_SPEC §3.8): SGD, momentum 0.9, weight decay 5e-4,
    lr 1e-4 for the backbone and 1e-2 for the head. Our defaults use AdamW at 1e-3 on the values, because
    with 90% gradient dropout and no rescaling the reference's SGD at 1e-4 barely moves a short CPU run;
    set `optimizer="sgd", lr=1e-4` to follow the reference."""

    loss: Literal["mist", "supcon", "ce"] = "mist"
    temperature: float = 0.07
    pooling: Literal["mean", "cls"] = "mean"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    head_lr: float = 1e-2
    weight_decay: float = 0.0
    momentum: float = 0.9
    max_steps: int | None = None
    epochs: int = 1
    max_score_batches: int | None = None
    num_classes: int | None = None
    # debug: log a hash of each step's kept subsets ("kept_digest"), e.g. to check that DDP ranks agree;
    # off by default since it copies every subset to the host, a device sync per layer per step
    log_kept_digest: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "head_lr", "temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MISTTrainingConfig.{name}={getattr(self, name)!r} is invalid: it must be > 0.")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"MISTTrainingConfig.optimizer={self.optimizer!r} is invalid: use 'adamw' or 'sgd'.")


def needs_selection(model: nn.Module, adapter_name: str) -> bool:
    """True while a MIST adapter's entries have not been chosen (a fresh `selection="mi_fisher"` adapter). A model
    without MIST layers (LoRA, or full fine-tuning through `train_mist`) has nothing to select."""
    return bool(mist_layers(model, adapter_name)) and not is_selected(model, adapter_name)


def _step_draws(model: nn.Module, adapter_name: str) -> Iterable[tuple[int, torch.Tensor | None]]:
    """(entries, this step's kept positions or None for all) of every delta of the adapter: the sparse values
    and, with `tune_biases_and_norms`, the dense bias and norm deltas, which have draws of their own."""
    for m in model.modules():
        if not isinstance(m, MISTLayer):
            continue
        if adapter_name in m.mist_values:
            drawn = m.mist_kept.get(adapter_name)
            yield m.mist_values[adapter_name].numel(), None if drawn is None else drawn[1]
        for kind in m.dense_kinds:
            if adapter_name in getattr(m, kind):
                drawn = m.mist_dense_kept.get(adapter_name, {}).get(kind)
                yield getattr(m, kind)[adapter_name].numel(), None if drawn is None else drawn[1]


def kept_digest(model: nn.Module, adapter_name: str) -> str:
    """Short hash of this step's kept subsets: equal on every process when the draws agree."""
    h = hashlib.sha256()
    for _, kept in _step_draws(model, adapter_name):
        if kept is not None:
            h.update(kept.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def kept_share(model: nn.Module, adapter_name: str) -> float:
    """Share of the adapter's trainable entries (sparse values and dense deltas) that received a gradient in the
    current step."""
    kept = total = 0
    for n, positions in _step_draws(model, adapter_name):
        kept += n if positions is None else positions.numel()
        total += n
    return kept / max(1, total)


def make_optimizer(model: nn.Module, head: nn.Module, config: MISTTrainingConfig) -> torch.optim.Optimizer:
    """One group for the MIST values, one for the head; only trainable tensors."""
    head_ids = {id(p) for p in head.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids], "lr": config.lr},
        {"params": [p for p in head.parameters() if p.requires_grad], "lr": config.head_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def build_objective(model: nn.Module, config: MISTTrainingConfig, head: nn.Module | None = None,
                    views=None) -> MIObjective:
    return MIObjective(FeatureEncoder(model, config.pooling), head, loss=config.loss,
                       temperature=config.temperature, views=views, num_classes=config.num_classes)


def default_accelerator() -> Accelerator:
    """Index buffers are identical on every process, so DDP need not broadcast them each step; targeted
    layers whose output the pooled features never use (e.g. BERT's pooler) leave parameters unused."""
    return Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False,
                                                                      find_unused_parameters=True)])


def train_mist(model: nn.Module, dataloader: Iterable, *, head: nn.Module | None = None,
               config: MISTTrainingConfig | None = None, accelerator: Accelerator | None = None,
               views=None, score_dataloader: Iterable | None = None,
               cache_file: str | os.PathLike | None = None, cross_task=None) -> dict[str, Any]:
    """Select (if needed) and tune a MIST model with the MI loss; returns {"head", "history", "steps"}.

    `cross_task` (a `scoring.CrossTaskState`, kept by the caller across tasks) applies the reference's frozen
    set and overlap decay to the selection; it is required when the adapter's `MISTConfig` sets
    `frozen_quantile` or `overlap_decay` (make it with `CrossTaskState.from_config(config)` before the first task).

    Runs unchanged on one process or under `accelerate launch`: scores are summed across processes, the
    dropout subset is drawn identically everywhere, and gradients are averaged by DDP. Honours the
    accelerator's gradient accumulation: `max_steps`, the history and the dropout redraws count optimizer
    steps, and each logged loss is the mean over the step's batches.
    """
    config = config or MISTTrainingConfig()
    accelerator = accelerator or default_accelerator()
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "train_mist does not shard MIST with FSDP: the trainable state is a few percent of the weights, so "
            "sharding it saves little, and a MIST checkpoint needs a gathered full state dict. Launch with DDP "
            "instead (`accelerate launch --multi_gpu ...`, or set `distributed_type: MULTI_GPU` in your "
            "accelerate config). For FSDP with your own loop: set `fsdp_use_orig_params: true`, and save with "
            "torch.distributed.checkpoint's get_model_state_dict(full_state_dict=True) passed to "
            "`save_pretrained(state_dict=...)` (see PEFT_NOTES §6)."
        )
    adapter = active_adapter(model)
    objective = build_objective(model, config, head, views).to(accelerator.device)
    model.to(accelerator.device)
    if needs_selection(model, adapter):
        scoring_loader = accelerator.prepare(score_dataloader or dataloader)
        select_mi_fisher(model, objective, scoring_loader, adapter_name=adapter, accelerator=accelerator,
                         max_batches=config.max_score_batches, cache_file=cache_file, cross_task=cross_task)
    optimizer = make_optimizer(model, objective.head, config)
    wrapped, optimizer, loader = accelerator.prepare(objective, optimizer, dataloader)
    handles = attach_optimizer(optimizer, model)
    accumulation = accelerator.gradient_accumulation_steps
    batches_per_epoch = len(loader) if hasattr(loader, "__len__") else None
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation) if batches_per_epoch else None
    total = config.max_steps or (steps_per_epoch * config.epochs if steps_per_epoch else None)
    history = []
    bar = tqdm(total=total, desc="MIST tuning", disable=not accelerator.is_local_main_process)
    wrapped.train()
    step = 0  # optimizer steps; with gradient accumulation, one per `accumulation` batches
    losses: list[torch.Tensor] = []
    try:
        while total is None or step < total:
            for batch in loader:
                with accelerator.accumulate(wrapped):
                    loss = wrapped(batch)
                    accelerator.backward(loss)  # divided by the accumulation steps
                    losses.append(loss.detach())
                    if accelerator.sync_gradients:
                        share = kept_share(model, adapter)
                    optimizer.step()  # the inner optimizer (and MIST's hooks) only run at sync steps
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                logged = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
                losses = []
                history.append({"step": step, "mi_loss": logged, "kept_share": share})
                if config.log_kept_digest:
                    history[-1]["kept_digest"] = kept_digest(model, adapter)
                accelerator.log({"mi_loss": logged, "kept_share": share}, step=step)
                bar.update(1)
                bar.set_postfix(mi_loss=f"{logged:.3f}", kept=f"{share:.3f}")
                if total is not None and step >= total:
                    break
            if total is None:
                break
    finally:
        bar.close()
        for h in handles:
            h.remove()
    wrapped.eval()
    return {"head": accelerator.unwrap_model(wrapped).head, "history": history, "steps": step}


class MISTCallback(TrainerCallback):
    """For any `Trainer` (your loss, your head): strict sparsity and per-step dropout redraws for MIST."""

    def __init__(self) -> None:
        self.handles: list = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and optimizer is not None and not self.handles:
            self.handles = attach_optimizer(optimizer, model)

    def on_train_end(self, args, state, control, **kwargs):
        for h in self.handles:
            h.remove()
        self.handles = []


HEAD_FILE = "mist_head.safetensors"


def save_head(head: nn.Module, model: nn.Module, path: str | os.PathLike) -> None:
    """Write the projection head and each MIST layer's dropout clock (optimizer steps taken)."""
    clock = {name: m.mist_step for name, m in mist_layers(model).items()}
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path),
              metadata={"mist_steps": json.dumps(clock)})


def load_head(head: nn.Module, model: nn.Module, path: str | os.PathLike) -> None:
    """Restore what `save_head` wrote: the head's weights (in place) and the dropout clock."""
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        saved_clock = (f.metadata() or {}).get("mist_steps")
    head.load_state_dict(state)
    if saved_clock is None:
        warnings.warn(f"{path} holds no dropout clock (written by an older mist-peft): the gradient-dropout "
                      "subsets restart from step 0, so the resumed run differs from an uninterrupted one.",
                      stacklevel=2)
    clock = json.loads(saved_clock or "{}")
    for name, layer in mist_layers(model).items():
        if name in clock:
            layer.mist_step = clock[name]


class _ZeroHeadGrads(TrainerCallback):
    """The Trainer zeroes the model's gradients after each optimizer step; the head lives outside the model."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def on_step_end(self, args, state, control, **kwargs):
        self.head.zero_grad(set_to_none=True)


class MISTTrainer(Trainer):
    """`Trainer` that runs MIST: MI-Fisher selection before training, the MI loss, a projection head.

    Use it with your usual `TrainingArguments` (keep `remove_unused_columns=False` if your collator adds
    fields the model does not take). Logs `mi_loss` (as `loss`) and `mist_kept_share`. The MI loss is a
    mean over the batch, so the Trainer divides it by the accumulation steps like any mean loss: logged loss,
    update size and `max_grad_norm` do not depend on `gradient_accumulation_steps`. Checkpoints hold the head
    and the dropout clock (`mist_head.safetensors`), so `train(resume_from_checkpoint=...)` continues the run.
    `cross_task=` carries the reference's frozen set and overlap decay between tasks, as in `train_mist`.
    """

    loss_is_scaled_for_ga = False  # a batch mean: the Trainer divides it by the accumulation steps

    def __init__(self, *args, mist_config: MISTTrainingConfig | None = None, head: nn.Module | None = None,
                 views=None, cross_task=None, **kwargs) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("MISTTrainer computes the MI loss itself; drop `compute_loss_func`, or use a plain "
                             "Trainer with `MISTCallback` for your own loss.")
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # no `num_items_in_batch`: the MI loss is not a token sum
        self.mist_config = mist_config or MISTTrainingConfig(lr=self.args.learning_rate)
        self.objective = build_objective(self.model, self.mist_config, head, views).to(self.args.device)
        self.cross_task = cross_task  # a scoring.CrossTaskState carried across tasks, as in train_mist
        self.add_callback(MISTCallback())
        self.add_callback(_ZeroHeadGrads(self.objective.head))
        self._kept_shares: list[float] = []

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        adapter = active_adapter(self.model)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            head_file = os.path.join(resume_from_checkpoint, HEAD_FILE)
            if not os.path.isfile(head_file):
                raise ValueError(f"{resume_from_checkpoint} has no {HEAD_FILE}: it was not written by MISTTrainer, "
                                 "so the projection head its optimizer state belongs to is lost. Resume from a "
                                 "MISTTrainer checkpoint, or start a new run.")
            load_head(self.objective.head, self.model, head_file)  # the adapter itself is loaded by the Trainer
        elif needs_selection(self.model, adapter):
            select_mi_fisher(self.model, self.objective, self.get_train_dataloader(), adapter_name=adapter,
                             accelerator=self.accelerator, max_batches=self.mist_config.max_score_batches,
                             cross_task=self.cross_task)
            self.optimizer = None  # the values were re-created with their selected sizes
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.model, self.objective.head, self.mist_config)
            self.optimizer.param_groups[0]["lr"] = self.args.learning_rate
            if self.args.world_size > 1:  # the head lives outside the DDP-wrapped model: average it here
                head = list(self.objective.head.parameters())

                def average_head_grads(opt, args, kwargs):
                    for p in head:
                        if p.grad is not None:
                            p.grad = self.accelerator.reduce(p.grad, "mean")

                self.optimizer.register_step_pre_hook(average_head_grads)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.objective.encoder.backbone = model  # the (possibly DDP-wrapped) model the Trainer trains
        loss = self.objective(inputs)
        self._kept_shares.append(kept_share(self.model, active_adapter(self.model)))
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._kept_shares:
            logs["mist_kept_share"] = sum(self._kept_shares) / len(self._kept_shares)
            self._kept_shares = []
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            save_head(self.objective.head, self.model, os.path.join(output_dir, HEAD_FILE))


def state_fingerprint(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every MIST layer's indices and values: equal on all processes of a consistent run."""
    masks, values = hashlib.sha256(), hashlib.sha256()
    for name, m in sorted(mist_layers(model).items()):
        for adapter in sorted(m.mist_values):
            masks.update(f"{name}.{adapter}".encode() + m.mist_indices[adapter].cpu().numpy().tobytes())
            values.update(m.mist_values[adapter].detach().cpu().numpy().tobytes())
    return {"masks": masks.hexdigest(), "values": values.hexdigest()}
