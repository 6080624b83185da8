"""Adapter load time: MIST vs LoRA for adapter files of the same size (issue 11: loading must not select).

Base model: `--layers` nn.Linear(size, size) layers (default 8 x 2048 x 2048, 33.6M fp32 weights). MIST: every
layer targeted, `--density` of each weight, random selection, non-zero values. LoRA on the same layers with the
rank that gives about the same adapter_model.safetensors size (r x (in + out) fp32 values per layer).

Measured: `PeftModel.from_pretrained(base, adapter, low_cpu_mem_usage=...)` wall and process CPU time (median of
`--repeats`, the methods interleaved so background load hits both alike; on a shared CPU machine the CPU
time is the steadier of the two). Each load gets a fresh deep copy of the
base (not timed). For MIST, the time spent inside the data-free selection (`mist_peft.selection.select_data_free`)
during the load is recorded too: loading should never select, since the checkpoint holds the indices. Every loaded
model's output is checked against the saved model's.

Usage: python benchmarks/bench_load.py [--layers 8] [--size 2048] [--density 0.05] [--repeats 3] [--output-dir DIR]
Writes DIR/bench_load.json and DIR/bench_load.md (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import mist_peft
from mist_peft import MISTConfig

REPO = Path(__file__).resolve().parents[1]


class Stack(nn.Module):
    def __init__(self, layers: int, size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(size, size) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class SelectionTimer:
    """Wraps the data-free selection to add up the time a load spends in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._original = mist_peft.selection.select_data_free

    def __enter__(self):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        mist_peft.selection.select_data_free = timed
        return self

    def __exit__(self, *exc) -> None:
        mist_peft.selection.select_data_free = self._original


def save_adapters(template: nn.Module, args: argparse.Namespace, root: Path, x: torch.Tensor) -> dict:
    """Save a MIST adapter and a LoRA adapter of about the same file size; return their facts and outputs."""
    targets = [f"layers.{i}" for i in range(args.layers)]
    mist = get_peft_model(copy.deepcopy(template), MISTConfig(target_modules=targets, selection="random",
                                                              density=args.density, grad_drop=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in mist.named_parameters():
            if "mist_values" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    mist.save_pretrained(root / "mist")
    mist_bytes = (root / "mist" / "adapter_model.safetensors").stat().st_size
    rank = max(1, round(mist_bytes / (args.layers * 2 * args.size * 4)))
    lora = get_peft_model(copy.deepcopy(template), LoraConfig(target_modules=targets, r=rank, init_lora_weights=False))
    lora.save_pretrained(root / "lora")
    with torch.no_grad():
        outputs = {"mist": mist(x), "lora": lora(x)}
    return {
        "outputs": outputs,
        "mist": {"file_bytes": mist_bytes, "selected": sum(p.numel() for n, p in mist.named_parameters()
                                                           if "mist_values" in n)},
        "lora": {"file_bytes": (root / "lora" / "adapter_model.safetensors").stat().st_size, "rank": rank},
    }


def load_once(template: nn.Module, path: Path, low_cpu_mem_usage: bool) -> tuple[dict, nn.Module]:
    base = copy.deepcopy(template)
    with SelectionTimer() as sel:
        wall, cpu = time.perf_counter(), time.process_time()
        model = PeftModel.from_pretrained(base, path, low_cpu_mem_usage=low_cpu_mem_usage)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "selection_s": sel.seconds, "selection_calls": sel.calls}, model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    template = Stack(args.layers, args.size).eval()
    x = torch.randn(4, args.size, generator=torch.Generator().manual_seed(1))
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        facts = save_adapters(template, args, root, x)
        for repeat in range(args.repeats):
            order = ["mist", "lora"] if repeat % 2 == 0 else ["lora", "mist"]
            for low_cpu_mem_usage in (False, True):
                for method in order:
                    result, model = load_once(template, root / method, low_cpu_mem_usage)
                    with torch.no_grad():
                        result["output_identical"] = bool(torch.equal(model(x), facts["outputs"][method]))
                    runs.setdefault(f"{method}|{low_cpu_mem_usage}", []).append(result)
                    del model

    rows = []
    for key, results in runs.items():
        method, low = key.split("|")
        rows.append({
            "method": method,
            "low_cpu_mem_usage": low == "True",
            "wall_s_median": statistics.median(r["wall_s"] for r in results),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in results),
            "selection_s_median": statistics.median(r["selection_s"] for r in results),
            "selection_calls": max(r["selection_calls"] for r in results),
            "outputs_identical": all(r["output_identical"] for r in results),
            "runs": results,
        })
    rows.sort(key=lambda r: (r["low_cpu_mem_usage"], r["method"]))
    ratios = {}
    for measure in ("wall", "cpu"):
        median = {(r["method"], r["low_cpu_mem_usage"]): r[f"{measure}_s_median"] for r in rows}
        ratios[measure] = {str(low): median[("mist", low)] / median[("lora", low)] for low in (False, True)}
    summary = {
        "args": {k: v for k, v in vars(args).items() if k != "output_dir"},  # no machine paths in results
        "env": {"torch": torch.__version__, "peft": peft.__version__, "mist_peft": mist_peft.__version__,
                "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "adapters": {k: facts[k] for k in ("mist", "lora")},
        "results": rows,
        "mist_over_lora": ratios,
    }
    table = render(summary)
    print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_load.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "bench_load.md").write_text(table + "\n")
    return summary


def render(summary: dict) -> str:
    a, ad = summary["args"], summary["adapters"]
    lines = [
        f"Adapter load time, {a['layers']} x Linear({a['size']}, {a['size']}); MIST density {a['density']} "
        f"({ad['mist']['selected']:,} values, {ad['mist']['file_bytes'] / 1e6:.2f} MB file) vs LoRA r="
        f"{ad['lora']['rank']} ({ad['lora']['file_bytes'] / 1e6:.2f} MB file); median of {a['repeats']} loads; "
        f"torch {summary['env']['torch']}, peft {summary['env']['peft']}, {summary['env']['threads']} threads.",
        "",
        "| method | low_cpu_mem_usage | load wall (s) | load CPU (s) | of which selection, wall (s) | outputs identical |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in summary["results"]:
        lines.append(f"| {r['method']} | {r['low_cpu_mem_usage']} | {r['wall_s_median']:.3f} | {r['cpu_s_median']:.3f} "
                     f"| {r['selection_s_median']:.3f} | {r['outputs_identical']} |")
    for measure, r in summary["mist_over_lora"].items():
        lines.append(f"{'' if measure == 'cpu' else chr(10)}MIST / LoRA load {measure} time: {r['False']:.2f}x "
                     f"(low_cpu_mem_usage=False), {r['True']:.2f}x (low_cpu_mem_usage=True); goal: <= 1.0x.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
