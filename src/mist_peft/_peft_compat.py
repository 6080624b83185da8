"""The only module that touches PEFT internals, each use with the reason no public hook exists.

Checked against peft 0.21.x (pinned in pyproject.toml); `tests/test_peft_compat.py` fails loudly when
any of these assumptions breaks under a new PEFT release.

1. Registration. `peft.utils.register_peft_method` only accepts names that are already `PeftType` members,
   and `PeftType` cannot be extended. So MIST gets its own `str` enum (it needs `.value`, which
   transformers' `load_adapter` calls) written into the four `peft.mapping` tables, with the same
   uniqueness checks `register_peft_method` makes. If a future PEFT adds `PeftType.MIST`, we register
   through the public function instead.
2. `BufferDict` (index storage that moves with `.to()` and is saved in the state dict) lives in the
   private module `peft.tuners._buffer_dict`.
3. `PeftModel.save_pretrained` writes files in place, so an interrupted save can leave new weights
   beside an old config; and `PeftModel.push_to_hub` (inherited from transformers) replaces PEFT's
   model card with a `library_name: transformers` one. For MIST adapters only, we wrap both: saves go
   through a temporary folder and are moved into place config-last (a folder without
   `adapter_config.json` does not load), the card gets MIST's facts, and `push_to_hub` uploads exactly
   what `save_pretrained` wrote. Every other PEFT type takes the original code path untouched.
4. transformers 5 loads adapters in `PreTrainedModel.load_adapter` with its own weight loader, which
   bypasses PEFT's state-dict hooks (so a sparse checkpoint would be loaded undecoded). For MIST configs
   only, `load_adapter` injects the layers and loads through PEFT's `set_peft_model_state_dict`.
"""

from __future__ import annotations

import enum
import functools
import os
import shutil
import tempfile

from peft import PeftConfig, PeftModel, inject_adapter_in_model, load_peft_weights, set_peft_model_state_dict
from peft.tuners._buffer_dict import BufferDict  # noqa: F401  (re-exported for layer.py)
from peft.utils import PeftType, register_peft_method
from transformers.integrations.peft import PeftAdapterMixin

MIST_NAME = "mist"
MIST_PREFIX = "mist_"


class MistPeftType(str, enum.Enum):
    """PEFT type of MIST (a `str` enum: PEFT uses it as a dict key and transformers reads `.value`)."""

    MIST = "MIST"


def register(config_cls: type, model_cls: type) -> None:
    """Register MIST with PEFT (idempotent)."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    if PEFT_TYPE_TO_CONFIG_MAPPING.get("MIST") is config_cls:
        return
    if "MIST" in PeftType.__members__:  # upstream PEFT knows the name: use the public API
        register_peft_method(name=MIST_NAME, config_cls=config_cls, model_cls=model_cls, prefix=MIST_PREFIX)
        return
    key = MistPeftType.MIST
    if key in PEFT_TYPE_TO_CONFIG_MAPPING or key in PEFT_TYPE_TO_TUNER_MAPPING or key in PEFT_TYPE_TO_MIXED_MODEL_MAPPING:
        raise KeyError("Another PEFT method is already registered as 'MIST'.")
    if MIST_PREFIX in PEFT_TYPE_TO_PREFIX_MAPPING.values():
        raise KeyError(f"Another PEFT method already uses the prefix '{MIST_PREFIX}'.")
    if getattr(model_cls, "prefix", MIST_PREFIX) != MIST_PREFIX:
        raise ValueError(f"{model_cls.__name__}.prefix must be '{MIST_PREFIX}'.")
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[key] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = MIST_PREFIX


def is_mist_config(config: object) -> bool:
    return getattr(config, "peft_type", None) == MistPeftType.MIST


def _has_mist_adapter(model: PeftModel, adapters: list[str] | None) -> bool:
    names = adapters if adapters is not None else list(model.peft_config)
    return any(is_mist_config(model.peft_config.get(n)) for n in names)


def _move_into_place(tmp: str, target: str) -> None:
    """Move every file of `tmp` into `target`, each adapter's config last (it marks the adapter complete)."""
    for root, _, files in os.walk(tmp):
        dest = os.path.join(target, os.path.relpath(root, tmp))
        os.makedirs(dest, exist_ok=True)
        if "adapter_config.json" in files and os.path.exists(os.path.join(dest, "adapter_config.json")):
            os.remove(os.path.join(dest, "adapter_config.json"))  # the old adapter must stop loading first
        for name in sorted(files, key=lambda f: f == "adapter_config.json"):
            os.replace(os.path.join(root, name), os.path.join(dest, name))


