"""MIST's routes through PEFT's and transformers' save, upload and load entry points.

Each wrapper acts for MIST adapters only; every other PEFT type takes the original code path untouched.

- `PeftModel.save_pretrained` writes files in place, so an interrupted save can leave new weights beside an
  old config. For MIST, files go to a temporary folder and are moved into place config-last (a folder
  without `adapter_config.json` does not load), and the model card gets MIST's facts.
- `PeftModel.push_to_hub` (inherited from transformers) replaces PEFT's model card with a
  `library_name: transformers` one; for MIST it uploads exactly what `save_pretrained` writes (`hub.py`).
- transformers 5 loads adapters in `PreTrainedModel.load_adapter` with its own weight loader, which
  bypasses PEFT's state-dict hooks and would read the varint index stream as plain indices. For MIST
  configs, `load_adapter` resolves the files with every option transformers takes, injects the layers and
  loads through PEFT's `set_peft_model_state_dict`, which decodes and checks the sparse checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import fields
from typing import Any

from peft import PeftConfig, PeftModel, inject_adapter_in_model, load_peft_weights, set_peft_model_state_dict
from transformers.integrations.peft import PeftAdapterMixin
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import find_adapter_config_file
from transformers.utils.hub import DownloadKwargs, resolve_revision
from transformers.utils.loading_report import LoadStateDictInfo

from . import hub
from .model import loading_checkpoint
from .names import MIST_PREFIX, MIST_TYPE, is_mist_config


def _has_mist_adapter(model: PeftModel, adapters: list[str] | None) -> bool:
    names = adapters if adapters is not None else list(model.peft_config)
    return any(is_mist_config(model.peft_config.get(n)) for n in names)


# ------------------------------------------------------------------------------------------ save_pretrained
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
_original_load_adapter = PeftAdapterMixin.load_adapter


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
        hub.add_mist_model_card(self, os.path.join(tmp, "README.md"))
        _move_into_place(tmp, save_directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.wraps(_original_push_to_hub)
def _push_to_hub(self: PeftModel, repo_id: str, *args, **kwargs):
    if not _has_mist_adapter(self, None):
        return _original_push_to_hub(self, repo_id, *args, **kwargs)
    return hub.push_to_hub(self, repo_id, *args, **kwargs)


# ------------------------------------------------------------------------------ transformers' load_adapter
_DOWNLOAD_KEYS = tuple(DownloadKwargs.__annotations__)  # cache_dir, token, revision, subfolder, ...
_LOAD_CONFIG_KEYS = {f.name for f in fields(LoadStateDictConfig)}


def _download_kwargs(load_config: Any, local_files_only: bool, adapter_kwargs: dict | None,
                     kwargs: dict) -> dict[str, Any]:
    """Where the adapter's files come from, merged the way transformers merges them (adapter_kwargs win).

    Transformers' own `load_adapter` only takes download options through `load_config` and `adapter_kwargs`;
    top-level `token=`, `revision=`, `subfolder=`, `local_files_only=True` are honoured here too."""
    unknown = set(kwargs) - _LOAD_CONFIG_KEYS - set(_DOWNLOAD_KEYS)
    if unknown:
        raise TypeError(f"load_adapter() got unexpected keyword arguments {sorted(unknown)}; it takes the fields of "
                        "transformers' LoadStateDictConfig and the download options "
                        f"{list(_DOWNLOAD_KEYS)} (also inside adapter_kwargs).")
    download = dict(getattr(load_config, "download_kwargs", None) or {})
    download.update(kwargs.get("download_kwargs") or {})
    download.update({k: kwargs[k] for k in _DOWNLOAD_KEYS if k in kwargs})
    if local_files_only:
        download["local_files_only"] = True
    download.update(adapter_kwargs or {})
    return {k: v for k, v in download.items() if v is not None}


def _mist_config_of(peft_model_id: str | None, peft_config: Any, download: dict) -> PeftConfig | None:
    """The adapter's config when it is MIST, else None. Errors reading a MIST config are raised, not hidden."""
    if isinstance(peft_config, dict) and peft_config.get("peft_type") == MIST_TYPE:
        return PeftConfig.from_peft_type(**peft_config)
    if peft_config is not None:
        return peft_config if is_mist_config(peft_config) else None
    if peft_model_id is None:
        return None
    config_file = find_adapter_config_file(str(peft_model_id), **download)
    if config_file is None:
        return None  # not an adapter: transformers reports that with its own message
    with open(config_file, encoding="utf-8") as f:
        if json.load(f).get("peft_type") != MIST_TYPE:
            return None
    return PeftConfig.from_pretrained(str(peft_model_id), **download)


