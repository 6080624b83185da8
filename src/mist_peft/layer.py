"""Sparse-delta tuner layers: W_eff = W + scatter(values at selected flat indices of W).

The base weight stays frozen and untouched. An adapter holds a 1-D trainable `mist_values[name]` and the
sorted int64 flat indices `mist_indices[name]` (in the base weight's own memory layout, so Conv1D's
transposed storage needs no special case when merging).

Life of an adapter on a layer:
- created *unselected*: per-tensor adapters get their values at the final size (`round(density * numel)`)
  at once, so an optimizer may be built before the entries are chosen; selection only fills the indices and
  never replaces the parameter (global granularity cannot know its sizes before selection);
- *selected* by data-free top-k (at injection), MI-Fisher (`scoring.py`), the `"fisher"` warm-up of the
  user's own loop (here), or a checkpoint;
- tuned with gradient dropout drawn per optimizer step (`optim.py`): a fixed-count subset, drawn without a
  host sync. The values' gradient is computed only at the entries kept in that step: a sampled matmul for
  Linear and Conv1D on CPU (on a GPU the layer's dense gradient, gathered: faster there), a per-token sum for
  Embedding, a gather of the (small) dense gradient for Conv2d.

Dense deltas (`tune_biases_and_norms`): `mist_bias_values[name]` covers the whole base bias of any layer type,
and `Norm` (LayerNorm/RMSNorm) adds `mist_norm_values[name]` over its whole weight. Selected from creation,
never scored; their effective parameter is `effective_entries(base, delta)`, composed in every forward (they
are small) and never written in place; the dropout draws them per step with a salted seed.

Engine (`ENGINE`): with "inplace" (default), while exactly one adapter is active on a layer (and the base
weight is frozen) its effective entries live in the base weight's own storage (the overwritten base entries are kept, as
`merge()` keeps them), rewritten entry by entry only after its values changed. The forward is then the
base layer's own kernel with no copy of the weight, and the backward adds only the values' gradient at the
kept entries. Anything that needs the true base weight (disabling, switching or deleting adapters, merging,
`unload`, `state_dict`, `.to()`) restores it first, so every public behaviour is exact. "compose" is the
reference path: `W + delta` built on the fly in every forward and backward.

Precision: the effective entries are `(W[i] + v_i)` computed in the values' precision (fp32) and rounded
once to the weight's dtype, in the forward pass and in `merge()` alike, so merged and unmerged outputs are
bit-identical. With a bf16/fp16 base, a delta below half an ulp of its weight changes nothing yet, exactly
as with fp32 master weights in mixed-precision training: it keeps accumulating in the fp32 values.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import threading
import warnings
import weakref
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ._peft_compat import BufferDict
from .sparse_io import check_strictly_increasing

# The values' gradient at the kept entries: on the devices named here a sampled dense-dense matmul (SDDMM,
# torch.sparse.sampled_addmm), elsewhere the dense weight gradient gathered at the kept entries. Measured on a
# 2-core CPU (1536x384 weight, 2048 tokens) SDDMM costs half a dense weight gradient at any kept share up to 5%,
# a gather-and-dot three times more. On an H200 (BERT-base shape, bf16) it is the reverse: SDDMM took 5.3 ms per
# step against 1.2 ms for the dense weight gradients it replaces, plus 4.6 ms of fp32 transposing copies.
SDDMM_DEVICES: frozenset[str] = frozenset({"cpu"})
# Gathers and scatters use index_select / index_copy_: on the CPU build measured here, `t[idx]` and
# `t[idx] = v` for 29,500 of 590,000 entries took 12 ms each, index_select 0.15 ms and index_copy_ 0.4 ms.
# "inplace": effective entries written into the base weight's storage (no weight copy per step); "compose":
# the reference path that builds W + delta in every forward and backward. Both give bit-identical results.
ENGINE = "inplace"

# Every live MIST layer, so the global optimizer hooks (`optim.py`) find the value tensors of any optimizer.
LIVE_LAYERS: weakref.WeakSet = weakref.WeakSet()
# Attribute set on a values tensor replaced by a re-sized one: an optimizer still holding it trains nothing.
RETIRED = "_mist_retired"

_SEED_MOD = 2**63
# Dense deltas (`MISTConfig.tune_biases_and_norms`): adapter dict -> the base parameter it covers, whole.
DENSE_DELTAS = {"mist_bias_values": "bias", "mist_norm_values": "weight"}


def count_for(numel: int, density: float) -> int:
    """Entries kept out of `numel` at `density` (rounded, at least one)."""
    return min(numel, max(1, round(density * numel)))


def dropout_seed(seed: int, layer_key: int, step: int) -> int:
    """Seed of one layer's dropout draw in one step: any integer seed works (no overflow in manual_seed)."""
    return ((seed * 1_000_003 + layer_key) * 7_919 + step) % _SEED_MOD


_GENERATORS = threading.local()  # one reseeded generator per device and thread (DataParallel runs threads)


def kept_count(n: int, drop: float, seed: int) -> int:
    """Entries kept out of n: (1 - drop) * n, its fraction rounded up with that probability (a host-side
    draw from `seed`, so no device sync), which keeps each entry's marginal keep probability 1 - drop."""
    expected = (1.0 - drop) * n
    whole = math.floor(expected)
    rng = _GENERATORS.__dict__.get("host")  # reseeding one instance draws what random.Random(seed) would
    if rng is None:
        rng = _GENERATORS.__dict__["host"] = random.Random()
    rng.seed(seed)
    return min(n, whole + int(rng.random() < expected - whole))


