"""mist-peft: MIST (Mutual Information-guided Sparse Tuning) as a PEFT tuner.

Importing this package registers the PEFT type "MIST" (prefix `mist_`), so `get_peft_model`,
`PeftModel.from_pretrained`, `AutoPeftModel*` and transformers' `load_adapter` know it.
"""

from . import integration
from ._peft_compat import MistPeftType, register
from .config import MISTConfig
from .layer import MISTLayer
from .model import MISTModel
from .optim import attach_optimizer
from .selection import install_selection, mist_layers, top_entries

register(MISTConfig, MISTModel)
integration.install()

__version__ = "0.1.0"
__all__ = [
    "MISTConfig",
    "MISTLayer",
    "MISTModel",
    "MistPeftType",
    "attach_optimizer",
    "install_selection",
    "mist_layers",
    "top_entries",
]
