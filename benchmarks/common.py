"""Shared pieces of the tuner-cost benchmarks (step_time, memory, inference, profile_ops, gpu_check).

Every script compares the same three methods on the same models, batch, optimizer and loss:

- MIST (magnitude selection, density 0.05, grad_drop 0.9), LoRA with a rank giving as many trainable values, and
  full fine-tuning; MIST and LoRA target every Linear inside the encoder blocks;
- AdamW (lr 1e-4), loss = mean(last_hidden_state ** 2), optionally under bf16 autocast (`--dtype bf16`);
- text: all-MiniLM-L6-v2 (packaged weights, `mist_peft.assets.minilm_path`) at hidden 384, a randomly initialised
  BERT of the requested shape otherwise; vision: a randomly initialised ViT (hidden 384: ViT-S shape at 112 px).
  Inputs are seeded random token ids / images: a step's cost does not depend on their content.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("mist", "lora", "full")
# Every Linear inside an encoder block (encoder.layer.N.* in BERT, layers.N.* in newer ViTs); not the pooler.
ENCODER_BLOCK = re.compile(r"(.*\.)?(encoder\.layer|encoder\.layers|layers|layer)\.\d+\..*")
# issue 8's targets: same-run ratios (process CPU time on CPU, wall time on CUDA), peak memory, inference.
TARGETS = {
    "cpu": {"step_vs_lora": 0.90, "step_vs_full": 0.85, "peak_vs_lora": 1.0},
    "cuda": {"step_vs_lora": 1.0, "step_vs_full": 0.8, "peak_vs_lora": 1.0, "unmerged_vs_base": 1.05,
             "host_syncs": 0},
}


@dataclass(frozen=True)
class ModelSpec:
    """Shape of one benchmark model and its batch."""

    kind: str  # "text" | "vision"
    hidden: int = 384
    layers: int = 6
    batch: int = 32
    seq_len: int = 64
    image_size: int = 112
    patch: int = 16
    pretrained: bool = False  # the packaged all-MiniLM-L6-v2 (text, hidden 384, 6 layers only)

    @property
    def heads(self) -> int:
        return 12 if self.kind == "text" and self.hidden == 384 else max(1, self.hidden // 64)  # MiniLM: 12

    def describe(self) -> str:
        if self.kind == "text":
            src = "all-MiniLM-L6-v2 (packaged weights)" if self.pretrained else "BERT, random init"
            return f"{src}, hidden {self.hidden}, {self.layers} layers; batch {self.batch} x {self.seq_len} tokens"
        return (f"ViT, random init, hidden {self.hidden}, {self.layers} layers, patch {self.patch}; "
                f"batch {self.batch} x {self.image_size} px")


# ------------------------------------------------------------------------------------------ command line
def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every tuner-cost script shares."""
    p.add_argument("--model", nargs="+", default=["text", "vision"], choices=["text", "vision"])
    p.add_argument("--hidden", type=int, default=384, help="384 (current sizes) or 768 (4x the flops)")
    p.add_argument("--layers", type=int, help="encoder blocks (default: text 6, vision 12)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--random-init", action="store_true", help="random text weights even at MiniLM's shape")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (meant for GPUs)")
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--grad-drop", type=float, default=0.9)
    p.add_argument("--output-dir", type=Path, help="default: benchmarks/results/<device>/")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's). On a shared machine use 1:"
                   " threads spin-waiting for their siblings inflate process CPU time unevenly across methods")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared machine')")


def configure(args: argparse.Namespace) -> None:
    """Apply the process-wide options; every script calls this right after parsing."""
    if args.threads:
        torch.set_num_threads(args.threads)


def specs_from_args(args: argparse.Namespace) -> list[ModelSpec]:
    out = []
    for kind in args.model:
        layers = args.layers or (6 if kind == "text" else 12)
        pretrained = kind == "text" and args.hidden == 384 and layers == 6 and not args.random_init
        out.append(ModelSpec(kind, args.hidden, layers, args.batch_size, args.seq_len, args.image_size,
                             pretrained=pretrained))
    return out


def amp_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return torch.bfloat16 if args.dtype == "bf16" else None


# ----------------------------------------------------------------------------------- models and methods
def build_base(spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    """The base encoder, seeded so that every process and every method starts from the same weights."""
    from transformers import AutoModel, BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    if spec.pretrained:
        from mist_peft.assets import minilm_path

        return AutoModel.from_pretrained(minilm_path()).to(device)
    common = {"hidden_size": spec.hidden, "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
              "intermediate_size": 4 * spec.hidden}
    with torch.device(device):  # initialise in place: a BERT-base init on the host takes seconds
        if spec.kind == "text":
            return BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **common))
        if spec.kind == "vision":
            return ViTModel(ViTConfig(patch_size=spec.patch, image_size=spec.image_size, num_channels=3, **common))
    raise ValueError(f"unknown model kind {spec.kind!r}; valid options are 'text' and 'vision'")


