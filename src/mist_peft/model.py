"""`MISTModel`, the PEFT tuner: injects sparse-delta layers and defines the sparse checkpoint format.

Checkpoint layout, per targeted module `<m>` (keys after PEFT strips the adapter name):
- `<m>.mist_values`  the delta values (float), one per selected entry;
- `<m>.mist_indices` the sorted flat indices as a uint8 varint gap stream (`sparse_io.py`);
- `<m>.mist_shape`   the base weight's shape (int64), so a wrong base model is reported by name and shape.
Nothing the size of a base weight is ever written. With `tune_biases_and_norms`, also (dense, tiny):
- `<m>.mist_bias_values` the delta of the module's whole bias;
- `<m>.mist_norm_values` the delta of a LayerNorm/RMSNorm's whole weight (flattened).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import warnings
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import MISTConfig
from .layer import DENSE_DELTAS, NORM_TYPES, Conv2d, Embedding, Linear, MISTLayer, Norm
from .names import MIST_PREFIX
from .optim import install_optimizer_hooks
from .selection import mist_layers, select_data_free
from .sparse_io import decode_indices, encode_indices

_SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv2d and nn.Embedding"
_LOADING = contextvars.ContextVar("mist_loading_checkpoint", default=False)


@contextlib.contextmanager
def loading_checkpoint() -> Iterator[None]:
    """Inside it, injected MIST adapters are not selected: a checkpoint is about to provide their entries.
    The loading entry points (PeftModel.from_pretrained / load_adapter, transformers' load_adapter) use it."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


class MISTModel(BaseTuner):
    """PEFT tuner for MIST: frozen base weights plus trainable deltas on a selected subset of their entries.

    Use through `peft.get_peft_model(model, MISTConfig(...))` after `import mist_peft`.
    """

    prefix: str = MIST_PREFIX
    tuner_layer_cls = MISTLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: MISTConfig, model_config: dict) -> MISTConfig:
        return peft_config  # target_modules defaults to "all-linear" in the config itself

    def _create_and_replace(self, config: MISTConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: str | None = None) -> None:
        if parameter_name is not None:
            raise ValueError("MIST targets modules, not bare parameters: use `target_modules`.")
        if isinstance(target, MISTLayer):
            target.update_layer(adapter_name, config, module_key=current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        _refuse_tied_weight(getattr(self, "_weight_owners", {}), current_key, base)
        if isinstance(base, nn.Linear):
            new = Linear(target, adapter_name, config, module_key=current_key)
        elif isinstance(base, Conv1D):
            new = Linear(target, adapter_name, config, fan_in_fan_out=True, module_key=current_key)
        elif isinstance(base, nn.Conv2d):
            new = Conv2d(target, adapter_name, config, module_key=current_key)
        elif isinstance(base, nn.Embedding):
            new = Embedding(target, adapter_name, config, module_key=current_key)
        elif isinstance(base, NORM_TYPES) and config.tune_biases_and_norms:
            new = Norm(target, adapter_name, config, module_key=current_key)
        else:
            raise ValueError(
                f"Module '{current_key}' is a {type(base).__name__}; MIST supports {_SUPPORTED} (and "
                "nn.LayerNorm / nn.RMSNorm with `tune_biases_and_norms=True`). "
                "Remove it from `target_modules` or add it to `exclude_modules`."
            )
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict | None = None, **kwargs) -> None:
        """Inject the layers. Data-free selections pick their entries now (also for `add_adapter`), so
        `get_peft_model` returns a trainable model at once; never while a checkpoint is being loaded (it
        provides the entries), nor under `low_cpu_mem_usage` (the values live on the meta device)."""
        install_optimizer_hooks()
        self._weight_owners = _weight_owners(model)
        self._norm_keys = _norm_keys(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict, **kwargs)
        config = self.peft_config[adapter_name]
        if config.selection not in ("magnitude", "random"):
            return

        def select() -> None:
            select_data_free(model, adapter_name, config)

        for layer in mist_layers(model, adapter_name).values():
            layer.mist_select_all[adapter_name] = select
        if not (_LOADING.get() or low_cpu_mem_usage or state_dict is not None):
            select()

    def _check_target_module_exists(self, peft_config: MISTConfig, key: str):
        """PEFT's matching, plus every LayerNorm/RMSNorm when `tune_biases_and_norms` is on (as if it were
        named in `target_modules`, so `exclude_modules`, `modules_to_save` and `layers_to_transform` apply)."""
        result = check_target_module_exists(peft_config, key)
        if result or key not in getattr(self, "_norm_keys", ()):
            return result
        as_target = copy.copy(peft_config)
        as_target.target_modules = {key.rsplit(".", 1)[-1]}
        return check_target_module_exists(as_target, key)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        for layer in mist_layers(self.model).values():
            layer.restore_base_weight()  # unload hands out the base layers: they must hold the true weights
        return super()._unload_and_optionally_merge(*args, **kwargs)

    # ------------------------------------------------------------------- sparse checkpoint format
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        shapes = _mist_weight_shapes(model, adapter_name)
        unselected = _unselected_modules(model, adapter_name)
        for key in list(out):
            if key.endswith(f".mist_indices.{adapter_name}"):
                module_key = key.removesuffix(f".mist_indices.{adapter_name}")
                if module_key in unselected:  # saved before selection: no entries, and it loads unselected
                    out[f"{module_key}.mist_values.{adapter_name}"] = out[key].new_zeros(0, dtype=torch.float32)
                out[key] = encode_indices(out[key])
                out[f"{module_key}.mist_shape.{adapter_name}"] = torch.tensor(shapes[module_key], dtype=torch.int64)
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Validate the sparse checkpoint against this model and size the placeholders before loading."""
        peft_prefix = "base_model.model."
        modules = {name.removeprefix("_fsdp_wrapped_module."): m for name, m in model.named_modules()
                   if isinstance(m, MISTLayer)}
        found: dict[str, dict[str, torch.Tensor]] = {}
        rest = {}
        for key, value in state_dict.items():
            module_key, _, leaf = key.rpartition(".")
            if leaf in ("mist_values", "mist_indices", "mist_shape"):
                found.setdefault(module_key, {})[leaf] = value
            else:
                rest[key] = value
        _check_dense_deltas(rest, modules, adapter_name, peft_prefix)
        unknown = [k for k in found if _resolve(k, modules, peft_prefix) is None]
        if unknown:
            raise ValueError(
                f"This MIST checkpoint has deltas for {len(unknown)} module(s) that the model does not have as MIST "
                f"layers, e.g. '{unknown[0]}'. Load it on the base model it was trained on (same architecture and "
                "module names) with the adapter_config.json saved beside it."
            )
        missing = [name for name, m in modules.items() if adapter_name in m.mist_values
                   and not any(_resolve(k, modules, peft_prefix) is m for k in found)]
        if missing:
            raise ValueError(
                f"This MIST checkpoint has no deltas for {len(missing)} targeted module(s), e.g. '{missing[0]}'. "
                "The checkpoint and its adapter_config.json do not belong together; re-save the adapter."
            )
        # An adapter saved before selection has no entry anywhere (a selected one has at least one in total).
        selected = any(parts.get("mist_values", torch.zeros(0)).numel() for parts in found.values())
        for module_key, parts in found.items():
            layer = _resolve(module_key, modules, peft_prefix)
            if not selected:
                rest[f"{module_key}.mist_indices"] = layer.mist_indices[adapter_name]
                rest[f"{module_key}.mist_values"] = layer.mist_values[adapter_name].detach()
                continue
            indices, values = _install_checkpoint_entry(module_key, layer, adapter_name, parts)
            # Placeholders are now sized; PEFT's load_state_dict fills them (and reports nothing as missing).
            rest[f"{module_key}.mist_indices"] = indices
            rest[f"{module_key}.mist_values"] = values
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, rest)


def _norm_keys(model: nn.Module, config: MISTConfig) -> set[str]:
    """Names of the norms `tune_biases_and_norms` wraps; warns once about norm classes it cannot wrap."""
    if not config.tune_biases_and_norms:
        return set()
    keys, skipped = set(), {}
    for name, m in model.named_modules():
        if isinstance(m, Norm) or (isinstance(m, NORM_TYPES) and not name.endswith(".base_layer")):
            if any(p is not None for p in (getattr(m, "weight", None), getattr(m, "bias", None))):
                keys.add(name)
        elif ("norm" in type(m).__name__.lower() and not isinstance(m, (MISTLayer, *NORM_TYPES))
              and any(True for _ in m.parameters(recurse=False))
              and not isinstance(check_target_module_exists(config, name), _ExcludedModule)):
            skipped.setdefault(type(m).__name__, name)
    if skipped:
        warnings.warn(
            "tune_biases_and_norms: MIST tunes nn.LayerNorm and nn.RMSNorm only, so these norm classes stay frozen: "
            + ", ".join(f"{cls} (e.g. '{name}')" for cls, name in skipped.items())
            + ". Their parameters are not tuned; add them to `modules_to_save` to train them densely.",
            stacklevel=3,
        )
    return keys


def _check_dense_deltas(state: dict, modules: dict[str, MISTLayer], adapter_name: str, peft_prefix: str) -> None:
    """The checkpoint's bias/norm deltas must be exactly those this model's adapter has (same config)."""
    found = {}
    for key, value in state.items():
        module_key, _, leaf = key.rpartition(".")
        if leaf in DENSE_DELTAS:
            layer = _resolve(module_key, modules, peft_prefix)
            if layer is None or adapter_name not in getattr(layer, leaf):
                raise ValueError(
                    f"This MIST checkpoint has a '{leaf}' delta for '{module_key}', which this model's adapter does "
                    "not have. It was saved with tune_biases_and_norms=True: load it with the adapter_config.json "
                    "saved beside it, on the base model it was trained on."
                )
            expected = getattr(layer, leaf)[adapter_name].numel()
            if value.numel() != expected:
                raise ValueError(f"MIST checkpoint does not fit module '{module_key}': {value.numel()} '{leaf}' "
                                 f"entries for {expected}. Load it on the base model it was trained on.")
            found.setdefault(id(layer), set()).add(leaf)
    missing = [(name, kind) for name, m in modules.items() for kind in DENSE_DELTAS
               if adapter_name in getattr(m, kind) and kind not in found.get(id(m), set())]
    if missing:
        raise ValueError(
            f"This MIST checkpoint has no '{missing[0][1]}' delta for '{missing[0][0]}' ({len(missing)} missing), "
            "but the adapter config asks for them (tune_biases_and_norms=True). The checkpoint and its "
            "adapter_config.json do not belong together; re-save the adapter."
        )


def _resolve(checkpoint_module_key: str, modules: dict[str, MISTLayer], peft_prefix: str) -> MISTLayer | None:
    key = checkpoint_module_key
    return modules.get(key) or modules.get(key.removeprefix(peft_prefix)) or modules.get(peft_prefix + key)


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(weight) -> names of the modules holding it (more than one name: tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(module, MISTLayer):
            owners.setdefault(id(weight), []).append(name)
    return owners


def _refuse_tied_weight(owners: dict[int, list[str]], key: str, base: nn.Module) -> None:
    """A weight shared with another module (GPT-2's `wte` and `lm_head`) would get the delta in one place
    unmerged and in both once merged: refuse it with the way out."""
    names = owners.get(id(getattr(base, "weight", None)), [])
    sharing = [n for n in names if n != key and n != f"{key}.base_layer"]
    if sharing:
        raise ValueError(
            f"Module '{key}' shares its weight with '{sharing[0]}' (tied weights, e.g. input embeddings and the "
            "LM head). MIST would change the weight for one of them while unmerged and for both once merged. "
            f"Leave it out (`exclude_modules=['{key.rsplit('.', 1)[-1]}']`), or untie the weights first "
            "(load with `tie_word_embeddings=False` and give the head its own copy of the weight)."
        )


def _unselected_modules(model: nn.Module, adapter_name: str) -> set[str]:
    return {name.removeprefix("_fsdp_wrapped_module.") for name, m in model.named_modules()
            if isinstance(m, MISTLayer) and adapter_name in m.mist_values and not m.mist_selected[adapter_name]}


def _mist_weight_shapes(model: nn.Module, adapter_name: str) -> dict[str, list[int]]:
    return {
        name.removeprefix("_fsdp_wrapped_module."): list(m.get_base_layer().weight.shape)
        for name, m in model.named_modules()
        if isinstance(m, MISTLayer) and adapter_name in m.mist_values
    }


def _install_checkpoint_entry(module_key: str, layer: MISTLayer, adapter_name: str,
                              parts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and check one module's entries, then install them (values and indices) into the layer."""
    for needed in ("mist_values", "mist_indices"):
        if needed not in parts:
            raise ValueError(f"MIST checkpoint is incomplete: '{module_key}' has no '{needed}'. Re-save the adapter.")
    weight = layer.get_base_layer().weight
    saved_shape = tuple(int(s) for s in parts["mist_shape"].tolist()) if "mist_shape" in parts else None
    if saved_shape is not None and saved_shape != tuple(weight.shape):
        raise ValueError(
            f"MIST checkpoint does not fit module '{module_key}': it was saved for a weight of shape {saved_shape}, "
            f"but this model's weight has shape {tuple(weight.shape)}. Load the adapter on the base model it was "
            "trained on."
        )
    try:
        indices = decode_indices(parts["mist_indices"], tuple(weight.shape), parts["mist_values"].numel())
    except ValueError as err:
        raise ValueError(f"MIST checkpoint is corrupted at module '{module_key}': {err}. Re-save or re-download "
                         "the adapter.") from err
    values = parts["mist_values"]
    if values.ndim != 1 or values.numel() != indices.numel():
        raise ValueError(
            f"MIST checkpoint is corrupted at module '{module_key}': {values.numel()} values for "
            f"{indices.numel()} indices. Re-save or re-download the adapter."
        )
    if indices.numel() and int(indices[-1]) >= weight.numel():
        raise ValueError(
            f"MIST checkpoint does not fit module '{module_key}': index {int(indices[-1])} is out of range for a "
            f"weight of shape {tuple(weight.shape)} ({weight.numel()} entries). Load the adapter on the base model "
            "it was trained on."
        )
    if not torch.isfinite(values).all():
        raise ValueError(f"MIST checkpoint is corrupted at module '{module_key}': its values hold NaN or inf.")
    layer.set_indices(adapter_name, indices, values)
    return indices, values
