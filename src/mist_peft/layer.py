"""Sparse-delta tuner layers: W_eff = W + scatter(values at selected flat indices of W).

The base weight stays frozen and untouched. An adapter holds a 1-D trainable `mist_values[name]` and the
sorted int64 flat indices `mist_indices[name]` (in the base weight's own memory layout, so Conv1D's
transposed storage needs no special case when merging). Gradient dropout is drawn per optimizer step
(see `optim.py`); for Linear and Conv1D a fused autograd function computes the values' gradient only at
the entries kept in that step (a sampled matmul), so no dense weight gradient is built.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ._peft_compat import BufferDict
from .sparse_io import check_strictly_increasing

# The values' gradient at the kept entries is a sampled dense-dense matmul (SDDMM, torch.sparse.sampled_addmm):
# measured on a 2-core CPU for a 1536x384 weight and 2048 tokens it costs half a dense weight gradient at any
# kept share up to 5%, where a gather-and-dot costs three times more. False forces the dense fallback.
USE_SDDMM = True


class MISTLayer(BaseTunerLayer):
    """Mixin with the per-adapter state shared by every MIST layer type."""

    adapter_layer_names = ("mist_values",)
    other_param_names = ("mist_indices", "mist_grad_drop", "mist_rescale", "mist_seed", "mist_kept", "mist_backup",
                         "mist_grad_scale")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mist_values = nn.ParameterDict({})
        self.mist_indices = BufferDict({}, persistent=True)
        self.mist_grad_drop: dict[str, float] = {}
        self.mist_rescale: dict[str, bool] = {}
        self.mist_seed: dict[str, int] = {}
        self.mist_kept: dict[str, tuple[int, torch.Tensor | None]] = {}  # (step, kept positions or None=all)
        self.mist_backup: dict[str, torch.Tensor] = {}  # base values at the indices, saved by merge()
        self.mist_grad_scale: dict[str, torch.Tensor] = {}  # optional per-entry gradient factor (overlap decay)
        self.mist_step = 0  # optimizer steps taken; advanced by `attach_optimizer`
        self.mist_key = 0  # stable per-layer id (crc32 of the module path), the same on every process
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self._forwards_at_step = 0

    # ----------------------------------------------------------------------------------------- state
    def update_layer(self, adapter_name: str, config, module_key: str = "") -> None:
        """Create an empty placeholder adapter; `set_indices` fills it (selection happens after injection)."""
        weight = self.get_base_layer().weight
        if module_key:
            self.mist_key = zlib.crc32(module_key.encode())
        self.mist_grad_drop[adapter_name] = float(config.grad_drop)
        self.mist_rescale[adapter_name] = bool(config.rescale_kept_grads)
        self.mist_seed[adapter_name] = int(config.seed)
        self.mist_indices[adapter_name] = torch.zeros(0, dtype=torch.int64, device=weight.device)
        self.mist_values[adapter_name] = nn.Parameter(torch.zeros(0, dtype=self._values_dtype(), device=weight.device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _values_dtype(self) -> torch.dtype:
        dtype = self.get_base_layer().weight.dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def set_indices(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Install the selected flat indices (and optionally their values; zeros otherwise) for an adapter."""
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
        old = self.mist_values[adapter_name]
        new = torch.zeros(idx.numel(), dtype=old.dtype, device=weight.device) if values is None else values
        if new.shape != idx.shape:
            raise ValueError(f"{new.numel()} values given for {idx.numel()} indices")
        self.mist_indices[adapter_name] = idx
        self.mist_values[adapter_name] = nn.Parameter(
            new.detach().to(device=weight.device, dtype=old.dtype), requires_grad=old.requires_grad
        )
        self.mist_kept.pop(adapter_name, None)
        self.mist_grad_scale.pop(adapter_name, None)

    def _active_with_entries(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.mist_values and self.mist_values[a].numel() > 0]

    # ------------------------------------------------------------------------------ gradient dropout
    def kept_positions(self, adapter_name: str) -> torch.Tensor | None:
        """Positions (into the values vector) that get a gradient in the current step; None means all.

        The draw depends only on (seed, layer id, step), so every process of a multi-process run and every
        forward of the same step (two views, gradient accumulation) sees the same subset.
        """
        drop = self.mist_grad_drop[adapter_name]
        if drop == 0:
            return None
        cached = self.mist_kept.get(adapter_name)
        if cached is not None and cached[0] == self.mist_step:
            return cached[1]
        values = self.mist_values[adapter_name]
        gen = torch.Generator(device=values.device)
        gen.manual_seed((self.mist_seed[adapter_name] * 1_000_003 + self.mist_key) * 7_919 + self.mist_step)
        keep = torch.rand(values.numel(), generator=gen, device=values.device) >= drop
        kept = torch.nonzero(keep).reshape(-1)
        self.mist_kept[adapter_name] = (self.mist_step, kept)
        return kept

    def _note_training_forward(self) -> None:
        self._forwards_at_step += 1
        if self._forwards_at_step == 64:
            warnings.warn(
                "MIST: 64 training forwards without an optimizer step being registered, so the gradient-dropout "
                "subset is not being redrawn. Call `mist_peft.attach_optimizer(optimizer, model)` once after "
                "creating the optimizer (train_mist and MISTTrainer do this for you).",
                stacklevel=3,
            )

    def _grad_inputs(self, adapters: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None, float]]:
        """(indices, kept positions, gradient scale) per adapter for the current forward."""
        grad_on = torch.is_grad_enabled()
        if grad_on and any(self.mist_values[a].requires_grad for a in adapters):
            self._note_training_forward()
        out = []
        for a in adapters:
            kept = self.kept_positions(a) if grad_on and self.mist_values[a].requires_grad else None
            drop = self.mist_grad_drop[a]
            scale = 1.0 / (1.0 - drop) if self.mist_rescale[a] and drop > 0 else 1.0
            if a in self.mist_grad_scale:
                scale = self.mist_grad_scale[a] * scale
            out.append((self.mist_indices[a], kept, scale))
        return out

    # ------------------------------------------------------------------------------ delta and merge
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta of one adapter, shaped like the base weight (for inspection and merging)."""
        weight = self.get_base_layer().weight
        delta = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        values = self.mist_values[adapter_name].detach().to(weight.dtype)
        return delta.index_add_(0, self.mist_indices[adapter_name], values).view_as(weight)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas into the base weight; the overwritten entries are kept so unmerge is bit-exact."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.mist_values:
                continue
            idx = self.mist_indices[name]
            flat = base.weight.data.view(-1)
            merged = flat[idx] + self.mist_values[name].detach().to(flat.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs detected in the merged weights; adapter '{name}' seems broken")
            self.mist_backup[name] = flat[idx].clone()
            flat[idx] = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the exact base entries, last merged adapter first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        flat = self.get_base_layer().weight.data.view(-1)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mist_backup:
                flat[self.mist_indices[name]] = self.mist_backup.pop(name)

    def _compose_weight(self, weight: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """W + deltas with an autograd path to the values (used by Conv2d and Embedding)."""
        flat = weight.reshape(-1)
        for (idx, kept, scale), name in zip(self._grad_inputs(adapters), adapters, strict=False):
            values = self.mist_values[name]
            if values.requires_grad:
                values = _KeepGrad.apply(values, kept, scale)
            flat = flat.index_add(0, idx, values.to(weight.dtype))
        return flat.view_as(weight)

    def _base_only(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The standard PEFT forward order: disabled -> base (unmerged); merged -> base; None -> compose."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not self._active_with_entries():
            return self.base_layer(x, *args, **kwargs)
        return None


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
        out[ctx.kept] = grad[ctx.kept] * _at(ctx.scale, ctx.kept)
        return out, None, None


def _at(scale, positions: torch.Tensor):
    """A float scale, or a per-entry scale tensor read at `positions`."""
    return scale[positions] if torch.is_tensor(scale) else scale


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x @ (W + Σ scatter(v_a))^T + b, whose backward computes each v_a's gradient at kept entries only.

    W + delta is rebuilt in backward instead of saved, so the only extra activation is x (which LoRA keeps
    too). The dense gradient of W is computed only when W itself requires grad (the MI-Fisher scoring pass).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out: bool, meta: list, *values):
        w = _compose(weight, meta, values)
        if fan_in_fan_out:  # the same kernel as transformers' Conv1D, so zero deltas reproduce it exactly
            x2 = x.reshape(-1, x.shape[-1])
            y2 = torch.addmm(bias, x2, w) if bias is not None else x2 @ w
            y = y2.view(*x.shape[:-1], w.shape[1])
        else:
            y = F.linear(x, w, bias)
        ctx.fan_in_fan_out, ctx.meta = fan_in_fan_out, meta
        ctx.save_for_backward(x, weight, bias, *values)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, *values = ctx.saved_tensors
        fan = ctx.fan_in_fan_out
        need = ctx.needs_input_grad
        gy2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if need[0]:
            w = _compose(weight, ctx.meta, values)
            grad_x = (gy2 @ (w.t() if fan else w)).view(x.shape)
        if need[1]:
            grad_w = gy2.t() @ x2  # [out, in]
            grad_w = grad_w.t() if fan else grad_w
        if bias is not None and need[2]:
            grad_b = gy2.sum(0)
        grad_values = []
        for i, ((idx, kept, scale), v) in enumerate(zip(ctx.meta, values, strict=True)):
            if not need[5 + i]:
                grad_values.append(None)
                continue
            positions = torch.arange(idx.numel(), device=idx.device) if kept is None else kept
            flat = idx[positions]
            if grad_w is not None:
                dots = grad_w.reshape(-1)[flat]
            else:
                dots = _kept_weight_grad(gy2, x2, flat, tuple(weight.shape), fan)
            g = torch.zeros_like(v)
            g[positions] = dots.to(v.dtype) * _at(scale, positions)
            grad_values.append(g)
        return (grad_x, grad_w, grad_b, None, None, *grad_values)


def _compose(weight: torch.Tensor, meta: list, values) -> torch.Tensor:
    flat = weight.reshape(-1)
    for (idx, _, _), v in zip(meta, values, strict=False):
        flat = flat.index_add(0, idx, v.to(weight.dtype))
    return flat.view_as(weight)


def _kept_weight_grad(gy2: torch.Tensor, x2: torch.Tensor, flat: torch.Tensor, shape: tuple, fan: bool):
    """dL/dW at the sorted flat indices `flat` of a weight stored as `shape` ([out, in], or [in, out] for
    Conv1D), without building the dense gradient when SDDMM is available."""
    # Row-major pattern over the stored layout: W[out, in] gets gy^T x, Conv1D's W[in, out] gets x^T gy.
    left, right = (x2, gy2) if fan else (gy2, x2)
    if USE_SDDMM and left.dtype in (torch.float32, torch.float64) and flat.numel():
        rows, cols = flat // shape[1], flat % shape[1]
        crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=flat.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(flat.numel(), dtype=left.dtype,
                                                                       device=left.device), shape)
            return torch.sparse.sampled_addmm(pattern, left.t().contiguous(), right, beta=0.0).values()
    return (left.t() @ right).reshape(-1)[flat]


class _MISTModule(nn.Module, MISTLayer):
    """A module wrapping one base layer with its MIST adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_key: str = "", **kwargs: Any):
        super().__init__()
        MISTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_key=module_key)

    def __repr__(self) -> str:
        return "mist." + super().__repr__()


