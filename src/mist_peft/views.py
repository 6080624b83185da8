"""Second-view construction for the MI loss (MIST_SPEC.md §3.2).

The MI loss needs two views of each of the B samples in a batch. mist-peft concatenates both views into ONE batch
of 2B rows (view 1 rows first, then view 2 rows) and runs a single forward pass, which is cheaper than two passes
and, for text, gives every row its own independent dropout mask. Labels stay the B originals under ``"labels"``;
the loss repeats them (``ỹ_j = y_(j mod B)``).

Strategies are small callables ``strategy(batch) -> batch_of_2B_rows``:

- :class:`ImageViews`: ``pixel_values = cat([x, augment_images(x)])``, the reference's on-device augmentation of the
  already augmented view 1.
- :class:`DropoutViews`: every tensor duplicated, SimCSE-style; the two views differ only by dropout noise, so the
  encoder must be in train mode with dropout active.
- :class:`FunctionViews`: wraps a user function returning two views.

:func:`default_views` picks one from the batch's keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DropoutViews",
    "FunctionViews",
    "ImageViews",
    "ViewStrategy",
    "augment_images",
    "default_views",
]

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_AUGMENT_KEYS = frozenset({"flip_p", "gray_p", "crop_scale", "crop_ratio", "mean", "std"})


class ViewStrategy(Protocol):
    """Anything that maps a batch of B rows to a batch of 2B rows (view 1 rows, then view 2 rows)."""

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]: ...


def _check_augment_args(
    flip_p: float, gray_p: float, crop_scale: tuple[float, float], crop_ratio: tuple[float, float]
) -> None:
    for name, p in (("flip_p", flip_p), ("gray_p", gray_p)):
        if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"augment_images: {name} must be a probability in [0, 1], got {name}={p!r}")
    for name, rng in (("crop_scale", crop_scale), ("crop_ratio", crop_ratio)):
        ok = isinstance(rng, (tuple, list)) and len(rng) == 2
        if not ok or not (0.0 < float(rng[0]) <= float(rng[1]) and math.isfinite(float(rng[1]))):
            raise ValueError(f"augment_images: {name} must be a pair (lo, hi) with 0 < lo <= hi, got {name}={rng!r}")


def augment_images(
    pixel_values: Tensor,
    generator: torch.Generator | None = None,
    flip_p: float = 0.5,
    gray_p: float = 0.25,
    crop_scale: tuple[float, float] = (0.3, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Per-sample random flip, grayscale and resized crop of a ``[B, C, H, W]`` image batch, on its own device.

    Mirrors the reference's view-2 augmentation (§3.2), applied to the already-augmented view 1. Per sample:

    - horizontal flip with probability ``flip_p``;
    - grayscale with probability ``gray_p`` (``0.299 R + 0.587 G + 0.114 B`` copied to the 3 channels; a no-op
      unless ``C == 3``);
    - a resized crop covering a fraction ``s ~ U(crop_scale)`` of the image area with pixel aspect ratio
      ``w/h = r``, ``log r ~ U(log crop_ratio)``, resampled (bilinear) back to ``H x W``. The crop centre is
      uniform over positions that keep the crop inside the image; a crop side longer than the image is centred,
      and the part outside is filled by reflection padding.

    With ``mean``/``std`` (the normalisation the inputs carry), grayscale is computed on the unnormalised image
    and normalised again, as the reference does on its [0, 1] inputs (spec §3.2); without them, on the values
    as given. Grayscale is a per-pixel linear map over channels, so it commutes with resampling; it is applied first and
    flip + crop are folded into one affine grid, giving a single batched ``grid_sample`` call.
    ``align_corners=False`` makes the identity / flip grids land exactly on pixel centres.

    Random numbers (6 per sample) are drawn on ``generator``'s device (CPU when ``generator`` is None, from the
    global RNG), so a seeded generator gives the same result on any device. Not meant to be differentiated.
    """
    if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
        raise ValueError(f"augment_images: pixel_values must be a 4-D tensor [B, C, H, W], got {shape}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"augment_images: pixel_values must be floating point, got dtype {pixel_values.dtype}; "
            "convert images to float first"
        )
    _check_augment_args(flip_p, gray_p, crop_scale, crop_ratio)
    b, c, h, w = pixel_values.shape
    if b == 0:
        return pixel_values.clone()

    device = pixel_values.device
    work_dtype = pixel_values.dtype if pixel_values.dtype in (torch.float32, torch.float64) else torch.float32
    x = pixel_values.detach().to(work_dtype)

    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(b, 6, generator=generator, device=draw_device, dtype=torch.float64).to(device)
    flip = u[:, 0] < flip_p
    gray = u[:, 1] < gray_p
    scale = crop_scale[0] + (crop_scale[1] - crop_scale[0]) * u[:, 2]
    log_lo, log_hi = math.log(crop_ratio[0]), math.log(crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 3])

    if c == 3 and bool(gray.any()):
        weights = torch.tensor(_GRAY_WEIGHTS, dtype=work_dtype, device=device).view(1, 3, 1, 1)
        if mean is not None and std is not None:
            m = torch.tensor(mean, dtype=work_dtype, device=device).view(1, 3, 1, 1)
            sd = torch.tensor(std, dtype=work_dtype, device=device).view(1, 3, 1, 1)
            g = ((((x * sd + m) * weights).sum(dim=1, keepdim=True)) - m) / sd
        else:
            g = (x * weights).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        x = torch.where(gray.view(b, 1, 1, 1), g, x)

    # Crop size as a fraction of each side: area fw*fh = scale, pixel aspect (fw*W)/(fh*H) = ratio.
    fw = torch.sqrt(scale * ratio * h / w)
    fh = torch.sqrt(scale * w / (ratio * h))
    # Output coordinates in [-1, 1] map to input coordinates centre + half-extent * coord (normalised units).
    cx = (2.0 * u[:, 4] - 1.0) * (1.0 - fw).clamp(min=0.0)
    cy = (2.0 * u[:, 5] - 1.0) * (1.0 - fh).clamp(min=0.0)
    sign = torch.where(flip, -1.0, 1.0).to(torch.float64)

    theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=device)
    theta[:, 0, 0] = sign * fw
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = fh
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(work_dtype), [b, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.to(pixel_values.dtype)


def _leading_rows(batch: Mapping[str, Any], where: str) -> None:
    """Check that every non-label tensor with a batch dimension agrees on B (catches mixed batches early)."""
    sizes = {k: v.shape[0] for k, v in batch.items() if k != "labels" and isinstance(v, Tensor) and v.dim() > 0}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: tensors in the batch disagree on the batch size: {sizes}")


def _duplicate(batch: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Stack every tensor with a batch dimension on itself (view 2 = copy of view 1); labels stay B rows."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "labels" or key in skip or not isinstance(value, Tensor) or value.dim() == 0:
            out[key] = value
        else:
            out[key] = torch.cat([value, value], dim=0)
    return out


class ImageViews:
    """View 2 = :func:`augment_images` of view 1; used for batches with ``pixel_values``.

    Other tensors with a batch dimension (e.g. a pixel mask) are duplicated; ``labels`` stays the B originals.

    Args:
        generator: optional ``torch.Generator`` for reproducible augmentations.
        view1_crop_scale: when given, view 1 is itself augmented first (flip and a random resized crop of this
            area scale, no grayscale), like the reference's train transform (scale (0.05, 1), spec §6.3); by
            default view 1 is the batch as given.
        **augment_kwargs: ``flip_p``, ``gray_p``, ``crop_scale``, ``crop_ratio``, ``mean``, ``std`` (see
            :func:`augment_images`; :func:`default_views` passes the ImageNet ``mean``/``std`` of
            :func:`mist_peft.encoders.image_collate`).
    """

    def __init__(self, generator: torch.Generator | None = None,
                 view1_crop_scale: tuple[float, float] | None = None, **augment_kwargs: Any) -> None:
        if view1_crop_scale is not None:
            _check_augment_args(0.5, 0.0, view1_crop_scale, (3 / 4, 4 / 3))
        self.view1_crop_scale = view1_crop_scale
        unknown = set(augment_kwargs) - _AUGMENT_KEYS
        if unknown:
            raise ValueError(
                f"ImageViews: unknown augmentation option(s) {sorted(unknown)}; valid options are {sorted(_AUGMENT_KEYS)}"
            )
        defaults: dict[str, Any] = {"flip_p": 0.5, "gray_p": 0.25, "crop_scale": (0.3, 1.0), "crop_ratio": (3 / 4, 4 / 3)}
        _check_augment_args(**{**defaults, **{k: v for k, v in augment_kwargs.items() if k in defaults}})
        self.generator = generator
        self.augment_kwargs = dict(augment_kwargs)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if "pixel_values" not in batch:
            raise ValueError(f"ImageViews: the batch has no 'pixel_values' (keys: {sorted(batch)})")
        _leading_rows(batch, "ImageViews")
        out = _duplicate(batch, skip=frozenset({"pixel_values"}))
        x = batch["pixel_values"]
        if self.view1_crop_scale is not None:
            x = augment_images(x, self.generator, gray_p=0.0, crop_scale=self.view1_crop_scale)
        out["pixel_values"] = torch.cat([x, augment_images(x, self.generator, **self.augment_kwargs)], dim=0)
        return out

    def __repr__(self) -> str:
        return f"ImageViews({self.augment_kwargs})"


def _active_dropout(model: nn.Module) -> bool:
    from torch.nn.modules.dropout import _DropoutNd

    return any(isinstance(m, _DropoutNd) and m.p > 0 and m.training for m in model.modules())


class DropoutViews:
    """Both views are the same inputs; they differ only by dropout noise (SimCSE-style), for text batches.

    Every tensor except ``labels`` is duplicated, so one forward of 2B rows draws an independent dropout mask per
    row. **Dropout must be active**: the encoder must be in ``train()`` mode and have dropout probability > 0,
    otherwise both views are identical, the pair term is uninformative and scores degenerate. Pass ``model`` to
    have this checked on every call (a ``RuntimeError`` is raised when no ``nn.Dropout`` with ``p > 0`` is active).
    Dropout done functionally (e.g. attention dropout inside SDPA) cannot be detected; nn.Dropout modules can.
    ``on_identical="warn"`` (what :func:`default_views` uses) warns once instead of raising.
    """

    def __init__(self, model: nn.Module | None = None, on_identical: str = "raise") -> None:
        if on_identical not in ("raise", "warn"):
            raise ValueError(f"DropoutViews: on_identical must be 'raise' or 'warn', got {on_identical!r}")
        self.model = model
        self.on_identical = on_identical
        self._warned = False

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.model is not None and not _active_dropout(self.model):
            state = "train" if self.model.training else "eval"
            message = (
                f"DropoutViews: the model is in {state} mode and has no active nn.Dropout with p > 0, so both "
                "views would be identical; call model.train() and make sure dropout > 0 (e.g. "
                "hidden_dropout_prob), or pass FunctionViews with an explicit augmentation"
            )
            if self.on_identical == "raise":
                raise RuntimeError(message)
            if not self._warned:
                import warnings

                warnings.warn(message + " (the MI loss's pair term carries no signal this way)", stacklevel=2)
                self._warned = True
        _leading_rows(batch, "DropoutViews")
        return _duplicate(batch)

    def __repr__(self) -> str:
        return "DropoutViews()"


class FunctionViews:
    """Wrap a user function ``fn(batch) -> (view1, view2)`` whose views each have B rows; they are concatenated.

    Tensors present in both views are concatenated along dim 0 (they must agree in every dimension but the first,
    and both views must have the same number of rows). Keys in only one view, and non-tensor values, are taken
    from view 1. ``labels`` is taken from the input batch (or view 1 if the batch has none) and stays B rows.
    """

    def __init__(self, fn: Callable[[Mapping[str, Any]], tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
        if not callable(fn):
            raise ValueError(f"FunctionViews: fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        result = self.fn(batch)
        if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(v, Mapping) for v in result)):
            raise ValueError(
                f"FunctionViews: fn must return a pair (batch_view1, batch_view2) of dicts, got {type(result).__name__}"
            )
        v1, v2 = result
        out: dict[str, Any] = {}
        for key, a in v1.items():
            if key == "labels":
                continue
            bval = v2.get(key)
            if isinstance(a, Tensor) and a.dim() > 0 and isinstance(bval, Tensor):
                if a.shape[0] != bval.shape[0] or a.shape[1:] != bval.shape[1:]:
                    raise ValueError(
                        f"FunctionViews: views disagree for {key!r}: view 1 has shape {tuple(a.shape)}, view 2 has "
                        f"{tuple(bval.shape)}; both views must have the same shape"
                    )
                out[key] = torch.cat([a, bval], dim=0)
            else:
                out[key] = a
        if "labels" in batch:
            out["labels"] = batch["labels"]
        elif "labels" in v1:
            out["labels"] = v1["labels"]
        return out

    def __repr__(self) -> str:
        return f"FunctionViews({getattr(self.fn, '__name__', repr(self.fn))})"


def default_views(batch: Mapping[str, Any], model: nn.Module | None = None) -> ViewStrategy:
    """Pick a view strategy from the batch: images → :class:`ImageViews`, token ids → :class:`DropoutViews`.

    Pass the ``model`` that will encode the views: for text, a model without active dropout then warns that
    both views are identical (and says what to do) instead of silently training on identical pairs."""
    if "pixel_values" in batch:
        from .assets import IMAGENET_MEAN, IMAGENET_STD

        return ImageViews(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if "input_ids" in batch:
        return DropoutViews(model, on_identical="warn")
    raise ValueError(
        f"default_views: cannot tell how to make a second view for a batch with keys {sorted(batch)} (neither "
        "'pixel_values' nor 'input_ids'); pass views=FunctionViews(fn) with fn(batch) -> (view1, view2)"
    )
