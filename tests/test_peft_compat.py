"""Fails loudly when a PEFT or transformers release changes the internals `_peft_compat.py` relies on."""

import inspect

import peft
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from transformers.integrations.peft import PeftAdapterMixin

import mist_peft
from mist_peft import MISTConfig, MISTModel, MistPeftType, _peft_compat


def test_peft_minor_series_is_the_one_the_internals_were_checked_against():
    assert peft.__version__.startswith("0.21."), "re-check _peft_compat.py against this PEFT release"


def test_registration_tables():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MIST"] is MISTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["MIST"] is MISTModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["MIST"] == "mist_"
    assert MistPeftType.MIST.value.lower() + "_" == MISTModel.prefix  # transformers rebuilds the prefix this way
    assert "MIST" not in peft.utils.PeftType.__members__ or PEFT_TYPE_TO_CONFIG_MAPPING["MIST"] is MISTConfig
    _peft_compat.register(MISTConfig, MISTModel)  # idempotent


def test_private_state_dict_hooks_have_the_expected_signatures():
    get = inspect.signature(BaseTuner._get_adapter_state_dict)
    assert list(get.parameters) == ["model", "config", "adapter_name", "state_dict", "unwanted_adapter_names"]
    remap = inspect.signature(BaseTuner._remap_adapter_state_dict_for_load)
    assert list(remap.parameters) == ["model", "config", "adapter_name", "state_dict"]
    from peft.tuners._buffer_dict import BufferDict

    assert BufferDict is _peft_compat.BufferDict


def test_wrapped_entry_points_are_ours_and_keep_the_originals_reachable():
    assert PeftModel.save_pretrained is _peft_compat._save_pretrained
    assert PeftModel.push_to_hub is _peft_compat._push_to_hub
    assert PeftAdapterMixin.load_adapter is _peft_compat._load_adapter
    assert "save_directory" in inspect.signature(_peft_compat._original_save_pretrained).parameters
    assert "repo_id" in inspect.signature(_peft_compat._original_push_to_hub).parameters
    params = inspect.signature(_peft_compat._original_load_adapter).parameters
    assert list(params)[:5] == ["self", "peft_model_id", "adapter_name", "peft_config", "adapter_state_dict"]
    import peft.peft_model

    assert hasattr(peft.peft_model, "safe_save_file"), "the interrupted-save test patches this name"
    assert mist_peft.attach_optimizer