class Linear(_MISTModule):
    """MIST on `nn.Linear` and on transformers' `Conv1D` (GPT-2 style, weight stored [in, out])."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, fan_in_fan_out: bool = False,
                 module_key: str = "", **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config, module_key=module_key, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._base_only(x, *args, **kwargs)
        if out is not None:
            return out
        adapters = self._active_with_entries()
        base = self.get_base_layer()
        meta = self._grad_inputs(adapters)
        values = [self.mist_values[a] for a in adapters]
        x = self._cast_input_dtype(x, base.weight.dtype)
        return _SparseDeltaLinear.apply(x, base.weight, base.bias, self.fan_in_fan_out, meta, *values)


class _DenselyComposed(_MISTModule):
    """Layers that compose W + delta densely (autograd handles the values' gradient); subclasses apply W."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._base_only(x, *args, **kwargs)
        if out is not None:
            return out
        base = self.get_base_layer()
        return self._apply_weight(base, x, self._compose_weight(base.weight, self._active_with_entries()))

    def _apply_weight(self, base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Conv2d(_DenselyComposed):
    """MIST on `nn.Conv2d` (convolutions are rarely the hot path in MIST's targets)."""

    def _apply_weight(self, base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return base._conv_forward(self._cast_input_dtype(x, weight.dtype), weight, base.bias)


class Embedding(_DenselyComposed):
    """MIST on `nn.Embedding` (selected entries of the embedding table)."""

    def _apply_weight(self, base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)
