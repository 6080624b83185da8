"""Resolve a `--data`/`--dataset` argument into a `DatasetDict` with train/test splits.

Accepts a CLINC150 folder (holding `data_full.json`), a local csv/json/parquet file, or any `datasets`
id (needs network). The library never assumes where CLINC150 lives: callers pass the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from .assets import load_clinc150, load_text_table

TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def load_text_dataset(spec: str | os.PathLike, text_column: str = "text",
                      label_column: str = "label") -> datasets.DatasetDict:
    """Text classification data with columns `text` and `label` (int), splits `train` and `test`."""
    path = Path(spec)
    if path.is_dir() and (path / "data_full.json").exists():
        return load_clinc150(path)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return load_text_table(str(path), text_column=text_column, label_column=label_column)
    if path.exists():
        raise ValueError(f"Cannot read {spec}: expected a CLINC150 folder (with data_full.json) or a "
                         f"{'/'.join(TABLE_SUFFIXES)} file with '{text_column}' and '{label_column}' columns.")
    loaded = datasets.load_dataset(str(spec))
    if "test" not in loaded:
        loaded = loaded["train"].train_test_split(test_size=0.2, seed=0)
    renames = {text_column: "text", label_column: "label"}
    return datasets.DatasetDict({
        split: ds.rename_columns({k: v for k, v in renames.items() if k != v and k in ds.column_names})
        for split, ds in loaded.items() if split in ("train", "test", "validation")
    })
