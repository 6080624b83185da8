"""Tests for mist_peft.views: the image augmentation and the view strategies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mist_peft.views import DropoutViews, FunctionViews, ImageViews, augment_images, default_views

IDENTITY_CROP = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}


def _images(b: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_shape_dtype_device_kept() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = _images().to(dtype)
        y = augment_images(x, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert torch.isfinite(y.float()).all()
    gray_in = _images(c=1, h=12, w=20)
    assert augment_images(gray_in).shape == (4, 1, 12, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_same_generator_seed() -> None:
    x = _images(b=8)
    cpu = augment_images(x, torch.Generator().manual_seed(3))
    gpu = augment_images(x.cuda(), torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda" and gpu.dtype == x.dtype
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
    views = ImageViews(torch.Generator().manual_seed(3))({"pixel_values": x.cuda()})
    assert views["pixel_values"].shape == (16, 3, 16, 16) and views["pixel_values"].is_cuda


def test_reproducible_with_seeded_generator_and_differs_across_seeds() -> None:
    x = _images(b=8)
    a = augment_images(x, torch.Generator().manual_seed(123))
    b = augment_images(x, torch.Generator().manual_seed(123))
    c = augment_images(x, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)
    # global RNG path is reproducible through torch.manual_seed
    torch.manual_seed(7)
    d = augment_images(x)
    torch.manual_seed(7)
    assert torch.equal(d, augment_images(x))


def test_identity_when_nothing_applies() -> None:
    x = _images()
    y = augment_images(x, flip_p=0.0, gray_p=0.0, **IDENTITY_CROP)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_exact_horizontal_flip() -> None:
    x = _images()
    y = augment_images(x, torch.Generator().manual_seed(0), flip_p=1.0, gray_p=0.0, **IDENTITY_CROP)
    torch.testing.assert_close(y, x.flip(-1), atol=1e-5, rtol=0)
    # non-square image: a full-area crop needs the image's own aspect ratio (pixel w/h = 20/12)
    x = _images(h=12, w=20)
    y = augment_images(x, flip_p=1.0, gray_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(20 / 12, 20 / 12))
    torch.testing.assert_close(y, x.flip(-1), atol=1e-5, rtol=0)


def test_grayscale() -> None:
    x = _images()
    y = augment_images(x, flip_p=0.0, gray_p=1.0, **IDENTITY_CROP)
    torch.testing.assert_close(y[:, 0], y[:, 1], atol=0, rtol=0)
    torch.testing.assert_close(y[:, 1], y[:, 2], atol=0, rtol=0)
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(y[:, 0], expected, atol=1e-5, rtol=0)
    # single-channel images: grayscale is a no-op
    g = _images(c=1)
    torch.testing.assert_close(augment_images(g, flip_p=0.0, gray_p=1.0, **IDENTITY_CROP), g, atol=1e-5, rtol=0)


def test_grayscale_probability_is_per_sample() -> None:
    x = _images(b=64)
    y = augment_images(x, torch.Generator().manual_seed(5), flip_p=0.0, gray_p=0.5, **IDENTITY_CROP)
    is_gray = ((y[:, 0] - y[:, 1]).abs().amax(dim=(1, 2)) < 1e-6) & ((y[:, 1] - y[:, 2]).abs().amax(dim=(1, 2)) < 1e-6)
    assert 10 < int(is_gray.sum()) < 54  # both outcomes occur; per sample, not per batch


def test_crop_zooms_in() -> None:
    # A half-area crop of a horizontal ramp covers a narrower range of values than the full image.
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32).contiguous()
    y = augment_images(ramp, torch.Generator().manual_seed(0), flip_p=0.0, gray_p=0.0, crop_scale=(0.25, 0.25),
                       crop_ratio=(1.0, 1.0))
    spans = y[:, 0, 0, :].amax(dim=1) - y[:, 0, 0, :].amin(dim=1)
    # crop side = half of the image -> span about 0.5 of the ramp
    torch.testing.assert_close(spans, torch.full((4,), 0.5), atol=0.05, rtol=0)


def test_augment_invalid_arguments() -> None:
    x = _images()
    with pytest.raises(ValueError, match="flip_p"):
        augment_images(x, flip_p=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        augment_images(x, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="crop_ratio"):
        augment_images(x, crop_ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"4-D"):
        augment_images(x[0])
    with pytest.raises(ValueError, match="floating"):
        augment_images((x * 255).to(torch.uint8))


def test_image_views() -> None:
    x = _images(b=3)
    labels = torch.tensor([1, 2, 1])
    views = ImageViews(torch.Generator().manual_seed(9), gray_p=0.0)
    out = views({"pixel_values": x, "labels": labels, "note": "kept"})
    assert out["pixel_values"].shape == (6, 3, 16, 16)
    assert torch.equal(out["pixel_values"][:3], x)
    expected = augment_images(x, torch.Generator().manual_seed(9), gray_p=0.0)
    assert torch.equal(out["pixel_values"][3:], expected)
    assert torch.equal(out["labels"], labels) and out["note"] == "kept"
    with pytest.raises(ValueError, match="unknown augmentation option"):
        ImageViews(flip=0.5)
    with pytest.raises(ValueError, match="gray_p"):
        ImageViews(gray_p=-1)
    with pytest.raises(ValueError, match="pixel_values"):
        views({"input_ids": torch.zeros(2, 3)})


def test_dropout_views_double_rows_and_keep_labels() -> None:
    batch = {
        "input_ids": torch.tensor([[101, 7, 102], [101, 8, 102]]),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.tensor([4, 5]),
    }
    out = DropoutViews()(batch)
    assert out["input_ids"].shape == (4, 3) and out["attention_mask"].shape == (4, 3)
    assert torch.equal(out["input_ids"], torch.tensor([[101, 7, 102], [101, 8, 102]] * 2))
    assert torch.equal(out["labels"], torch.tensor([4, 5]))


def test_dropout_views_independent_noise_and_checks() -> None:
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5))
    views = DropoutViews(model)
    batch = {"x": torch.ones(2, 3)}
    torch.manual_seed(0)
    out = model(views(batch)["x"])
    assert not torch.allclose(out[:2], out[2:])  # same inputs, different dropout masks per row
    model.eval()
    with pytest.raises(RuntimeError, match="eval mode.*model.train"):
        views(batch)
    with pytest.raises(RuntimeError, match="no active nn.Dropout"):
        DropoutViews(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0)))(batch)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        DropoutViews()({"a": torch.ones(2, 3), "b": torch.ones(3, 3)})


def test_function_views() -> None:
    def fn(batch: dict) -> tuple[dict, dict]:
        x = batch["x"]
        return {"x": x, "labels": batch["labels"], "meta": "v1"}, {"x": -x, "labels": batch["labels"]}

    batch = {"x": torch.arange(6.0).view(3, 2), "labels": torch.tensor([0, 0, 1])}
    out = FunctionViews(fn)(batch)
    assert torch.equal(out["x"], torch.cat([batch["x"], -batch["x"]]))
    assert torch.equal(out["labels"], torch.tensor([0, 0, 1])) and out["meta"] == "v1"
    with pytest.raises(ValueError, match="pair"):
        FunctionViews(lambda b: b)(batch)
    with pytest.raises(ValueError, match=r"view 1 has shape \(3, 2\), view 2 has \(2, 2\)"):
        FunctionViews(lambda b: ({"x": b["x"]}, {"x": b["x"][:2]}))(batch)
    with pytest.raises(ValueError, match="callable"):
        FunctionViews(3)  # type: ignore[arg-type]


def test_default_views_dispatch() -> None:
    assert isinstance(default_views({"pixel_values": _images()}), ImageViews)
    assert isinstance(default_views({"input_ids": torch.zeros(2, 3, dtype=torch.long)}), DropoutViews)
    with pytest.raises(ValueError, match=r"FunctionViews.*\(view1, view2\)"):
        default_views({"features": torch.zeros(2, 3)})


def test_default_text_views_warn_when_the_model_has_no_active_dropout() -> None:
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    no_dropout = nn.Sequential(nn.Embedding(4, 3), nn.Dropout(0.0)).train()
    views = default_views(batch, no_dropout)
    with pytest.warns(UserWarning, match="views would be identical.*FunctionViews"):
        out = views(batch)
    assert torch.equal(out["input_ids"][:2], out["input_ids"][2:])
    with_dropout = nn.Sequential(nn.Embedding(4, 3), nn.Dropout(0.1)).train()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default_views(batch, with_dropout)(batch)  # active dropout: no warning
    with pytest.raises(ValueError, match="on_identical"):
        DropoutViews(on_identical="ignore")


def test_grayscale_is_computed_on_unnormalised_images() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raw = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    gray = (raw * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    out = augment_images((raw - m) / s, flip_p=0.0, gray_p=1.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                         mean=mean, std=std)
    torch.testing.assert_close(out, (gray - m) / s, atol=1e-5, rtol=0)
    views = ImageViews(view1_crop_scale=(0.05, 1.0), generator=torch.Generator().manual_seed(1))
    both = views({"pixel_values": raw, "labels": torch.tensor([0, 1])})["pixel_values"]
    assert both.shape == (4, 3, 8, 8) and not torch.equal(both[:2], raw)  # view 1 itself augmented
