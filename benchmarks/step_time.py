"""Training-step time of MIST vs LoRA vs full fine-tuning, as same-run ratios.

The three methods' models live in one process and their steps (zero_grad, forward, backward, optimizer.step)
are interleaved round-robin in a rotating order, so load from other tenants hits them alike. Wall time and process
CPU time (all threads) are both recorded; on CPU the ratios that count use process CPU time, on CUDA wall time.

    nice -n 5 python benchmarks/step_time.py [--hidden 384|768] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import common
import torch


def measure(spec: common.ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved step times of the three methods on one model, with their MIST/LoRA and MIST/full ratios."""
    device = torch.device(args.device)
    batch = common.build_batch(spec, device)
    runs = {m: common.build_trainer(spec, m, device, args) for m in common.METHODS}
    amp = common.amp_dtype(args)
    fns = {m: (lambda r=r: common.train_step(r["model"], batch, r["opt"], amp)) for m, r in runs.items()}
    times = common.interleaved(fns, device, args.steps, args.warmup)
    basis = "cpu_median_s" if device.type == "cpu" else "wall_median_s"
    mist, lora, full = (times[m] for m in common.METHODS)
    ratios = {f"{key}_vs_{other}": common.ratio(mist.get(f"{key}_median_s"), times[other].get(f"{key}_median_s"))
              for key in ("cpu", "wall") for other in ("lora", "full")}
    ratios["step_vs_lora"] = common.ratio(mist.get(basis), lora.get(basis))
    ratios["step_vs_full"] = common.ratio(mist.get(basis), full.get(basis))
    # Steps of one round run back to back, so their ratio cancels the slow drifts of a shared machine's speed
    # (seen as 20% between rounds); the median of the rounds' ratios is the robust same-run estimate.
    samples = basis.replace("_median_s", "_s")  # the per-step list behind the median
    for other in ("lora", "full"):
        paired = [a / b for a, b in zip(mist.get(samples, []), times[other].get(samples, []), strict=True)]
        ratios[f"paired_vs_{other}"] = statistics.median(paired) if paired else None
        ratios[f"paired_vs_{other}_range"] = [min(paired), max(paired)] if paired else None
    return {"spec": common.spec_dict(spec), "basis": basis, "ratios": ratios,
            "methods": {m: {**runs[m]["info"], **times[m]} for m in common.METHODS}}


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = common.header("Training step time (interleaved, same-run ratios)", results["env"], args)
    lines += [f"Median of {args.steps} steps after {args.warmup} warm-up per method. Ratios that count: "
              f"{'process CPU time' if args.device == 'cpu' else 'wall time'}, as the median over rounds of the "
              "ratio of one round's steps (the methods' steps of a round run back to back).", ""]
    rows = []
    for r in results["models"]:
        ms = r["methods"]
        cell = {m: "error" if "error" in ms[m] else f"{ms[m]['cpu_median_s'] * 1e3:.0f} / {ms[m]['wall_median_s'] * 1e3:.0f}"
                for m in common.METHODS}
        q = r["ratios"]
        rows.append([r["spec"]["description"], cell["mist"], cell["lora"], cell["full"],
                     f"{common.fmt_ratio(q['cpu_vs_lora'])} / {common.fmt_ratio(q['wall_vs_lora'])}",
                     f"{common.fmt_ratio(q['cpu_vs_full'])} / {common.fmt_ratio(q['wall_vs_full'])}",
                     _paired(q, "lora"), _paired(q, "full"), f"r={ms['lora'].get('rank')}"])
    lines += common.md_table(["model", "MIST ms (CPU / wall)", "LoRA ms", "full ms", "MIST/LoRA (CPU / wall)",
                              "MIST/full (CPU / wall)", "MIST/LoRA per round: median (range)",
                              "MIST/full per round", "LoRA"], rows)
    t = common.TARGETS[args.device]
    lines += [f"issue 8 targets ({args.device}): MIST/LoRA <= {t['step_vs_lora']}x, MIST/full <= {t['step_vs_full']}x.",
              ""]
    errors = [f"- {r['spec']['kind']} {m}: {r['methods'][m]['error']}" for r in results["models"]
              for m in common.METHODS if "error" in r["methods"][m]]
    return "\n".join(lines + errors)


def _paired(ratios: dict[str, Any], other: str) -> str:
    """Median (min-max) of the per-round ratios, three decimals (the targets sit 0.01 from the results)."""
    mid, spread = ratios.get(f"paired_vs_{other}"), ratios.get(f"paired_vs_{other}_range")
    return "n/a" if mid is None else f"{mid:.3f} ({spread[0]:.3f}-{spread[1]:.3f})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method (Adam state appears here)")
    args = p.parse_args(argv)
    common.configure(args)
    device = torch.device(args.device)
    results = {"env": common.environment(device, args.note), "args": {**vars(args), "output_dir": None},
               "models": [measure(spec, args) for spec in common.specs_from_args(args)]}
    common.write_results(common.run_name("step_time", args), results, markdown(results, args),
                         common.output_dir(args))
    return results


if __name__ == "__main__":
    main()
