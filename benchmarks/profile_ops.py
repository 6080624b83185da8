"""Where a training step's time goes: torch.profiler top ops of MIST, LoRA and full fine-tuning.

The methods' steps alternate, each under its own short profiler session, after two untimed steps. Tallied per
op: host self time (CPU) and, on CUDA, the kernel time the op launched. Prints the top ops of a MIST step and the
ops where MIST spends more than LoRA.

    nice -n 5 python benchmarks/profile_ops.py [--hidden 384|768] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
from typing import Any

import common
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def measure(spec: common.ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    batch = common.build_batch(spec, device)
    amp = common.amp_dtype(args)
    runs = {m: common.build_trainer(spec, m, device, args) for m in common.METHODS}
    for r in runs.values():
        for _ in range(2):
            common.train_step(r["model"], batch, r["opt"], amp)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    view = "cuda" if device.type == "cuda" else "cpu"
    acc: dict[str, dict[str, list[float]]] = {m: {} for m in runs}  # op -> [ms, calls], summed over steps
    for _ in range(args.profile_steps):
        for method, r in runs.items():
            common.sync(device)
            with profile(activities=activities) as prof:
                common.train_step(r["model"], batch, r["opt"], amp)
                common.sync(device)
            for e in prof.key_averages():
                # Host-side op events only: on CUDA their self device time is the kernels they launched (no double
                # count), and user annotations such as Optimizer.step#..., whose device "time" is a span, are out.
                if e.device_type != DeviceType.CPU or (view == "cuda" and e.is_user_annotation):
                    continue
                row = acc[method].setdefault(e.key, [0.0, 0.0])
                row[0] += (e.self_device_time_total if view == "cuda" else e.self_cpu_time_total) / 1e3
                row[1] += e.count
    n = args.profile_steps
    per_step = {m: {op: v[0] / n for op, v in d.items()} for m, d in acc.items()}
    top = {m: [{"op": op, "ms": ms, "calls": acc[m][op][1] / n}
               for op, ms in sorted(d.items(), key=lambda kv: -kv[1])[: args.rows]] for m, d in per_step.items()}
    mist, lora = per_step["mist"], per_step["lora"]
    extra = sorted(({"op": op, "mist_ms": mist.get(op, 0.0), "lora_ms": lora.get(op, 0.0),
                     "delta_ms": mist.get(op, 0.0) - lora.get(op, 0.0)} for op in set(mist) | set(lora)),
                   key=lambda r: -r["delta_ms"])[: args.rows]
    unit = "ms per step, " + ("CUDA kernel time launched by each op" if view == "cuda" else "host CPU self time")
    return {"spec": common.spec_dict(spec), "unit": unit, "steps": n,
            "total_ms": {m: sum(d.values()) for m, d in per_step.items()}, "top": top, "mist_minus_lora": extra}


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = common.header("Profile of one training step (torch.profiler)", results["env"], args)
    for r in results["models"]:
        tot = r["total_ms"]
        lines += [f"## {r['spec']['description']}", "",
                  f"{r['unit']}; {r['steps']} profiled steps each. Total: MIST {tot['mist']:.1f}, LoRA "
                  f"{tot['lora']:.1f}, full {tot['full']:.1f} ms.", "", "Ops where MIST spends more than LoRA:", ""]
        lines += common.md_table(["op", "MIST", "LoRA", "MIST - LoRA"], [
            [f"`{x['op']}`", f"{x['mist_ms']:.2f}", f"{x['lora_ms']:.2f}", f"{x['delta_ms']:+.2f}"]
            for x in r["mist_minus_lora"]])
        lines += ["Top ops of a MIST step:", ""]
        lines += common.md_table(["op", "ms/step", "share", "calls/step"], [
            [f"`{x['op']}`", f"{x['ms']:.2f}", f"{100 * x['ms'] / tot['mist']:.1f}%", f"{x['calls']:.0f}"]
            for x in r["top"]["mist"]])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(p)
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per method")
    p.add_argument("--rows", type=int, default=15, help="ops listed per table")
    args = p.parse_args(argv)
    common.configure(args)
    device = torch.device(args.device)
    results = {"env": common.environment(device, args.note), "args": {**vars(args), "output_dir": None},
               "models": [measure(spec, args) for spec in common.specs_from_args(args)]}
    common.write_results(common.run_name("profile", args), results, markdown(results, args),
                         common.output_dir(args))
    return results


if __name__ == "__main__":
    main()
