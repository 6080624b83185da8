"""Strict sparsity for any torch optimizer in any training loop, and the clock of the gradient dropout.

MIST registers torch's *global* optimizer step hooks once (`register_optimizer_step_pre_hook` /
`..._post_hook`). They act only on optimizers that hold MIST values, so `optimizer.step()` is right in the
Trainer, TRL, Accelerate (also under `accumulate` and with `GradScaler`, which skip `step()` on overflow),
and a plain torch loop, with no call from the user. How the guarantee works (MIST_SPEC "Decisions"):
- Unselected entries have no trainable storage at all, so no optimizer can reach them.
- Dense deltas (`tune_biases_and_norms`: biases, norm weights) are selected whole and follow the same rule
  with their own per-step draw.
- Dropped entries (selected, not kept this step) get a zero gradient from the layer, but momentum, Adam
  moments and weight decay would still move them. The pre-hook snapshots each MIST values tensor and every
  optimizer-state tensor of its shape; the post-hook writes the dropped entries back, and resets state that
  the step itself created (torch creates momentum and moments lazily, from zero) to zero there. Dropped
  entries therefore leave the step bit-identical, value and state. Scalar state (Adam's step) is shared.
- Weight decay thus acts only on kept entries, and on the stored delta, so it pulls toward the
  pre-trained weight.
- The post-hook then advances the step of every MIST layer the optimizer trains, which redraws the kept
  subset (a function of seed, layer and step only: every process keeps the same entries), and counts the
  steps of a `selection="fisher"` warm-up.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .layer import LIVE_LAYERS, RETIRED, MISTLayer

_HANDLES: list = []
_SAVED: dict[int, tuple[list, set]] = {}  # id(optimizer) -> (snapshots, layers), between pre- and post-hook
# optimizer -> (its parameters when last looked at, the MIST ones among them): finding the owners of the
# optimizer's parameters walks every MIST layer, which cost more than the rest of the pre-hook
_OWNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install_optimizer_hooks() -> None:
    """Register MIST's global optimizer step hooks (idempotent; done when the first MIST layer is built)."""
    if not _HANDLES:
        _HANDLES.extend([register_optimizer_step_pre_hook(_before_step),
                         register_optimizer_step_post_hook(_after_step)])


def _is_wrapper(optimizer) -> bool:
    """Accelerate's AcceleratedOptimizer (an Optimizer subclass) wraps the real one, whose step fires too."""
    return isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)


def _mist_params(optimizer) -> list[tuple[torch.Tensor, MISTLayer, str, str]]:
    """(values tensor, layer, adapter, kind) for every MIST values tensor the optimizer holds; kind is
    "mist_values" (the sparse weight deltas) or a dense delta of `tune_biases_and_norms` (bias, norm weight).
    Remembered per optimizer while its parameters and their owners stay the same."""
    if not LIVE_LAYERS:
        return []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    known = _OWNED.get(optimizer)
    if known is not None and len(known[0]) == len(params) and all(a is b for a, b in zip(known[0], params, strict=True)) \
            and all(layer in LIVE_LAYERS and getattr(layer, kind).get(name) is p for p, layer, name, kind in known[1]):
        return known[1]
    owners = {id(v): (layer, name, kind) for layer in list(LIVE_LAYERS)
              for kind in layer.adapter_layer_names for name, v in getattr(layer, kind).items()}
    out = []
    for p in params:
        if getattr(p, RETIRED, False):
            raise RuntimeError(
                "This optimizer holds MIST values that were replaced when the adapter's entries were selected "
                "(granularity='global' sizes each layer's values at selection), so it would train nothing. "
                "Create the optimizer after selection: after get_peft_model for a data-free selection, after "
                "`select_mi_fisher` for MI-Fisher (train_mist and MISTTrainer do this for you)."
            )
        owner = owners.get(id(p))
        if owner is not None:
            out.append((p, *owner))
    _OWNED[optimizer] = (params, out)
    return out


def _before_step(optimizer, args, kwargs) -> None:
    if _is_wrapper(optimizer):
        return
    params = _mist_params(optimizer)
    if not params:
        return
    snapshots = []
    for p, layer, name, kind in params:
        if p.grad is None or p.numel() == 0:
            continue  # the optimizer skips this tensor
        dense = kind != "mist_values"  # dense deltas are selected from the start
        selected = dense or layer.mist_selected.get(name, False)
        if selected and layer.mist_grad_drop[name] == 0:
            continue  # every entry is kept
        kept = layer.mist_dense_kept.get(name, {}).get(kind) if dense else layer.mist_kept.get(name)
        if selected and kept is not None and kept[0] == layer.mist_step:
            keep = kept[1]
        else:  # no forward drew a subset this step: no entry moves
            keep = torch.zeros(0, dtype=torch.int64, device=p.device)
        snapshots.append((p, keep, _entry_state(optimizer, p)))
    # one multi-tensor copy for every snapshot (values and per-entry state), not a clone per tensor
    live = [t for p, _, state in snapshots for t in (p.detach(), *state.values())]
    olds = iter(_clone_all(live))
    saved = [(p, keep, next(olds), {k: next(olds) for k in state}) for p, keep, state in snapshots]
    _SAVED[id(optimizer)] = (saved, {layer for _, layer, _, _ in params})


def _clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Exact copies of `tensors` in one multi-tensor call where torch has one."""
    if not tensors:
        return []
    if hasattr(torch, "_foreach_clone"):
        return list(torch._foreach_clone(tensors))
    copies = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(copies, tensors)
    return copies


def _entry_state(optimizer, p: torch.Tensor) -> dict:
    """The optimizer state of `p` that has one entry per value (momentum, Adam moments; not Adam's step)."""
    return {k: v for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v) and v.shape == p.shape}


def _after_step(optimizer, args, kwargs) -> None:
    saved = _SAVED.pop(id(optimizer), None)
    if saved is None:
        return
    snapshots, layers = saved
    with torch.no_grad():
        targets, restored = [], []
        for p, keep, value, state in snapshots:
            pairs = [(p, value)] + [(new, state.get(key)) for key, new in _entry_state(optimizer, p).items()]
            for new, old in pairs:
                # the pre-step tensor (zeros for state the step created) with this step's kept entries moved in
                old = torch.zeros_like(new) if old is None else old
                old.index_copy_(0, keep, new.index_select(0, keep))
                targets.append(new)
                restored.append(old)
        if targets:
            torch._foreach_copy_(targets, restored)  # one multi-tensor copy back
    for layer in layers:  # plain attributes: written past nn.Module.__setattr__, which costs more than this
        layer.__dict__.update(mist_step=layer.mist_step + 1, _forwards_at_step=0)
        for name in list(layer.mist_scores):
            layer.finish_warmup(name)


def attach_optimizer(optimizer, model: nn.Module) -> list:
    """Check that `optimizer` trains the model's MIST values. Optional since strict sparsity and the dropout
    clock act through global hooks in every loop; kept for explicitness (idempotent). Returns no handles."""
    install_optimizer_hooks()
    inner = optimizer
    while _is_wrapper(inner):
        inner = inner.optimizer
    layers = [m for m in model.modules() if isinstance(m, MISTLayer)]
    trainable = [v for m in layers for kind in m.adapter_layer_names for v in getattr(m, kind).values()
                 if v.requires_grad]
    if trainable and not _mist_params(inner):
        raise ValueError(
            "None of the model's MIST values is in this optimizer. Create it from the model's trainable "
            "parameters (e.g. `torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)`)."
        )
    return []