def build_batch(spec: ModelSpec, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if spec.kind == "vision":
        return {"pixel_values": torch.rand(spec.batch, 3, spec.image_size, spec.image_size, generator=g).to(device)}
    ids = torch.randint(1000, 30000, (spec.batch, spec.seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def targeted_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ENCODER_BLOCK.fullmatch(n)]
    if not found:
        raise RuntimeError(f"no Linear found in the encoder blocks of {type(model).__name__}")
    return found


def lora_rank(targets: list[tuple[str, torch.nn.Linear]], density: float) -> int:
    """Rank whose r * (in + out), summed over the targets, is closest to density * (targeted weights)."""
    weights = sum(m.in_features * m.out_features for _, m in targets)
    per_rank = sum(m.in_features + m.out_features for _, m in targets)
    return max(1, round(density * weights / per_rank))


def wrap(method: str, base: torch.nn.Module, density: float = 0.05,
         grad_drop: float = 0.9) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Apply one method to a freshly built base model; returns the model to train and facts about it."""
    from peft import LoraConfig, get_peft_model

    import mist_peft

    targets = targeted_modules(base)
    names = [n for n, _ in targets]
    info: dict[str, Any] = {"targeted_weights": sum(m.weight.numel() for _, m in targets),
                            "targeted_modules": len(names)}
    if method == "full":
        model = base.requires_grad_(True)
    elif method == "lora":
        info["rank"] = r = lora_rank(targets, density)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=names))
    elif method == "mist":
        cfg = mist_peft.MISTConfig(target_modules=names, density=density, selection="magnitude", grad_drop=grad_drop)
        model = get_peft_model(base, cfg)
    else:
        raise ValueError(f"unknown method {method!r}; valid options are {list(METHODS)}")
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, info


def make_optimizer(method: str, model: torch.nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    import mist_peft

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    if method == "mist":
        mist_peft.attach_optimizer(opt, model)
    return opt


def train_step(model: torch.nn.Module, batch: dict, opt: torch.optim.Optimizer,
               amp: torch.dtype | None = None) -> torch.Tensor:
    """One zero_grad + forward + backward + optimizer step; returns the loss without syncing the host."""
    device_type = next(iter(batch.values())).device.type
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = model(**batch).last_hidden_state.float().pow(2).mean()
    loss.backward()
    opt.step()
    return loss.detach()


def build_trainer(spec: ModelSpec, method: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Model, optimizer and info of one method, ready for `train_step`."""
    model, info = wrap(method, build_base(spec, device), args.density, args.grad_drop)
    model.train()
    return {"model": model, "opt": make_optimizer(method, model), "info": info}


# --------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, steps: int,
                warmup: int) -> dict[str, dict[str, Any]]:
    """Wall and process-CPU time of each function, calls interleaved round-robin in a rotating order.

    Background load on a shared machine then hits every function alike, so same-run ratios stay meaningful. A
    function failing in its first call (e.g. a method that does not support autocast yet) is reported, not timed.
    """
    out: dict[str, dict[str, Any]] = {name: {"wall_s": [], "cpu_s": []} for name in fns}
    live = list(fns)
    for i in range(warmup + steps):
        order = live[i % len(live):] + live[: i % len(live)] if live else []
        for name in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                fns[name]()
            except RuntimeError as err:
                if i > 0:
                    raise
                out[name]["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                live.remove(name)
                continue
            sync(device)
            if i >= warmup:
                out[name]["wall_s"].append(time.perf_counter() - t0)
                out[name]["cpu_s"].append(time.process_time() - c0)
    for r in out.values():
        if r["wall_s"]:
            r["wall_median_s"] = statistics.median(r["wall_s"])
            r["cpu_median_s"] = statistics.median(r["cpu_s"])
    return out


# -------------------------------------------------------------------------------------------- results
def device_slug(device: torch.device) -> str:
    """Results folder name: 'cpu', or the GPU model ('NVIDIA H200' -> 'h200', as benchmarks/results/h100)."""
    if device.type != "cuda":
        return "cpu"
    words = [w for w in torch.cuda.get_device_name(device).lower().split() if w not in ("nvidia", "tesla")]
    return re.sub(r"[^a-z0-9]+", "-", words[0] if words else "cuda")


def environment(device: torch.device, note: str = "") -> dict[str, Any]:
    """Device and versions stored with every result (and whether the machine was busy)."""
    import peft
    import transformers

    import mist_peft

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    return {"device": device.type, "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "mist_peft": mist_peft.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "niceness": os.nice(0), "loadavg_1_5_15": os.getloadavg(), "note": note,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_name(script: str, args: argparse.Namespace) -> str:
    """File stem: the script, the hidden size and the dtype, e.g. step_time_h384 or step_time_h768_bf16."""
    return f"{script}_h{args.hidden}" + ("_bf16" if args.dtype == "bf16" else "")


def write_results(name: str, payload: dict[str, Any], markdown: str, out_dir: Path) -> Path:
    """Write <name>.json and <name>.md under out_dir, print the markdown, return the JSON path."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    return out_dir / f"{name}.json"


def output_dir(args: argparse.Namespace) -> Path:
    return args.output_dir or RESULTS / device_slug(torch.device(args.device))


def header(title: str, env: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Markdown lines naming what was measured, where, and with which versions."""
    busy = f" Note: {env['note']}." if env["note"] else ""
    return [f"# {title}", "",
            f"{env['device_name']} (`{env['device']}`, {env['threads']} threads, niceness {env['niceness']}, "
            f"load {env['loadavg_1_5_15'][0]:.1f}); torch {env['torch']}, transformers {env['transformers']}, "
            f"peft {env['peft']}; {args.dtype}; MIST density {args.density}, grad_drop {args.grad_drop}; "
            f"LoRA rank matched to MIST's trainable count; AdamW.{busy}", ""]


def md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return {**asdict(spec), "description": spec.describe()}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"
