"""Choosing the entries: top-`density` of a score, per tensor or globally, installed into the adapters.

Scores are float32 tensors shaped like the base weights: |W| ("magnitude"), seeded uniform noise
("random"), or accumulated squared MI-loss gradients ("mi_fisher", `scoring.py`); a negative score marks
an entry that may never be chosen. The global top-k finds its threshold by bisection on the bit patterns
of the non-negative floats (which order like integers), so it never concatenates the scores.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch
from torch import nn

from .config import MISTConfig
from .layer import MISTLayer, count_for


def mist_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, MISTLayer]:
    """MIST layers of a model by module name (optionally only those holding `adapter_name`)."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, MISTLayer) and (adapter_name is None or adapter_name in m.mist_values)
    }


def top_entries(scores: Mapping[str, torch.Tensor], density: float, granularity: str) -> dict[str, torch.Tensor]:
    """Sorted flat indices of the top-`density` entries of each score tensor, or of all of them together."""
    if granularity == "per_tensor":
        return {
            name: torch.sort(torch.topk(s.reshape(-1), count_for(s.numel(), density), sorted=False).indices).values
            for name, s in scores.items()
        }
    if granularity != "global":
        raise ValueError(f"granularity={granularity!r} is invalid: choose 'per_tensor' or 'global'.")
    flat = {name: s.reshape(-1).float() for name, s in scores.items()}
    if any(not bool(torch.isfinite(s).all()) for s in flat.values()):
        raise ValueError("scores must be finite for a global selection")
    total = sum(s.numel() for s in flat.values())
    k = count_for(total, density)

    def count_at_least(bits: int) -> int:
        return sum(int((s.view(torch.int32) >= bits).sum()) for s in flat.values())

    lo, hi = 0, 2**31  # non-negative floats order like their int32 bit patterns
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_at_least(mid) >= k else (lo, mid)
    ties_needed = k - sum(int((s.view(torch.int32) > lo).sum()) for s in flat.values())
    out = {}
    for name, s in flat.items():
        bits = s.view(torch.int32)
        ties = torch.nonzero(bits == lo).reshape(-1)[: max(ties_needed, 0)]
        ties_needed -= ties.numel()
        out[name] = torch.sort(torch.cat([torch.nonzero(bits > lo).reshape(-1), ties])).values
    return out


def is_selected(model: nn.Module, adapter_name: str) -> bool:
    """True once every layer of the adapter has its entries (recorded explicitly; survives save/load)."""
    layers = mist_layers(model, adapter_name)
    return bool(layers) and all(m.mist_selected[adapter_name] for m in layers.values())


def install_selection(model: nn.Module, adapter_name: str, indices: Mapping[str, torch.Tensor]) -> None:
    """Put selected indices into the adapter's layers (values start at zero, so the output is unchanged)."""
    layers = mist_layers(model, adapter_name)
    unknown = set(indices) - set(layers)
    if unknown:
        raise ValueError(f"no MIST layer named {sorted(unknown)[:3]} holds adapter '{adapter_name}'")
    for name, idx in indices.items():
        layers[name].set_indices(adapter_name, idx)


def layer_seed(seed: int, name: str) -> int:
    """Seed for one layer's random draws that is the same on every process and in every run."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def data_free_scores(layers: Mapping[str, MISTLayer], selection: str, seed: int) -> dict[str, torch.Tensor]:
    scores = {}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight.detach()
        if selection == "magnitude":
            scores[name] = weight.abs().float()
        elif selection == "random":
            gen = torch.Generator().manual_seed(layer_seed(seed, name))
            scores[name] = torch.rand(weight.shape, generator=gen).to(weight.device)
        else:
            raise ValueError(f"selection={selection!r} is not data-free")
    return scores


def select_data_free(model: nn.Module, adapter_name: str, config: MISTConfig) -> dict[str, torch.Tensor]:
    """Select by |W| or at random, as configured, and install the result."""
    layers = mist_layers(model, adapter_name)
    if config.granularity == "per_tensor":  # one score tensor alive at a time
        chosen = {}
        for name, layer in layers.items():
            score = data_free_scores({name: layer}, config.selection, config.seed)
            chosen.update(top_entries(score, config.density, "per_tensor"))
    else:
        chosen = top_entries(data_free_scores(layers, config.selection, config.seed), config.density, "global")
    install_selection(model, adapter_name, chosen)
    return chosen