_original_save_pretrained = PeftModel.save_pretrained
_original_push_to_hub = PeftModel.push_to_hub


@functools.wraps(_original_save_pretrained)
def _save_pretrained(self: PeftModel, save_directory: str, *args, **kwargs):
    selected = kwargs.get("selected_adapters")
    if not kwargs.get("is_main_process", True) or not _has_mist_adapter(self, selected):
        return _original_save_pretrained(self, save_directory, *args, **kwargs)
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    os.makedirs(save_directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mist-save-", dir=save_directory)
    try:
        card = os.path.join(save_directory, "README.md")
        if os.path.exists(card):
            shutil.copy2(card, os.path.join(tmp, "README.md"))
        _original_save_pretrained(self, tmp, *args, **kwargs)
        from .hub import add_mist_model_card

        add_mist_model_card(self, os.path.join(tmp, "README.md"))
        _move_into_place(tmp, save_directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.wraps(_original_push_to_hub)
def _push_to_hub(self: PeftModel, repo_id: str, *args, **kwargs):
    if not _has_mist_adapter(self, None):
        return _original_push_to_hub(self, repo_id, *args, **kwargs)
    from .hub import push_to_hub

    return push_to_hub(self, repo_id, *args, **kwargs)


_original_load_adapter = PeftAdapterMixin.load_adapter
_DOWNLOAD_KWARGS = ("token", "revision", "cache_dir", "local_files_only", "subfolder")


@functools.wraps(_original_load_adapter)
def _load_adapter(self, peft_model_id=None, adapter_name=None, peft_config=None, adapter_state_dict=None,
                  *args, **kwargs):
    config = peft_config
    if config is None and peft_model_id is not None:
        download = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
        try:
            config = PeftConfig.from_pretrained(str(peft_model_id), **download)
        except Exception:  # let transformers report its own, more specific error
            config = None
    if isinstance(config, dict) and config.get("peft_type") == MistPeftType.MIST.value:
        config = PeftConfig.from_peft_type(**config)
    if not is_mist_config(config):
        return _original_load_adapter(self, peft_model_id, adapter_name, peft_config, adapter_state_dict,
                                      *args, **kwargs)
    adapter_name = adapter_name or "default"
    if getattr(self, "_hf_peft_config_loaded", False) and adapter_name in self.peft_config:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    config.inference_mode = not kwargs.get("is_trainable", False)
    inject_adapter_in_model(config, self, adapter_name)
    self._hf_peft_config_loaded = True
    if adapter_state_dict is None:
        download = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
        adapter_state_dict = load_peft_weights(str(peft_model_id), **download)
    result = set_peft_model_state_dict(self, adapter_state_dict, adapter_name=adapter_name)
    if config.inference_mode:
        self.eval()
        for name, param in self.named_parameters():
            if f"{MIST_PREFIX}values.{adapter_name}" in name:
                param.requires_grad_(False)
    return result


def install_peft_model_wrappers() -> None:
    """Route MIST saves, uploads and transformers loads through MIST's paths (idempotent)."""
    PeftModel.save_pretrained = _save_pretrained
    PeftModel.push_to_hub = _push_to_hub
    PeftAdapterMixin.load_adapter = _load_adapter

