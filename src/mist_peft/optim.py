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

import itertools
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
    entries = []
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
        entries.append((p, keep))
    with torch.no_grad():
        before = _flat_groups(_slots(optimizer, [p for p, _ in entries]))
        snapshots = {key: (members, torch.cat(ts)) for key, (members, ts) in before.items()}
    _SAVED[id(optimizer)] = (entries, snapshots, {layer for _, layer, _, _ in params})


def _slots(optimizer, params: list[torch.Tensor]) -> list[list[tuple[str, torch.Tensor]]]:
    """Per parameter: ("", the values) and (key, tensor) for each optimizer state with one entry per value
    (momentum, Adam's moments; not Adam's scalar step)."""
    out = []
    for p in params:
        state = optimizer.state.get(p, {})
        out.append([("", p)] + [(k, v) for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape])
    return out


def _flat_groups(slots: list[list[tuple[str, torch.Tensor]]]) -> dict[tuple, tuple[list[int], list[torch.Tensor]]]:
    """The tensors grouped by (slot, dtype, device), as (parameter positions, flat tensors): each group is
    snapshotted and restored as one concatenated tensor, so the hooks cost a few calls per step, not a few per
    tensor (on a GPU each call launches kernels: a BERT-base-sized model has 72 MIST layers, 3 tensors each
    under Adam, which took 216 clones and 432 gathers and scatters per step)."""
    groups: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
    for i, pairs in enumerate(slots):
        for key, t in pairs:
            members, ts = groups.setdefault((key, t.dtype, t.device), ([], []))
            members.append(i)
            ts.append(t if t.dim() == 1 else t.view(-1))  # values are flat already: no op per tensor
    return groups


def _group_positions(keeps: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """The kept positions of a group's tensors as positions into their concatenation (no host sync: the
    counts are known on the host)."""
    flat = torch.cat(keeps)
    counts = [k.numel() for k in keeps]
    if not flat.numel():
        return flat
    offsets = [0, *itertools.accumulate(sizes[:-1])]
    # a non-blocking copy of 2 x layers integers: a blocking host-to-device copy would wait for the device
    table = torch.tensor([offsets, counts], dtype=torch.int64).to(flat.device, non_blocking=True)
    return flat + torch.repeat_interleave(table[0], table[1], output_size=flat.numel())


def _after_step(optimizer, args, kwargs) -> None:
    saved = _SAVED.pop(id(optimizer), None)
    if saved is None:
        return
    entries, before, layers = saved
    numels = [p.numel() for p, _ in entries]  # every slot of a parameter has its shape
    with torch.no_grad():
        positions: dict[tuple[int, ...], torch.Tensor] = {}
        for key, (members, news) in _flat_groups(_slots(optimizer, [p for p, _ in entries])).items():
            sizes = [numels[i] for i in members]
            # the pre-step tensor (zeros for state the step created), then this step's kept entries moved in
            old = _old_flat(before.get(key), members, numels, news[0])
            if tuple(members) not in positions:
                positions[tuple(members)] = _group_positions([entries[i][1] for i in members], sizes)
            kept = positions[tuple(members)]
            old.index_copy_(0, kept, torch.cat(news).index_select(0, kept))
            torch._foreach_copy_(news, list(old.split(sizes)))
    for layer in layers:  # plain attributes: written past nn.Module.__setattr__, which costs more than this
        layer.__dict__.update(mist_step=layer.mist_step + 1, _forwards_at_step=0)
        for name in list(layer.mist_scores):
            layer.finish_warmup(name)


def _old_flat(before: tuple[list[int], torch.Tensor] | None, members: list[int], numels: list[int],
              like: torch.Tensor) -> torch.Tensor:
    """The pre-step concatenation of a group's tensors: the snapshot itself when the group is unchanged, else
    assembled (zeros for a tensor that had no such state before the step). `numels`: entries per parameter."""
    if before is not None and before[0] == members:
        return before[1]
    pieces = dict(zip(before[0], before[1].split([numels[i] for i in before[0]]), strict=True)) if before else {}
    return torch.cat([pieces[i] if i in pieces else torch.zeros(numels[i], dtype=like.dtype, device=like.device)
                      for i in members])


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
