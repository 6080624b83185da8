"""Prompt or prefix adapters on top of MIST: build, save, load and resume both together.

PEFT keeps one adapter family per `PeftModel`, so stacking nests them (PEFT_NOTES §5, path 2): the
outer prompt-learning `PeftModel` wraps the inner MIST `PeftModel`. Two recipes:
(a) `merge_then_prompt`: fold the MIST deltas into the base, then train only a prompt adapter;
(b) `stack_prompt`: keep MIST unmerged and train both. The prompt wrapper freezes every inner
    parameter, so MIST values are made trainable again here. Saving writes two PEFT folders,
    `<dir>/mist` and `<dir>/prompt`.
"""

from __future__ import annotations

import os

from peft import PeftConfig, PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict
from torch import nn

from .layer import MISTLayer

MIST_SUBDIR = "mist"
PROMPT_SUBDIR = "prompt"


def merge_then_prompt(mist_model: PeftModel, prompt_config: PeftConfig) -> PeftModel:
    """Merge MIST into the base weights and put a fresh prompt adapter on the merged model."""
    return get_peft_model(mist_model.merge_and_unload(), prompt_config)


def _set_mist_trainable(model: nn.Module, trainable: bool = True) -> None:
    for layer in model.modules():
        if isinstance(layer, MISTLayer):
            for kind in layer.adapter_layer_names:  # the sparse weight deltas and the bias/norm deltas
                deltas = getattr(layer, kind, {})
                for name in layer.active_adapters:
                    if name in deltas and deltas[name].numel():  # an empty tensor stays frozen (never a grad)
                        deltas[name].requires_grad_(trainable)


def stack_prompt(mist_model: PeftModel, prompt_config: PeftConfig, train_mist: bool = True) -> PeftModel:
    """Wrap an unmerged MIST model with a prompt/prefix adapter; both train when `train_mist`."""
    if not getattr(prompt_config, "is_prompt_learning", False):
        raise ValueError(f"stack_prompt needs a prompt-learning config (PromptTuning, PrefixTuning, ...), "
                         f"got {type(prompt_config).__name__}.")
    outer = get_peft_model(mist_model, prompt_config)
    _set_mist_trainable(outer, train_mist)
    return outer


def mist_part(stacked: PeftModel) -> PeftModel:
    """The inner MIST `PeftModel` of a stacked model."""
    inner = stacked.base_model
    if not isinstance(inner, PeftModel):
        raise ValueError("This model is not a prompt adapter stacked on a MIST PeftModel (see stack_prompt).")
    return inner


def save_stacked(stacked: PeftModel, save_directory: str) -> None:
    """Save both adapters: `<dir>/mist` (sparse deltas) and `<dir>/prompt` (prompt embeddings)."""
    mist_part(stacked).save_pretrained(os.path.join(save_directory, MIST_SUBDIR))
    stacked.save_pretrained(os.path.join(save_directory, PROMPT_SUBDIR))


def load_stacked(base_model: nn.Module, save_directory: str, is_trainable: bool = False) -> PeftModel:
    """Load what `save_stacked` wrote onto a fresh base model; `is_trainable=True` resumes training of both.

    PEFT refuses `is_trainable=True` for prompt adapters, so the trainable path rebuilds the prompt
    adapter from its config and loads its weights explicitly.
    """
    inner = PeftModel.from_pretrained(base_model, os.path.join(save_directory, MIST_SUBDIR), is_trainable=is_trainable)
    prompt_dir = os.path.join(save_directory, PROMPT_SUBDIR)
    if not is_trainable:
        return PeftModel.from_pretrained(inner, prompt_dir)
    config = PeftConfig.from_pretrained(prompt_dir)
    config.inference_mode = False
    outer = get_peft_model(inner, config)
    set_peft_model_state_dict(outer, load_peft_weights(prompt_dir))
    _set_mist_trainable(outer, True)
    return outer
