"""Peak training memory of MIST vs LoRA vs full fine-tuning, each in a fresh process; saved adapter bytes.

Every (model, method) pair runs `--mem-steps` training steps in a new Python process (this script with
`--worker`), so one method's allocator caches cannot hide or inflate another's. Both counts include the weights
and the optimizer state created in the first step:
- CUDA: torch.cuda.max_memory_allocated over the steps (absolute), and its increase over the allocation right
  before step 1 ("added by training");
- CPU: the resident-set high-water mark (VmHWM, reset before step 1 through /proc/self/clear_refs, so loading
  transients are excluded) minus the RSS after imports, and minus the RSS right before step 1.
Adapter bytes: size of adapter_model.safetensors from save_pretrained per targeted base weight (MIST and LoRA).

    nice -n 5 python benchmarks/memory.py [--hidden 384|768] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (the CPU memory count needs Linux)")


def worker(spec: common.ModelSpec, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one method's training steps; meant to run alone in a fresh process."""
    device = torch.device(args.device)
    rss_imports = _status_bytes("VmRSS") if device.type == "cpu" else 0
    batch = common.build_batch(spec, device)
    run = common.build_trainer(spec, method, device, args)
    common.sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
        before = _status_bytes("VmRSS")
    try:
        for _ in range(args.mem_steps):
            common.train_step(run["model"], batch, run["opt"], common.amp_dtype(args))
        common.sync(device)
    except RuntimeError as err:
        return {**run["info"], "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {**run["info"], "peak_bytes": peak, "train_delta_bytes": peak - before}
    peak = _status_bytes("VmHWM")
    return {**run["info"], "peak_bytes": peak - rss_imports, "train_delta_bytes": peak - before}


def in_fresh_process(spec: common.ModelSpec, method: str, argv: list[str]) -> dict[str, Any]:
    """Run `worker` for one (model, method) in a new interpreter and return its JSON answer."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", json.dumps([common.spec_dict(spec),
                                                                                        method])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {spec.kind}/{method} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def adapter_bytes(spec: common.ModelSpec, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Bytes of the saved adapter file per targeted base weight."""
    model, info = common.wrap(method, common.build_base(spec, torch.device("cpu")), args.density, args.grad_drop)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {"file_bytes": size, "per_targeted_weight": size / info["targeted_weights"]}


def measure(spec: common.ModelSpec, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    methods = {m: in_fresh_process(spec, m, argv) for m in common.METHODS}
    peak = {m: methods[m].get("peak_bytes") for m in common.METHODS}
    out = {"spec": common.spec_dict(spec), "methods": methods,
           "ratios": {"peak_vs_lora": common.ratio(peak["mist"], peak["lora"]),
                      "peak_vs_full": common.ratio(peak["mist"], peak["full"])}}
    if not args.skip_adapter_bytes:
        out["adapter"] = {m: adapter_bytes(spec, m, args) for m in ("mist", "lora")}
    return out


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = common.header("Peak training memory (fresh process per method)", results["env"], args)
    what = ("max_memory_allocated, absolute" if args.device == "cuda"
            else "VmHWM minus RSS after imports (weights + training)")
    lines += [f"Over {args.mem_steps} training steps; peak = {what}; 'added' = increase over the memory right "
              "before step 1.", ""]
    rows = []
    for r in results["models"]:
        ms = r["methods"]
        cell = {m: ms[m]["error"][:40] if "error" in ms[m] else
                f"{common.mib(ms[m]['peak_bytes'])} ({common.mib(ms[m]['train_delta_bytes'])})" for m in common.METHODS}
        ad = r.get("adapter", {})
        size = " / ".join(f"{ad[m]['per_targeted_weight']:.3f}" for m in ("mist", "lora")) if ad else "-"
        rows.append([r["spec"]["description"], cell["mist"], cell["lora"], cell["full"],
                     common.fmt_ratio(r["ratios"]["peak_vs_lora"]), common.fmt_ratio(r["ratios"]["peak_vs_full"]),
                     size])
    lines += common.md_table(["model", "MIST peak (added)", "LoRA", "full", "MIST/LoRA", "MIST/full",
                              "adapter B/weight MIST / LoRA"], rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(p)
    p.add_argument("--mem-steps", type=int, default=2, help="training steps per process (Adam state: step 1)")
    p.add_argument("--skip-adapter-bytes", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    common.configure(args)
    if args.worker:
        spec, method = json.loads(args.worker)
        spec.pop("description")
        print(json.dumps(worker(common.ModelSpec(**spec), method, args)))
        return {}
    device = torch.device(args.device)
    results = {"env": common.environment(device, args.note), "args": {**vars(args), "output_dir": None},
               "models": [measure(spec, args, argv) for spec in common.specs_from_args(args)]}
    common.write_results(common.run_name("memory", args), results, markdown(results, args), common.output_dir(args))
    return results


if __name__ == "__main__":
    main()
