"""Which entries to tune? MI-Fisher vs magnitude vs random selection vs full fine-tuning, same MI loss and steps.

The packaged all-MiniLM-L6-v2 is tuned on CLINC150 (all 150 intents, a few utterances each) for the same
number of steps by each method, then its frozen features are read out two ways on the test split:
prototype accuracy (nearest class mean, cosine) and linear-probe accuracy (logistic regression).

    python benchmarks/selection.py --data-dir ../shared/data/clinc150 [--steps 60] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import datasets
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

from mist_peft.assets import load_clinc150, minilm_path
from mist_peft.cli import _subsample
from mist_peft.continual.hosts import SimpleCIL
from mist_peft.continual.runner import ContinualConfig, adapt_backbone
from mist_peft.encoders import FeatureEncoder, extract_features, text_collate
from mist_peft.training import default_accelerator

REPO = Path(__file__).resolve().parents[1]
METHODS = ("frozen", "mist", "mist-magnitude", "mist-random", "full", "lora")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "clinc150"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--train-per-class", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the sparse values and LoRA")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    data = load_clinc150(args.data_dir)
    path = minilm_path()
    collate = text_collate(AutoTokenizer.from_pretrained(path), 32)
    accelerator = default_accelerator()
    rows = {m: [] for m in args.methods.split(",")}
    for seed in map(int, args.seeds.split(",")):
        train = _subsample(data["train"], args.train_per_class, seed)
        test: datasets.Dataset = data["test"]
        for method in rows:
            torch.manual_seed(seed)
            start = time.perf_counter()
            backbone = AutoModel.from_pretrained(path).eval()
            config = ContinualConfig(steps_per_task=args.steps, score_batches=4, seed=seed, lr=args.lr)
            if method != "frozen":
                loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate, drop_last=True,
                                    generator=torch.Generator().manual_seed(seed))
                backbone, _ = adapt_backbone(backbone, method, loader, config, None, 150, accelerator)
                accelerator.free_memory()
            encoder = FeatureEncoder(backbone.eval())
            tx, ty = extract_features(encoder, DataLoader(train, batch_size=128, collate_fn=collate), desc="train")
            vx, vy = extract_features(encoder, DataLoader(test, batch_size=128, collate_fn=collate), desc="test")
            host = SimpleCIL()
            host.fit_task(tx, ty)
            proto = 100 * float((host.predict(vx) == vy).float().mean())
            probe = LogisticRegression(max_iter=2000, C=10.0).fit(tx.numpy(), ty.numpy())
            linear = 100 * float((torch.from_numpy(probe.predict(vx.numpy())) == vy).float().mean())
            rows[method].append({"seed": seed, "prototype_acc": proto, "linear_probe_acc": linear,
                                 "seconds": time.perf_counter() - start})
            print(method, seed, f"prototype {proto:.2f}  linear probe {linear:.2f}")
    summary = {}
    lines = [f"| method | prototype acc (%) | linear-probe acc (%) | seconds |  ({len(args.seeds.split(','))} seeds, "
             f"{args.steps} steps, {args.train_per_class} utterances per intent)", "|---|---:|---:|---:|"]
    for method, results in rows.items():
        def stat(key, results=results):
            values = [r[key] for r in results]
            return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        summary[method] = {k: stat(k) for k in ("prototype_acc", "linear_probe_acc", "seconds")}
        (pm, ps), (lm, ls), (sm, _) = (summary[method][k] for k in ("prototype_acc", "linear_probe_acc", "seconds"))
        lines.append(f"| {method} | {pm:.2f} +- {ps:.2f} | {lm:.2f} +- {ls:.2f} | {sm:.0f} |")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("data_dir", "output_dir")}, "runs": rows, "summary": summary}, indent=2))
    (out / "selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
