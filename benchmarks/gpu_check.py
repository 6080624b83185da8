"""issue 8's GPU targets in one run (under 5 minutes on an H100/H200): MIST vs LoRA vs full fine-tuning.

For each model, all randomly initialised (packaged weights do not travel) and trained under bf16 autocast:
  text-bert-base    BERT-base shape (hidden 768, 12 layers), batch 32 x 128 tokens
  vision-vit-b16    ViT-B/16 shape (hidden 768, 12 layers), 224 px, batch 32
  text-current      all-MiniLM-L6-v2 shape (hidden 384, 6 layers), batch 32 x 64 tokens
  vision-current    ViT-S shape (hidden 384, 12 layers), 112 px, batch 32
it measures the step time (interleaved, wall), the peak memory (a fresh process per method, max_memory_allocated),
unmerged and merged inference against the base forward, and the host syncs of one training step (each
`torch.cuda.set_sync_debug_mode("warn")` warning counted). Everything goes to --output-dir (gpu_check.json and
gpu_check.md); one summary table is printed. A method that fails (e.g. no autocast support yet) is reported.

    PYTHONPATH=src python benchmarks/gpu_check.py --output-dir OUT
    PYTHONPATH=src python benchmarks/gpu_check.py --cpu-dry-run --output-dir OUT   # tiny models on CPU
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import common
import torch
from torch.utils._python_dispatch import TorchDispatchMode

CONFIGS = {
    "text-bert-base": dict(kind="text", hidden=768, layers=12, seq_len=128),
    "vision-vit-b16": dict(kind="vision", hidden=768, layers=12, image_size=224),
    "text-current": dict(kind="text", hidden=384, layers=6, seq_len=64),
    "vision-current": dict(kind="vision", hidden=384, layers=12, image_size=112),
}
TINY = dict(hidden=64, layers=2, batch=2, seq_len=16, image_size=32)  # --cpu-dry-run: the same code, small


# Ops whose output size or value the host must read: on CUDA each waits for the device. Counted on any device,
# so the CPU dry run exercises the check too (there, torch optimizers' `.item()` of their CPU step counter
# shows up for every method alike; on CUDA that counter stays on the host and does not sync).
SYNC_PRONE = {"aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::unique", "aten::_unique2",
              "aten::unique_consecutive", "aten::masked_select", "aten::repeat_interleave"}


class SyncProneOps(TorchDispatchMode):
    """Counts the calls of SYNC_PRONE ops (forward, backward and optimizer step alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # repeat_interleave told its output size (MIST's optimizer hook) does not read the device
        if func._schema.name in SYNC_PRONE and not (kwargs or {}).get("output_size"):
            self.calls[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def host_syncs(spec: common.ModelSpec, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Synchronising CUDA calls in one training step (after a warm-up step), and where Python made them; on
    any device also the sync-prone ops of that step (the CPU dry run's check)."""
    device = torch.device(args.device)
    run = common.build_trainer(spec, method, device, args)
    batch = common.build_batch(spec, device)
    cuda = device.type == "cuda"
    ops = SyncProneOps()
    try:
        common.train_step(run["model"], batch, run["opt"], common.amp_dtype(args))
        common.sync(device)
        with warnings.catch_warnings(record=True) as caught, ops:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                common.train_step(run["model"], batch, run["opt"], common.amp_dtype(args))
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        common.sync(device)
    except RuntimeError as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    # the warning of each synchronising call; not the one-off "debug mode is a prototype feature" notice
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    out = {"sync_prone_ops": dict(ops.calls)}
    if cuda:
        out.update(count=len(syncs), where=Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs).most_common(8))
    else:  # no CUDA: the sync-prone op count stands in
        out["count"] = sum(ops.calls.values())
    return out


def check(name: str, spec: common.ModelSpec, args: argparse.Namespace, mem_argv: list[str]) -> dict[str, Any]:
    import inference  # imported here so that a machine without CUDA is told so before peft loads
    import memory
    import step_time

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.mem_jobs) as pool:  # separate processes: their CUDA memory counts are separate
        mem = dict(zip(common.METHODS, pool.map(lambda m: memory.in_fresh_process(spec, m, mem_argv),
                                                common.METHODS), strict=True))
    out: dict[str, Any] = {"spec": common.spec_dict(spec), "memory": mem,
                           "step": step_time.measure(spec, args), "inference": inference.measure(spec, args)}
    out["syncs"] = {m: host_syncs(spec, m, args) for m in common.METHODS}
    out["seconds"] = time.perf_counter() - t0
    print(f"[gpu_check] {name}: {out['seconds']:.0f} s", file=sys.stderr, flush=True)
    return out


def summary(results: dict[str, Any]) -> str:
    env, targets = results["env"], common.TARGETS["cuda"]
    peak = "max_memory_allocated" if env["device"] == "cuda" else "RSS high-water mark (CPU dry run)"
    lines = [f"# gpu_check: issue 8's GPU targets ({env['device_name']})", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, peft {env['peft']}; "
             f"{'bf16 autocast' if results['args']['dtype'] == 'bf16' else 'fp32'}; AdamW; step = median wall time "
             f"of {results['args']['steps']} interleaved steps; peak = {peak} in a fresh process per method; total "
             f"{results['seconds']:.0f} s. Targets: MIST <= {targets['step_vs_lora']}x LoRA and <= "
             f"{targets['step_vs_full']}x full, peak <= LoRA, unmerged inference <= {targets['unmerged_vs_base']}x "
             "base, 0 host syncs."
             + ("" if env["device"] == "cuda" else " CPU dry run: 'syncs' counts sync-prone ops (item, nonzero, "
                "bincount...) instead; torch Adam's CPU step counter adds one per trained tensor (not a sync on CUDA)."), ""]
    rows, errors = [], []
    for name, r in results["configs"].items():
        if "skipped" in r:
            rows.append([name, r["skipped"]] + [""] * 6)
            continue
        st, inf, mem = r["step"], r["inference"], r["memory"]
        ms = "/".join("err" if "error" in st["methods"][m] else f"{st['methods'][m]['wall_median_s'] * 1e3:.1f}"
                      for m in common.METHODS)
        peak = {m: mem[m].get("peak_bytes") for m in common.METHODS}
        mib = "/".join("err" if v is None else f"{v / 2**20:.0f}" for v in peak.values())
        syncs = r.get("syncs", {})
        sync = "/".join(str(syncs[m].get("count", "err")) for m in common.METHODS)
        q = st["ratios"]
        rows.append([name, ms, f"{common.fmt_ratio(q['wall_vs_lora'])}, {common.fmt_ratio(q['wall_vs_full'])}",
                     mib, common.fmt_ratio(common.ratio(peak["mist"], peak["lora"])),
                     common.fmt_ratio(inf["unmerged_vs_base"]), common.fmt_ratio(inf["merged_vs_base"]), sync])
        errors += [f"- {name} step {m}: {st['methods'][m]['error']}" for m in common.METHODS
                   if "error" in st["methods"][m]]
        errors += [f"- {name} memory {m}: {mem[m]['error']}" for m in common.METHODS if "error" in mem[m]]
        errors += [f"- {name} syncs {m}: {s['error']}" for m, s in syncs.items() if "error" in s]
        errors += [f"- {name} syncs {m} at: {s.get('where', s.get('sync_prone_ops'))}" for m, s in syncs.items()
                   if s.get("count")]
    lines += common.md_table(["model", "step ms MIST/LoRA/full", "MIST vs LoRA, full", "peak MiB MIST/LoRA/full",
                              "peak MIST/LoRA", "unmerged/base", "merged/base", "syncs MIST/LoRA/full"], rows)
    return "\n".join(lines + errors)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny models on CPU: proves the pipeline runs")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grad-drop", type=float, default=0.9,
                   help="MIST's gradient dropout; 0 runs no dropout draw and no strict-sparsity bookkeeping, which "
                        "measures what that machinery costs")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=270, help="skip the remaining models after this many seconds")
    p.add_argument("--mem-jobs", type=int, default=3, help="memory processes at a time")
    args = p.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.exit(f"gpu_check: no CUDA device (torch.cuda.is_available() is False; torch {torch.__version__}, "
                 f"CUDA build {torch.version.cuda}). It measures issue 8's GPU targets and needs a GPU; "
                 "add --cpu-dry-run to run the same pipeline on tiny models on this CPU.")
    args.device = "cpu" if args.cpu_dry_run else "cuda"
    args.density, args.train_steps, args.note = 0.05, 3, "gpu_check"
    if args.cpu_dry_run:
        args.steps, args.warmup, args.mem_jobs, args.budget_s = 2, 1, 1, float("inf")
    mem_argv = ["--device", args.device, "--dtype", args.dtype, "--mem-steps", "2", "--grad-drop", str(args.grad_drop)]
    t0 = time.perf_counter()
    results: dict[str, Any] = {"env": common.environment(torch.device(args.device), args.note),
                               "args": {**vars(args), "output_dir": None}, "configs": {}}
    for name in args.configs:
        shape = {**CONFIGS[name], **(TINY if args.cpu_dry_run else {})}
        spec = common.ModelSpec(**{"batch": 32, **shape})
        if time.perf_counter() - t0 > args.budget_s:
            results["configs"][name] = {"skipped": f"skipped: over the {args.budget_s:.0f} s budget"}
            continue
        results["configs"][name] = check(name, spec, args, mem_argv)
    results["seconds"] = time.perf_counter() - t0
    common.write_results("gpu_check", results, summary(results), args.output_dir)
    return results


if __name__ == "__main__":
    main()