@functools.wraps(_original_load_adapter)
def _load_adapter(self, peft_model_id: str | None = None, adapter_name: str | None = None,
                  peft_config: Any = None, adapter_state_dict: dict | None = None, low_cpu_mem_usage: bool = False,
                  is_trainable: bool = False, hotswap: bool | str = "auto", local_files_only: bool = False,
                  adapter_kwargs: dict | None = None, load_config: Any = None, **kwargs):
    download = _download_kwargs(load_config, local_files_only, adapter_kwargs, kwargs)
    peft_model_id = peft_model_id or getattr(load_config, "pretrained_model_name_or_path", None)
    if peft_model_id is not None and peft_config is None:
        # One revision for the config and the weights, as transformers does.
        download["revision"] = resolve_revision(
            str(peft_model_id), download.get("revision"), token=download.get("token"),
            local_files_only=bool(download.get("local_files_only", False)), cache_dir=download.get("cache_dir"))
        download = {k: v for k, v in download.items() if v is not None}
    config = _mist_config_of(peft_model_id, peft_config, download)
    if config is None:
        return _original_load_adapter(
            self, peft_model_id, adapter_name, peft_config, adapter_state_dict, low_cpu_mem_usage=low_cpu_mem_usage,
            is_trainable=is_trainable, hotswap=hotswap, local_files_only=local_files_only,
            adapter_kwargs=adapter_kwargs, load_config=load_config, **kwargs)
    if hotswap is True:
        raise ValueError("Hotswapping is supported for LoRA only; load a MIST adapter with hotswap=False.")
    adapter_name = adapter_name or "default"
    if getattr(self, "_hf_peft_config_loaded", False) and adapter_name in self.peft_config:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    if adapter_state_dict is None and peft_model_id is None:
        raise ValueError("Pass `peft_model_id` (a folder or Hub id), or `peft_config` with `adapter_state_dict`.")
    config.inference_mode = not is_trainable
    if adapter_state_dict is None:
        adapter_state_dict = load_peft_weights(str(peft_model_id), device="cpu", **download)
    with loading_checkpoint():
        inject_adapter_in_model(config, self, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    self._hf_peft_config_loaded = True
    result = set_peft_model_state_dict(self, adapter_state_dict, adapter_name=adapter_name,
                                       low_cpu_mem_usage=low_cpu_mem_usage)
    if config.inference_mode:
        self.eval()
        for name, param in self.named_parameters():
            if f"{MIST_PREFIX}values.{adapter_name}" in name:
                param.requires_grad_(False)
    return LoadStateDictInfo(missing_keys={k for k in result.missing_keys if MIST_PREFIX in k},
                             unexpected_keys=set(result.unexpected_keys), mismatched_keys=set(), error_msgs=[],
                             conversion_errors={}, skipped_pp_keys=set())


def _while_loading(method):
    """Run a PEFT loading entry point inside `loading_checkpoint()`: PEFT gives a tuner no sign that a
    checkpoint is about to fill it, and MIST must not select entries the checkpoint then replaces. It only sets
    a flag that MIST reads, so other PEFT types are unaffected."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with loading_checkpoint():
            return method(*args, **kwargs)

    wrapper._mist_loading = True
    return wrapper


def install() -> None:
    """Route MIST saves, uploads and loads through MIST's paths (idempotent)."""
    PeftModel.save_pretrained = _save_pretrained
    PeftModel.push_to_hub = _push_to_hub
    PeftAdapterMixin.load_adapter = _load_adapter
    if not getattr(PeftModel.load_adapter, "_mist_loading", False):
        PeftModel.load_adapter = _while_loading(PeftModel.load_adapter)
        PeftModel.from_pretrained = classmethod(_while_loading(PeftModel.from_pretrained.__func__))
