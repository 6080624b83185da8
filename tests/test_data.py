"""Resolving `--data`/`--dataset` arguments: local tables and image folders become train/test DatasetDicts."""


import numpy as np
import pytest

from mist_peft.cli import build_parser, load_data
from mist_peft.data import load_text_dataset


def test_csv_table_with_string_labels(tmp_path):
    path = tmp_path / "intents.csv"
    rows = ["text,label"] + [f"utterance number {i},{'greet' if i % 2 else 'bye'}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    data = load_text_dataset(path)
    assert set(data) == {"train", "test"}
    assert data["train"].num_rows + data["test"].num_rows == 40
    assert set(data["train"]["label"]) == {0, 1}
    assert not set(data["train"]["text"]) & set(data["test"]["text"])


def test_unreadable_path_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="CLINC150 folder"):
        load_text_dataset(tmp_path / "notes.txt")


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    args = build_parser().parse_args(["continual", "--dataset", str(tmp_path / "imgs")])
    data, kind = load_data(args)
    assert kind == "image"
    assert data["train"].num_rows + data["test"].num_rows == 20
    assert sorted(set(data["train"]["label"])) == [0, 1]
