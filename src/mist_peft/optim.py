"""Strict sparsity for any torch optimizer, and the clock that redraws the gradient-dropout subset.

How the guarantee works (MIST_SPEC "Decisions", strict sparsity):
- Unselected entries have no trainable storage at all, so no optimizer can reach them.
- Dropped entries (selected, not kept this step) get a zero gradient from the layer, but momentum, Adam
  moments and weight decay would still move them. A step pre-hook snapshots, for every MIST values
  tensor, the dropped entries of the value and of every optimizer-state tensor of the same shape; the
  post-hook writes them back. Dropped entries therefore leave the step bit-identical, value and state.
- Weight decay thus acts only on kept entries, and on the stored delta, so it pulls toward the
  pre-trained weight. Scalar state (Adam's step count) is shared, as in every torch optimizer.
- The post-hook then advances every MIST layer's step, which redraws the kept subset. The draw depends
  only on (seed, layer, step): every process of a multi-process run keeps the same entries.
It uses only the public `Optimizer.register_step_pre_hook`/`register_step_post_hook`, so it works with
Accelerate's `AcceleratedOptimizer` (whose inner optimizer fires the hooks) and the Trainer's optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import MISTLayer


def _unwrap_optimizer(optimizer):
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # AcceleratedOptimizer subclasses Optimizer and wraps the real one
    return optimizer


def attach_optimizer(optimizer, model: nn.Module) -> list:
    """Make `optimizer.step()` strictly sparse for MIST values and advance the gradient-dropout draw.

    Call once after creating the optimizer (and after the entries are selected). Returns the hook
    handles; `handle.remove()` detaches them.
    """
    inner = _unwrap_optimizer(optimizer)
    layers = [m for m in model.modules() if isinstance(m, MISTLayer)]
    owners = {}
    for layer in layers:
        for name, values in layer.mist_values.items():
            owners[id(values)] = (layer, name)
    optimized = {id(p) for group in inner.param_groups for p in group["params"]}
    if layers and not any(i in optimized for i in owners):
        raise ValueError(
            "None of the model's MIST values is in this optimizer. Create the optimizer after selecting the "
            "entries (the values are re-created when indices are installed), from the model's trainable parameters."
        )
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]] = []

    def before_step(opt, args, kwargs):
        saved.clear()
        for group in opt.param_groups:
            for p in group["params"]:
                owner = owners.get(id(p))
                if owner is None or p.numel() == 0:
                    continue
                layer, name = owner
                if layer.mist_grad_drop[name] == 0 or p.grad is None:
                    continue  # every entry is kept, or the optimizer skips this tensor anyway
                keep = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                kept = layer.mist_kept.get(name)
                if kept is not None and kept[0] == layer.mist_step:  # else no forward drew a subset: none moves
                    keep[kept[1]] = True
                # Whole-tensor copies and one `where` are far cheaper than gathering ~90% of the entries.
                state = [(k, v.clone()) for k, v in opt.state.get(p, {}).items()
                         if torch.is_tensor(v) and v.shape == p.shape]
                saved.append((p, keep, p.detach().clone(), state))

    def after_step(opt, args, kwargs):
        with torch.no_grad():
            for p, keep, value, state in saved:
                p.copy_(torch.where(keep, p, value))
                for key, old in state:
                    new = opt.state[p][key]
                    new.copy_(torch.where(keep, new, old))
        saved.clear()
        for layer in layers:
            layer.mist_step += 1
            layer._forwards_at_step = 0

    return [inner.register_step_pre_hook(before_step), inner.register_step_post_hook(after_step)]
