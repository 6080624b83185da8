"""Quickstart: MIST on the packaged all-MiniLM-L6-v2, a few steps on real text, and what changed.

    python examples/quickstart.py [--data-dir ../shared/data/clinc150] [--steps 8]

Without CLINC150 it trains on a handful of built-in sentences. Everything runs offline.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

import mist_peft
from mist_peft.assets import load_clinc150, minilm_path
from mist_peft.encoders import text_collate
from mist_peft.selection import mist_layers
from mist_peft.training import MISTTrainingConfig, train_mist

SENTENCES = [("what is my account balance", 0), ("how much money do i have", 0), ("show my balance please", 0),
             ("book a table for two tonight", 1), ("reserve a restaurant for dinner", 1), ("get me a table at 8", 1),
             ("what's the weather tomorrow", 2), ("will it rain today", 2), ("is it sunny outside", 2)] * 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"))
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    torch.manual_seed(0)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if (Path(args.data_dir) / "data_full.json").exists():
        rows = load_clinc150(args.data_dir)["train"].filter(lambda r: r["label"] < 10).shuffle(seed=0).select(range(320))
        print(f"training on {len(rows)} CLINC150 utterances of 10 intents")
    else:
        rows = [{"text": t, "label": y} for t, y in SENTENCES]
        print(f"CLINC150 not found at {args.data_dir}; training on {len(rows)} built-in sentences")
    loader = DataLoader(rows, batch_size=16, shuffle=True, collate_fn=text_collate(tokenizer, 32))

    # 1. Wrap: 5% of every Linear weight (MI-Fisher selection fills the placeholders from data).
    model = get_peft_model(AutoModel.from_pretrained(path),
                           mist_peft.MISTConfig(target_modules="all-linear", exclude_modules=["pooler.dense"]))
    # 2. Select + tune with the MI loss under 90% gradient dropout.
    result = train_mist(model, loader, config=MISTTrainingConfig(max_steps=args.steps, max_score_batches=4))
    model.print_trainable_parameters()
    history = result["history"]
    print(f"MI loss: first step {history[0]['mi_loss']:.3f}, last step {history[-1]['mi_loss']:.3f}; "
          f"share of selected entries with a gradient per step: {history[-1]['kept_share']:.3f}")

    # 3. What changed: only selected entries, at most 5% of each weight.
    layers = mist_layers(model)
    selected = sum(m.mist_values["default"].numel() for m in layers.values())
    changed = sum(int((m.mist_values["default"] != 0).sum()) for m in layers.values())
    targeted = sum(m.get_base_layer().weight.numel() for m in layers.values())
    print(f"{len(layers)} weights targeted ({targeted:,} entries): {selected:,} selected, {changed:,} changed "
          f"({100 * changed / targeted:.2f}% of the targeted weights)")

    # 4. Save (sparse deltas only), reload exactly, merge.
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        size = (Path(out) / "adapter_model.safetensors").stat().st_size
        print(f"adapter file: {size:,} bytes = {size / targeted:.3f} bytes per targeted weight")
        batch = next(iter(loader))
        batch.pop("labels")
        model.eval()
        reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(path), out).eval()
        with torch.no_grad():
            same = torch.equal(model(**batch).last_hidden_state, reloaded(**batch).last_hidden_state)
            merged = reloaded.merge_and_unload()
            diff = (merged(**batch).last_hidden_state - model(**batch).last_hidden_state).abs().max().item()
        print(f"reloaded output identical: {same}; merged vs unmerged max |diff|: {diff:.2e}")


if __name__ == "__main__":
    main()
