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

The wrappers of PEFT's and transformers' save/upload/load entry points are product logic and live in
`integration.py`; they use only public names.
"""

from __future__ import annotations

import enum

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners._buffer_dict import BufferDict  # noqa: F401  (re-exported for layer.py)
from peft.utils import PeftType, register_peft_method

from .names import MIST_NAME, MIST_PREFIX, MIST_TYPE


class MistPeftType(str, enum.Enum):
    """PEFT type of MIST (a `str` enum: PEFT uses it as a dict key and transformers reads `.value`)."""

    MIST = MIST_TYPE


def register(config_cls: type, model_cls: type) -> None:
    """Register MIST with PEFT (idempotent)."""
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(MIST_TYPE) is config_cls:
        return
    if MIST_TYPE in PeftType.__members__:  # upstream PEFT knows the name: use the public API
        register_peft_method(name=MIST_NAME, config_cls=config_cls, model_cls=model_cls, prefix=MIST_PREFIX)
        return
    key = MistPeftType.MIST
    if key in PEFT_TYPE_TO_CONFIG_MAPPING or key in PEFT_TYPE_TO_TUNER_MAPPING or key in PEFT_TYPE_TO_MIXED_MODEL_MAPPING:
        raise KeyError(f"Another PEFT method is already registered as '{MIST_TYPE}'.")
    if MIST_PREFIX in PEFT_TYPE_TO_PREFIX_MAPPING.values():
        raise KeyError(f"Another PEFT method already uses the prefix '{MIST_PREFIX}'.")
    if getattr(model_cls, "prefix", MIST_PREFIX) != MIST_PREFIX:
        raise ValueError(f"{model_cls.__name__}.prefix must be '{MIST_PREFIX}'.")
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[key] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = MIST_PREFIX