def effective_entries(base_entries: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """W[i] + v_i in the values' precision, rounded once to the weight's dtype (forward and merge alike)."""
    if base_entries.dtype == values.dtype:
        return base_entries + values
    return (base_entries.to(values.dtype) + values).to(base_entries.dtype)


def _draw_kept(n: int, drop: float, seed: int, device: torch.device) -> torch.Tensor:
    """Positions of a fixed-count draw without replacement of `kept_count` out of n, from `seed`: sorted on
    the devices whose SDDMM reads them (CSR rows), in draw order elsewhere, where every consumer (gathers,
    scatters, the optimizer hooks) is order-free and a sort per layer and step would only cost time."""
    cache = _GENERATORS.__dict__
    gen = cache.get(device)
    if gen is None:
        gen = cache[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    # randperm + sort measured fastest on a 2-core CPU at n = 30k..500k (top-k of a uniform draw: +10%)
    kept = torch.randperm(n, generator=gen, device=device)[:kept_count(n, drop, seed)]
    return torch.sort(kept).values if device.type in SDDMM_DEVICES else kept


class MISTSelectionError(RuntimeError):
    """Training started on an adapter whose entries were never selected."""


class MISTLayer(BaseTunerLayer):
    """Mixin with the per-adapter state shared by every MIST layer type."""

    adapter_layer_names = ("mist_values", "mist_bias_values", "mist_norm_values")
    other_param_names = ("mist_indices", "mist_grad_drop", "mist_rescale", "mist_seed", "mist_kept", "mist_backup",
                         "mist_grad_scale", "mist_config", "mist_selected", "mist_scores", "mist_scored_steps",
                         "mist_select_all", "mist_dense_kept", "mist_dense_backup")
    dense_kinds: tuple[str, ...] = ("mist_bias_values",)  # the dense deltas this layer type may hold

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mist_values = nn.ParameterDict({})
        self.mist_indices = BufferDict({}, persistent=True)
        # tune_biases_and_norms: dense deltas over the base bias (and a norm's weight), every entry selectable
        self.mist_bias_values = nn.ParameterDict({})
        self.mist_norm_values = nn.ParameterDict({})
        self.mist_dense_kept: dict[str, dict[str, tuple[int, torch.Tensor | None]]] = {}  # adapter -> kind -> draw
        self.mist_dense_backup: dict[str, dict[str, torch.Tensor]] = {}  # base parameters saved by merge()
        self.mist_grad_drop: dict[str, float] = {}
        self.mist_rescale: dict[str, bool] = {}
        self.mist_seed: dict[str, int] = {}
        self.mist_kept: dict[str, tuple[int, torch.Tensor | None]] = {}  # (step, kept positions or None=all)
        self.mist_backup: dict[str, torch.Tensor] = {}  # base values at the indices, saved by merge()
        self.mist_grad_scale: dict[str, torch.Tensor] = {}  # optional per-entry gradient factor (overlap decay)
        self.mist_config: dict[str, Any] = {}  # the adapter's MISTConfig (selection, density, score_steps)
        self.mist_selected: dict[str, bool] = {}  # explicit record: entries chosen (never inferred from sizes)
        self.mist_scores: dict[str, torch.Tensor] = {}  # "fisher" warm-up: accumulated squared gradients
        self.mist_scored_steps: dict[str, int] = {}  # "fisher" warm-up: optimizer steps seen so far
        self.mist_select_all: dict[str, Any] = {}  # data-free selection of the whole adapter (set by MISTModel)
        self.mist_step = 0  # optimizer steps taken; advanced by the optimizer step hooks of `optim.py`
        self.mist_key = 0  # stable per-layer id (crc32 of the module path), the same on every process
        self.mist_name = ""  # module path, seeds the random selection
        self._live: str | None = None  # adapter whose effective entries are written into the base weight
        self._live_backup: torch.Tensor | None = None  # the base entries they replaced
        self._live_stamp: tuple | None = None  # (values tensor id, version) last written
        # (adapter, values, base weight, base layer) while the live adapter is the layer's whole story (the only active
        # adapter, no dense deltas): forward then skips its checks. Whatever could change that (switching,
        # disabling, merging or deleting adapters, new indices, `.to()`, loading) restores the base weight,
        # which clears it.
        # The weight is the base layer's own, kept beside it because forward checks it on every call.
        self._fast_live: tuple[str, torch.Tensor, torch.Tensor, nn.Module] | None = None
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self._forwards_at_step = 0
        base = self.get_base_layer()
        self.in_features, self.out_features = _in_out_features(base)
        LIVE_LAYERS.add(self)

    # ----------------------------------------------------------------------------------------- state
    def update_layer(self, adapter_name: str, config, module_key: str = "") -> None:
        """Create the adapter unselected: values at their final per-tensor size (zeros), no indices yet."""
        weight = self.get_base_layer().weight
        self._register_adapter(adapter_name, config, module_key)
        self.mist_selected[adapter_name] = False
        size = count_for(weight.numel(), config.density) if config.granularity == "per_tensor" else 0
        self.mist_indices[adapter_name] = torch.zeros(0, dtype=torch.int64, device=weight.device)
        self.mist_values[adapter_name] = nn.Parameter(torch.zeros(size, dtype=self._values_dtype(),
                                                                  device=weight.device))
        self._add_dense_deltas(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _register_adapter(self, adapter_name: str, config, module_key: str) -> None:
        """The per-adapter settings every layer type keeps (dropout, seed, config) and the layer's id."""
        if module_key:
            self.mist_key = zlib.crc32(module_key.encode())
            self.mist_name = module_key
        self.mist_grad_drop[adapter_name] = float(config.grad_drop)
        self.mist_rescale[adapter_name] = bool(config.rescale_kept_grads)
        self.mist_seed[adapter_name] = int(config.seed)
        self.mist_config[adapter_name] = config

    def _add_dense_deltas(self, adapter_name: str, config) -> None:
        """tune_biases_and_norms: a zero delta over every entry of the base bias (and a norm's weight); selected
        from the start, never scored (the reference's "always selectable, dense mask")."""
        if not getattr(config, "tune_biases_and_norms", False):
            return
        base = self.get_base_layer()
        for kind in self.dense_kinds:
            param = getattr(base, DENSE_DELTAS[kind], None)
            if isinstance(param, torch.Tensor):
                dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
                getattr(self, kind)[adapter_name] = nn.Parameter(torch.zeros(param.numel(), dtype=dtype,
                                                                             device=param.device))

    def _dense_deltas(self, adapter_name: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(kind, base parameter, delta values) for each dense delta the adapter has on this layer."""
        base = self.get_base_layer()
        return [(kind, getattr(base, DENSE_DELTAS[kind]), getattr(self, kind)[adapter_name])
                for kind in self.dense_kinds if adapter_name in getattr(self, kind)]

    def _dense_active(self) -> bool:
        return any(a in getattr(self, kind) for kind in self.dense_kinds for a in self.active_adapters)

    def _dense_effective(self, kind: str) -> torch.Tensor | None:
        """The base parameter plus the active adapters' dense deltas (rounded as for the weights), with an
        autograd path to the deltas that keeps only this step's kept entries."""
        param = getattr(self.get_base_layer(), DENSE_DELTAS[kind], None)
        deltas = getattr(self, kind)
        adapters = [a for a in self.active_adapters if a in deltas]
        if param is None or not adapters:
            return param
        flat = param.reshape(-1)
        for a in adapters:
            values = deltas[a]
            if values.requires_grad and torch.is_grad_enabled():
                drop = self.mist_grad_drop[a]
                scale = 1.0 / (1.0 - drop) if self.mist_rescale[a] and drop > 0 else 1.0
                values = _KeepGrad.apply(values, self.dense_kept_positions(kind, a), scale)
            flat = effective_entries(flat, values)
        return flat.view_as(param)

    def dense_kept_positions(self, kind: str, adapter_name: str) -> torch.Tensor | None:
        """The kept entries of a dense delta in the current step (None: all): drawn like the weights' subset,
        from (seed, layer id salted with the kind, step), so it differs from the weight draw."""
        drop = self.mist_grad_drop[adapter_name]
        if drop == 0:
            return None
        cache = self.mist_dense_kept.setdefault(adapter_name, {})
        cached = cache.get(kind)
        if cached is not None and cached[0] == self.mist_step:
            return cached[1]
        values = getattr(self, kind)[adapter_name]
        seed = dropout_seed(self.mist_seed[adapter_name], self.mist_key ^ zlib.crc32(kind.encode()), self.mist_step)
        kept = _draw_kept(values.numel(), drop, seed, values.device)
        cache[kind] = (self.mist_step, kept)
        return kept

    def _bias(self) -> torch.Tensor | None:
        """The bias a forward uses: the base bias plus the active adapters' bias deltas."""
        return self._dense_effective("mist_bias_values")

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's operation on its current weight, with the effective bias when bias deltas are on."""
        if not self._dense_active():
            return self.base_layer(x)
        return self._apply_weight(x, self.get_base_layer().weight)

    def _values_dtype(self) -> torch.dtype:
        dtype = self.get_base_layer().weight.dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's activation, except that an adapter with no entries here holds no trainable parameter
        (an empty trainable tensor never gets a gradient and breaks DDP's reduction)."""
        self.restore_base_weight()
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        for values in self.mist_values.values():
            if values.numel() == 0:
                values.requires_grad_(False)

    def set_indices(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Install the selected flat indices (and optionally their values; zeros otherwise): the adapter is
        then selected. The values parameter is filled in place when its size already fits, so an optimizer
        built earlier keeps training it; otherwise it is replaced (and the old one marked retired)."""
        weight = self.get_base_layer().weight
        idx = indices.to(device=weight.device, dtype=torch.int64).reshape(-1)
        check_strictly_increasing(idx)
        if idx.numel() and int(idx[-1]) >= weight.numel():
            raise ValueError(
                f"index {int(idx[-1])} is out of range for a weight of shape {tuple(weight.shape)} "
                f"({weight.numel()} entries)"
            )
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter '{adapter_name}' is merged; call unmerge() before changing its entries")
        self.restore_base_weight()
        old = self.mist_values[adapter_name]
        if values is not None and values.shape != idx.shape:
            raise ValueError(f"{values.numel()} values given for {idx.numel()} indices")
        self.mist_indices[adapter_name] = idx
        # an empty placeholder (global granularity) was frozen; its replacement trains if the adapter does
        was_placeholder = old.numel() == 0 and adapter_name in self.active_adapters
        trainable = old.requires_grad or (was_placeholder and not self.mist_config[adapter_name].inference_mode)
        if old.numel() == idx.numel() and not old.is_meta:
            with torch.no_grad():
                old.zero_() if values is None else old.copy_(values)
        else:
            dtype = old.dtype if values is None or not old.is_meta else values.dtype
            new = torch.zeros(idx.numel(), dtype=dtype, device=weight.device) if values is None else values
            self.mist_values[adapter_name] = nn.Parameter(new.detach().to(device=weight.device, dtype=dtype),
                                                          requires_grad=trainable and idx.numel() > 0)
            setattr(old, RETIRED, True)
        self.mist_selected[adapter_name] = True
        self.mist_kept.pop(adapter_name, None)
        self.mist_grad_scale.pop(adapter_name, None)
        self.mist_scores.pop(adapter_name, None)
        self.mist_scored_steps.pop(adapter_name, None)

    def _active_with_entries(self) -> list[str]:
        return [a for a in self.active_adapters if self.mist_selected.get(a) and self.mist_indices[a].numel() > 0]

    def _training(self, adapter_name: str) -> bool:
        return torch.is_grad_enabled() and self.mist_values[adapter_name].requires_grad

    def _unselected_in_training(self) -> list[str]:
        """Active adapters without entries yet, in a forward that trains them: select the data-free ones now,
        refuse `mi_fisher` (its scoring never ran), return the `fisher` ones (their warm-up scores this step)."""
        scoring = []
        for a in self.active_adapters:
            if a not in self.mist_selected or self.mist_selected[a] or not self._training(a):
                continue
            selection = self.mist_config[a].selection
            if selection in ("magnitude", "random") and a in self.mist_select_all:
                self.mist_select_all[a]()  # e.g. loaded from a checkpoint saved before selection
            elif selection == "fisher":
                scoring.append(a)
            elif not self.get_base_layer().weight.requires_grad:  # an MI-Fisher scoring pass is not running
                raise MISTSelectionError(
                    f"MIST adapter '{a}' uses selection='mi_fisher', but its entries were never selected, so "
                    "training would change nothing. Either (1) train with `mist_peft.training.train_mist` or "
                    "`MISTTrainer`, or call `mist_peft.select_mi_fisher(...)` before training; (2) use "
                    "`MISTConfig(selection='fisher')` to score with your own loss during the first optimizer steps "
                    "of any training loop; or (3) use a data-free selection, `selection='magnitude'` or 'random'."
                )
        return scoring

    # ------------------------------------------------------------------------------ gradient dropout
    def kept_positions(self, adapter_name: str, values: torch.Tensor | None = None) -> torch.Tensor | None:
        """Positions (into the values vector) that get a gradient in the current step; None means all. Sorted
        on CPU; on other devices in draw order (see `_draw_kept`).

        A fixed-count draw without replacement, so nothing in it waits on the device (no `nonzero`): the
        count is (1 - grad_drop) * n, rounded up or down at random in proportion to its fraction (exact when
        it is an integer), so every entry's marginal keep probability is exactly 1 - grad_drop. Count and
        subset depend only on (seed, layer id, step): every process of a multi-process run and every forward
        of the same step (two views, gradient accumulation) sees the same subset. `values`: the adapter's
        values tensor, when the caller holds it already.
        """
        drop = self.mist_grad_drop[adapter_name]
        if drop == 0:
            return None
        cached = self.mist_kept.get(adapter_name)
        if cached is not None and cached[0] == self.mist_step:
            return cached[1]
        if values is None:
            values = self.mist_values[adapter_name]
        seed = dropout_seed(self.mist_seed[adapter_name], self.mist_key, self.mist_step)
        kept = _draw_kept(values.numel(), drop, seed, values.device)
        self.mist_kept[adapter_name] = (self.mist_step, kept)
        return kept

    def _note_training_forward(self) -> None:
        forwards = self.__dict__["_forwards_at_step"] = self._forwards_at_step + 1  # see _write_live
        if forwards == 64:
            warnings.warn(
                "MIST: 64 training forwards without an optimizer step, so the gradient-dropout subset is not being "
                "redrawn. MIST advances it in torch's optimizer step hooks: this is expected only with 64 or more "
                "gradient-accumulation micro-batches. An optimizer whose step bypasses "
                "`torch.optim.Optimizer.step` (e.g. DeepSpeed's) never fires them: use a torch optimizer.",
                stacklevel=3,
            )

    def _grad_inputs(self, adapters: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None, float]]:
        """(indices, kept positions, gradient scale) per adapter for the current forward."""
        if any(self._training(a) for a in adapters):
            self._note_training_forward()
        return [self._grad_meta(a) if self._training(a) else (self.mist_indices[a], None, 1.0) for a in adapters]

    def _grad_meta(self, adapter_name: str, values: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """(indices, kept positions, gradient scale) of a training forward of `adapter_name` (whose values
        tensor is `values`, when the caller holds it)."""
        drop = self.mist_grad_drop[adapter_name]
        scale = 1.0 / (1.0 - drop) if self.mist_rescale[adapter_name] and drop > 0 else 1.0
        if adapter_name in self.mist_grad_scale:
            scale = self.mist_grad_scale[adapter_name] * scale
        return self.mist_indices[adapter_name], self.kept_positions(adapter_name, values), scale

    # ------------------------------------------------------------------------------ "fisher" warm-up
    def _score_weight(self, weight: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """The weight, with a backward that folds its dense gradient, squared, into each adapter's scores."""
        for a in adapters:
            if a not in self.mist_scores:
                self.mist_scores[a] = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                self.mist_scored_steps[a] = 0
            weight = _FoldSquaredGrad.apply(weight, self.mist_values[a], self.mist_scores[a])
        return weight

    def finish_warmup(self, adapter_name: str) -> None:
        """Called by the optimizer post-hook after each step of a "fisher" warm-up: after `score_steps`
        steps, choose the top entries of the accumulated scores (summed over processes) and start tuning."""
        if adapter_name not in self.mist_scores:
            return
        self.mist_scored_steps[adapter_name] += 1
        config = self.mist_config[adapter_name]
        if self.mist_scored_steps[adapter_name] < config.score_steps:
            return
        scores = self.mist_scores[adapter_name]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(scores)  # every process must select the same entries
        chosen = torch.topk(scores.reshape(-1), count_for(scores.numel(), config.density), sorted=False).indices
        self.set_indices(adapter_name, torch.sort(chosen).values)

    # ------------------------------------------------------------------------------ in-place engine
    def _write_live(self, adapter_name: str, values: torch.Tensor) -> None:
        """Make the base weight hold `adapter_name`'s effective entries (`values`, its values tensor): writes
        only the selected entries, and only when they changed since the last write."""
        stamp = (id(values), values._version)
        if self._live == adapter_name and self._live_stamp == stamp:
            return
        flat = self.get_base_layer().weight.data.view(-1)  # .data: autograd must not see this bookkeeping
        idx = self.mist_indices[adapter_name]
        if self._live != adapter_name:  # same adapter, new values: its indices and backup are still right
            self.restore_base_weight()
            self._live_backup = flat.index_select(0, idx)
        flat.index_copy_(0, idx, effective_entries(self._live_backup, values.detach()))
        # plain attributes written through __dict__: nn.Module.__setattr__ costs more than this whole check
        self.__dict__.update(_live=adapter_name, _live_stamp=stamp)

    def restore_base_weight(self) -> None:
        """Put the exact base entries back (leave the in-place engine); a no-op when it is not in use."""
        self.__dict__["_fast_live"] = None
        if self._live is None:
            return
        self.get_base_layer().weight.data.view(-1).index_copy_(0, self.mist_indices[self._live], self._live_backup)
        self._live, self._live_backup, self._live_stamp = None, None, None

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled:
            self.restore_base_weight()
        super().enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        self.restore_base_weight()
        super().delete_adapter(adapter_name)

    def _apply(self, fn, *args, **kwargs):
        self.restore_base_weight()  # `.to()` and friends must move the true base weight
        return super()._apply(fn, *args, **kwargs)

    def _state_dict_with_base_weight(self, state_dict: dict, prefix: str, *args) -> None:
        """state_dict hook: report the true base weight even while the in-place engine is in use."""
        key = prefix + "base_layer.weight"
        if self._live is None or key not in state_dict:
            return
        weight = state_dict[key].detach().clone()
        weight.view(-1).index_copy_(0, self.mist_indices[self._live], self._live_backup)
        state_dict[key] = weight

    # ------------------------------------------------------------------------------ delta and merge
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta of one adapter, shaped like the base weight (for inspection and merging)."""
        self.restore_base_weight()
        weight = self.get_base_layer().weight
        flat = weight.detach().reshape(-1)
        delta = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        if not self.mist_selected.get(adapter_name):
            return delta.view_as(weight)
        idx = self.mist_indices[adapter_name]
        base = flat.index_select(0, idx)
        delta.index_copy_(0, idx, effective_entries(base, self.mist_values[adapter_name].detach()) - base)
        return delta.view_as(weight)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the effective entries into the base weight; the overwritten ones are kept so unmerge is
        bit-exact."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        self.restore_base_weight()
        base = self.get_base_layer()
        for name in adapter_names:
            dense = [(kind, param, effective_entries(param.data.reshape(-1), values.detach()))
                     for kind, param, values in self._dense_deltas(name)]
            if name not in self.mist_values and not dense:
                continue
            merged = None
            if self.mist_selected.get(name):  # else nothing selected: the weight stays as it is
                idx = self.mist_indices[name]
                merged = effective_entries(base.weight.data.view(-1).index_select(0, idx),
                                           self.mist_values[name].detach())
            if safe_merge and not all(torch.isfinite(m).all() for m in [merged, *[d[2] for d in dense]]
                                      if m is not None):
                raise ValueError(f"NaNs or infs detected in the merged weights; adapter '{name}' seems broken")
            if merged is not None:
                flat = base.weight.data.view(-1)
                self.mist_backup[name] = flat.index_select(0, idx)
                flat.index_copy_(0, idx, merged)
            if dense:
                self.mist_dense_backup[name] = {kind: param.data.clone() for kind, param, _ in dense}
                for _, param, new in dense:
                    param.data.copy_(new.view_as(param))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the exact base entries, last merged adapter first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mist_backup:
                base.weight.data.view(-1).index_copy_(0, self.mist_indices[name], self.mist_backup.pop(name))
            for kind, saved in self.mist_dense_backup.pop(name, {}).items():
                getattr(base, DENSE_DELTAS[kind]).data.copy_(saved)

    def _compose_weight(self, weight: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """W + deltas with an autograd path to the values (the reference path; Conv2d and Embedding use it)."""
        flat = weight.reshape(-1)
        for (idx, kept, scale), name in zip(self._grad_inputs(adapters), adapters, strict=True):
            values = self.mist_values[name]
            if values.requires_grad and torch.is_grad_enabled():
                values = _KeepGrad.apply(values, kept, scale)
            flat = flat.index_copy(0, idx, effective_entries(flat.index_select(0, idx), values))
        return flat.view_as(weight)

    def _base_only(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The standard PEFT forward order: disabled -> base (unmerged); merged -> base; None -> compose."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return None

    def _input_for(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """PEFT's input cast to the weight's dtype, except under autocast, which picks the compute dtype."""
        return x if torch.is_autocast_enabled(x.device.type) else self._cast_input_dtype(x, dtype)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with `weight` in place of its own (the dense reference path)."""
        raise NotImplementedError

    def _dense_forward(self, x: torch.Tensor, adapters: list[str], scoring: list[str]) -> torch.Tensor:
        weight = self._score_weight(self.get_base_layer().weight, scoring)
        return self._apply_weight(x, self._compose_weight(weight, adapters))


def _in_out_features(base: nn.Module) -> tuple[int | None, int | None]:
    """in/out features as PEFT's own layers report them (Conv1D stores its weight as [in, out])."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if hasattr(base, "nf"):  # transformers' Conv1D
        return tuple(base.weight.shape)
    return getattr(base, "in_features", None), getattr(base, "out_features", None)


class _FoldSquaredGrad(torch.autograd.Function):
    """Identity on the weight; backward adds grad^2 to `scores`. The values input only makes autograd call
    it (the base weight is frozen); they get a zero gradient, so DDP sees every trainable tensor used."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ctx.scores, ctx.values_shape = scores, values.shape
        ctx.values_meta = (values.dtype, values.device)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.scores.add_(grad.detach().float().pow(2))
        dtype, device = ctx.values_meta
        return None, torch.zeros(ctx.values_shape, dtype=dtype, device=device), None


class _KeepGrad(torch.autograd.Function):
    """Identity forward; backward keeps the gradient only at the kept positions (times `scale`)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, kept: torch.Tensor | None, scale) -> torch.Tensor:
        ctx.kept, ctx.scale = kept, scale
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.kept is None:
            return grad * ctx.scale, None, None
        out = torch.zeros_like(grad)
        out.index_copy_(0, ctx.kept, grad.index_select(0, ctx.kept) * _at(ctx.scale, ctx.kept))
        return out, None, None


def _at(scale, positions: torch.Tensor):
    """A float scale, or a per-entry scale tensor read at `positions`."""
    return scale.index_select(0, positions) if torch.is_tensor(scale) else scale


def _scaled(dots: torch.Tensor, scale, positions: torch.Tensor) -> torch.Tensor:
    """`dots` times the gradient scale at `positions` (no op at all for a scale of exactly 1)."""
    return dots if not torch.is_tensor(scale) and scale == 1.0 else dots * _at(scale, positions)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` without the call when it would return `t` itself (the training step's hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a plain nn.Linear would compute in: autocast's when autocast is on, else the weight's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and weight.dtype.is_floating_point:
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x @ (W + Σ scatter(v_a))^T + b, whose backward computes each v_a's gradient at kept entries only.

    W + delta is rebuilt in backward instead of saved, so the only extra activation is x (which LoRA keeps
    too). The dense gradient of W is computed only when W itself requires grad (the MI-Fisher scoring pass).
    Under autocast everything is computed in autocast's dtype, as for a plain nn.Linear; the values'
    gradient is returned in the values' own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out: bool, meta: list, *values_and_live):
        *values, live = values_and_live  # live: `weight` already holds the effective entries (in-place engine)
        dtype = _compute_dtype(x, weight)
        w = _as(weight if live else _compose(weight, meta, values), dtype)
        xc = _as(x, dtype)
        b = _as(bias, dtype) if bias is not None else None
        # every operand is in the compute dtype already; autocast (when on) must not cast them again
        with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
                else contextlib.nullcontext():
            if fan_in_fan_out:  # the same kernel as transformers' Conv1D, so zero deltas reproduce it exactly
                x2 = xc.reshape(-1, xc.shape[-1])
                y2 = torch.addmm(b, x2, w) if b is not None else x2 @ w
                y = y2.view(*xc.shape[:-1], w.shape[1])
            else:
                y = F.linear(xc, w, b)
        ctx.fan_in_fan_out, ctx.meta, ctx.dtype, ctx.x_dtype, ctx.live = fan_in_fan_out, meta, dtype, x.dtype, live
        # only a backward that computes values' gradients reads it (inference tensors have no version counter)
        ctx.inputs = _InputMajor.shared(x, dtype) if x.device.type in SDDMM_DEVICES \
            and any(ctx.needs_input_grad[5:]) and not x.is_inference() else None
        ctx.save_for_backward(xc, weight, bias, *values)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, *values = ctx.saved_tensors
        fan = ctx.fan_in_fan_out
        need = ctx.needs_input_grad
        gy2 = _as(_token_rows(gy), ctx.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if need[0]:
            w = _as(weight if ctx.live else _compose(weight, ctx.meta, values), ctx.dtype)
            grad_x = _as((gy2 @ (w.t() if fan else w)).view(x.shape), ctx.x_dtype)
        if need[1]:
            grad_w = gy2.t() @ x2  # [out, in]
            grad_w = (grad_w.t() if fan else grad_w).to(weight.dtype)
        if bias is not None and need[2]:
            grad_b = gy2.sum(0).to(bias.dtype)
        grad_values = []
        majors: list = []  # token-major gy and x, made once for every adapter of this layer
        for i, ((idx, kept, scale), v) in enumerate(zip(ctx.meta, values, strict=True)):
            if not need[5 + i]:
                grad_values.append(None)
                continue
            positions = torch.arange(idx.numel(), device=idx.device) if kept is None else kept
            flat = idx.index_select(0, positions)
            if grad_w is not None:
                dots = grad_w.reshape(-1).index_select(0, flat)
            else:
                dots = _kept_weight_grad(gy2, x2, flat, tuple(weight.shape), fan, majors, ctx.inputs)
            g = torch.zeros_like(v)
            g.index_copy_(0, positions, _scaled(_as(dots, v.dtype), scale, positions))
            grad_values.append(g)
        return (grad_x, grad_w, grad_b, None, None, *grad_values, None)


def _compose(weight: torch.Tensor, meta: list, values) -> torch.Tensor:
    flat = weight.reshape(-1)
    for (idx, _, _), v in zip(meta, values, strict=True):
        flat = flat.index_copy(0, idx, effective_entries(flat.index_select(0, idx), v))
    return flat.view_as(weight)


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [tokens, features]. A gradient whose features are not contiguous (attention's key projection
    receives one laid out as k^T) is copied features-major: a cheap copy of token runs instead of a strided
    one, which the SDDMM operand then reuses without transposing and matmul reads as it is."""
    if t.dim() > 1 and t.stride(-1) != 1:
        t = t.movedim(-1, 0).reshape(t.shape[-1], -1).t()
    return t.reshape(-1, t.shape[-1])


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """``t.t()`` stored contiguously ([features, tokens]), in fp32 or fp64: the layout the CPU SDDMM kernel
    reads (it transposes any other layout itself); half-precision SDDMM is not on every device."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.t().contiguous()


class _InputMajor:
    """The token-major copy of one layer input, shared by every MIST Linear that reads that same tensor (an
    attention block's query, key and value; Llama's gate and up projections): made by the first of their
    backwards, dropped after the last.

    On a 2-core CPU a transposing copy costs 4x a plain one and is most of what a MIST step adds to LoRA's,
    so sharing it across q/k/v removes a third of the input-side copies. Forwards register their input here;
    a tensor counts as the same input only while it is alive and unmodified (weakref + version counter).
    """

    _last = threading.local()

    def __init__(self) -> None:
        self.users, self.tensor = 0, None

    @classmethod
    def shared(cls, x: torch.Tensor, dtype: torch.dtype) -> _InputMajor:
        """The holder for input ``x`` computed in ``dtype`` (a new one unless the last forward read the same)."""
        last = getattr(cls._last, "entry", None)
        if last is None or last[0]() is not x or last[1:3] != (x._version, dtype):
            last = cls._last.entry = (weakref.ref(x), x._version, dtype, cls())
        last[3].users += 1
        return last[3]

    def take(self, x2: torch.Tensor) -> torch.Tensor:
        """The token-major input for one user (made now if no earlier user made it)."""
        major = self.tensor if self.tensor is not None else _token_major(x2)
        self.users -= 1
        self.tensor = major if self.users > 0 else None
        return major


@functools.cache
def _spend_csr_warnings() -> None:
    """torch warns once per process that sparse CSR is in beta (and unchecked): spend those warnings here,
    silenced, once. A `warnings.catch_warnings` in every backward instead reset Python's warn-once registry, so
    every warning of the user's own code repeated at each training step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.zeros(1), (1, 1))


def _kept_weight_grad(gy2: torch.Tensor, x2: torch.Tensor, flat: torch.Tensor, shape: tuple, fan: bool,
                      majors: list, inputs: _InputMajor | None) -> torch.Tensor:
    """dL/dW at the sorted flat indices `flat` of a weight stored as `shape` ([out, in], or [in, out] for
    Conv1D), without building the dense gradient when SDDMM is available. `majors` caches the token-major
    operands across calls of one backward; `inputs` shares the input's with sibling layers."""
    if flat.numel() and gy2.device.type in SDDMM_DEVICES:
        if not majors:
            majors += [_token_major(gy2), inputs.take(x2) if inputs is not None else _token_major(x2)]
        g_major, x_major = majors
        # Row-major pattern over the stored layout: W[out, in] gets gy^T x, Conv1D's W[in, out] gets x^T gy.
        left, right = (x_major, g_major) if fan else (g_major, x_major)
        rows, cols = flat // shape[1], flat % shape[1]
        # `flat` is sorted, so are its rows: CSR row pointers without counting on the host
        crow = torch.searchsorted(rows, torch.arange(shape[0] + 1, device=flat.device))
        _spend_csr_warnings()
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(flat.numel(), dtype=left.dtype, device=left.device),
                                          shape)
        return torch.sparse.sampled_addmm(pattern, left, right.t(), beta=0.0).values()
    left, right = (x2, gy2) if fan else (gy2, x2)
    return (left.t() @ right).reshape(-1).index_select(0, flat)


def _restore_before_load(module: MISTLayer, *args: Any) -> None:
    """Loading may replace the live adapter's indices in place: put the true base weight back first."""
    module.restore_base_weight()


class _MISTModule(nn.Module, MISTLayer):
    """A module wrapping one base layer with its MIST adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_key: str = "", **kwargs: Any):
        super().__init__()
        MISTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_key=module_key)
        self._register_state_dict_hook(MISTLayer._state_dict_with_base_weight)
        self.register_load_state_dict_pre_hook(_restore_before_load)

    def __repr__(self) -> str:
        return "mist." + super().__repr__()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fast = self._fast_live
        if fast is not None and not fast[2].requires_grad and ENGINE == "inplace":
            values = fast[1]  # while `fast` is set, the live entries are this tensor's: only its version can move
            if values._version == self._live_stamp[1] and not (values.requires_grad and torch.is_grad_enabled()):
                return self.base_layer(x)  # unmerged inference: the base layer's own call
            return self._live_forward(x, *fast, plain=True)
        out = self._base_only(x, *args, **kwargs)
        if out is not None:
            return out
        scoring = self._unselected_in_training()
        adapters = self._active_with_entries()
        if not adapters and not scoring:
            if not self._dense_active():
                return self.base_layer(x, *args, **kwargs)
            self.restore_base_weight()
            return self._dense_forward(x, [], [])  # only bias deltas are active here
        return self._sparse_forward(x, adapters) if not scoring else self._dense_forward(x, adapters, scoring)

    def _sparse_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """Conv2d and Embedding: the base layer's own forward on the in-place weight (one active adapter, a
        frozen base weight), else the dense reference composition."""
        base = self.get_base_layer()
        if not (ENGINE == "inplace" and len(adapters) == 1 and not base.weight.requires_grad and self._live_ok(base)):
            self.restore_base_weight()
            return self._dense_forward(x, adapters, [])
        return self._go_live(x, adapters[0], base)

    def _go_live(self, x: torch.Tensor, name: str, base: nn.Module) -> torch.Tensor:
        """Enter the in-place engine for adapter `name` and run the forward there; while nothing else is active
        on the layer, later forwards go straight to `_live_forward`."""
        values = self.mist_values[name]
        plain = not self._dense_active()
        out = self._live_forward(x, name, values, base.weight, base, plain=plain)
        if plain:  # after the first write, which may restore (and so clear) an older state
            self.__dict__["_fast_live"] = (name, values, base.weight, base)
        return out

    def _live_forward(self, x: torch.Tensor, name: str, values: torch.Tensor, weight: torch.Tensor,
                      base: nn.Module, plain: bool) -> torch.Tensor:
        """The forward on the in-place weight of `base` (the base layer): inference is exactly the base
        layer's cost (`plain`: no dense deltas are active); training adds the values' gradient at the kept
        entries."""
        self._write_live(name, values)
        if not (values.requires_grad and torch.is_grad_enabled()):
            return self.base_layer(x) if plain else self._base_forward(x)
        self._note_training_forward()
        return self._live_training_forward(x, values, weight, self._grad_meta(name, values), base, plain)

    def _live_training_forward(self, x: torch.Tensor, values: torch.Tensor, weight: torch.Tensor,
                               meta: tuple, base: nn.Module, plain: bool) -> torch.Tensor:
        """Conv2d and Embedding: the base layer's forward, the values' gradient added by its backward."""
        if x.is_floating_point():
            x = self._input_for(x, weight.dtype)
        return _ValuesGradFromOutput.apply(self._base_forward(x), x, values, self._kept_grad, *meta)

    def _live_ok(self, base: nn.Module) -> bool:
        """Whether the in-place engine applies to this base layer's settings."""
        return True

    def _kept_grad(self, x: torch.Tensor, gy: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """dL/dW at the sorted flat indices `flat`, from the layer's input and output gradient."""
        raise NotImplementedError


class _ValuesGradFromOutput(torch.autograd.Function):
    """Identity on a layer's output y (computed by the base layer on the in-place weight); its backward adds
    the values' gradient at the kept entries, `kept_grad(x, gy, flat indices)` times `scale`. The input's and
    bias's gradients flow through the base layer's own autograd graph."""

    @staticmethod
    def forward(ctx, y, x, values, kept_grad, idx, kept, scale):
        ctx.kept_grad, ctx.idx, ctx.kept, ctx.scale = kept_grad, idx, kept, scale
        ctx.values_meta = (values.shape, values.dtype)
        ctx.save_for_backward(x)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy):
        grad_values = None
        if ctx.needs_input_grad[2]:
            (x,) = ctx.saved_tensors
            shape, dtype = ctx.values_meta
            positions = torch.arange(ctx.idx.numel(), device=ctx.idx.device) if ctx.kept is None else ctx.kept
            dots = ctx.kept_grad(x, gy, ctx.idx.index_select(0, positions))
            grad_values = torch.zeros(shape, dtype=dtype, device=gy.device)
            grad_values.index_copy_(0, positions, dots.to(dtype) * _at(ctx.scale, positions))
        return gy, None, grad_values, None, None, None, None


class Linear(_MISTModule):
    """MIST on `nn.Linear` and on transformers' `Conv1D` (GPT-2 style, weight stored [in, out])."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, fan_in_fan_out: bool = False,
                 module_key: str = "", **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config, module_key=module_key, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out

    def _sparse_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        if ENGINE == "inplace" and len(adapters) == 1 and not base.weight.requires_grad:
            return self._go_live(x, adapters[0], base)
        self.restore_base_weight()
        meta = self._grad_inputs(adapters)
        values = [self.mist_values[a] for a in adapters]
        x = self._input_for(x, base.weight.dtype)
        return _SparseDeltaLinear.apply(x, base.weight, self._bias(), self.fan_in_fan_out, meta, *values, False)

    def _live_training_forward(self, x: torch.Tensor, values: torch.Tensor, weight: torch.Tensor,
                               meta: tuple, base: nn.Module, plain: bool) -> torch.Tensor:
        bias = base.bias if plain else self._bias()  # plain: no bias delta is active
        return _SparseDeltaLinear.apply(self._input_for(x, weight.dtype), weight, bias, self.fan_in_fan_out,
                                        [meta], values, True)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = self._bias()
        x = self._input_for(x, weight.dtype)
        if self.fan_in_fan_out:
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight) if bias is not None \
                else x.reshape(-1, x.shape[-1]) @ weight
            return out.view(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, bias)


class Conv2d(_MISTModule):
    """MIST on `nn.Conv2d`. In-place engine: the base convolution, and the values' gradient gathered from
    the dense weight gradient (convolution weights are small)."""

    def _live_ok(self, base: nn.Module) -> bool:
        return base.padding_mode == "zeros" and not isinstance(base.padding, str)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        x = self._input_for(x, weight.dtype)
        return base._conv_forward(x, weight, self._bias())

    def _kept_grad(self, x: torch.Tensor, gy: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if x.dim() == 3:  # an unbatched input
            x, gy = x.unsqueeze(0), gy.unsqueeze(0)
        grad_w = torch.nn.grad.conv2d_weight(x.to(gy.dtype), base.weight.shape, gy, base.stride, base.padding,
                                             base.dilation, base.groups)
        return grad_w.reshape(-1).index_select(0, flat)


class Embedding(_MISTModule):
    """MIST on `nn.Embedding` (selected entries of the embedding table). In-place engine: the base lookup,
    and the values' gradient summed over the batch's tokens only (never a dense table gradient)."""

    def _live_ok(self, base: nn.Module) -> bool:
        return base.max_norm is None and not base.scale_grad_by_freq  # max_norm rewrites the table in forward

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def _kept_grad(self, ids: torch.Tensor, gy: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """dL/dW[r, c] = sum of gy[t, c] over the tokens t with id r: the output gradient is summed per
        distinct id of the batch (in token order, as the dense embedding backward does), then read at the
        kept entries. Memory O(tokens x dim); no host sync (sort, cumsum, searchsorted)."""
        dim = self.get_base_layer().embedding_dim
        padding_idx = self.get_base_layer().padding_idx
        ids = ids.reshape(-1).long()  # int32 ids are valid input; searchsorted needs one dtype
        gy2 = gy.reshape(-1, dim)
        tokens = ids.numel()
        if tokens == 0:
            return torch.zeros(flat.numel(), dtype=gy.dtype, device=gy.device)
        sorted_ids, order = torch.sort(ids)
        starts = torch.ones_like(sorted_ids, dtype=torch.bool)
        starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
        sorted_group = torch.cumsum(starts, 0) - 1  # rank of each distinct id
        group = torch.empty_like(sorted_group).index_copy_(0, order, sorted_group)
        if padding_idx is not None:  # the padding row gets no gradient: its tokens go to a discarded row
            group = torch.where(ids == padding_idx, tokens, group)
        sums = torch.zeros(tokens + 2, dim, dtype=gy2.dtype, device=gy2.device)  # + discarded row + zero row
        sums.index_add_(0, group, gy2)
        rows, cols = flat // dim, flat % dim
        at = torch.searchsorted(sorted_ids, rows).clamp_(max=tokens - 1)
        present = sorted_ids.index_select(0, at) == rows
        row_group = torch.where(present, sorted_group.index_select(0, at), tokens + 1)
        return sums.reshape(-1).index_select(0, row_group * dim + cols)


NORM_TYPES: tuple[type, ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class Norm(_MISTModule):
    """`nn.LayerNorm` / `nn.RMSNorm` under `tune_biases_and_norms`: dense deltas over its whole weight and bias
    (every entry selectable, never scored; the gradient dropout applies). A norm's weight is 1-D, so the
    forward always composes base + delta (cheap); both engines therefore run the same code here."""

    dense_kinds = ("mist_norm_values", "mist_bias_values")

    def update_layer(self, adapter_name: str, config, module_key: str = "") -> None:
        self._register_adapter(adapter_name, config, module_key)
        self._add_dense_deltas(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._base_only(x, *args, **kwargs)
        if out is not None:
            return out
        if not self._dense_active():
            return self.base_layer(x, *args, **kwargs)
        return self._apply_weight(x, self._dense_effective("mist_norm_values"))

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        base = self.get_base_layer()
        if isinstance(base, nn.LayerNorm):
            return F.layer_norm(x, base.normalized_shape, weight, self._bias(), base.eps)
        return F.rms_norm(x, base.normalized_shape, weight, base.eps)
