"""MIST's PEFT type name and parameter prefix, in a module that imports nothing, so any module can use them."""

MIST_TYPE = "MIST"  # PEFT type: `adapter_config.json`'s "peft_type", the key of PEFT's registration tables
MIST_NAME = "mist"  # the name PEFT's `register_peft_method` derives the type from
MIST_PREFIX = "mist_"  # prefix of every MIST parameter and buffer; transformers rebuilds it as type.lower() + "_"


def is_mist_config(config: object) -> bool:
    """True for a MIST adapter config (the enum member and the plain string compare equal)."""
    return getattr(config, "peft_type", None) == MIST_TYPE
