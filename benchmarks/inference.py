"""Inference cost of a trained MIST adapter: unmerged and merged forward vs the base model's forward.

MIST is trained for a few steps (lr 1e-2, so the delta is far from zero), saved, and reloaded into a second copy
of the base model and merged (`merge_and_unload`). The "base" model is an independently built plain model with
W.view(-1)[indices] += values folded in, so it costs what the base costs and gives the exact expected output.
The three forwards (eval, no_grad) are interleaved round-robin; ratios are wall time (process CPU time on CPU).

    nice -n 5 python benchmarks/inference.py [--hidden 384|768] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from typing import Any

import common
import torch
from peft import PeftModel

from mist_peft import mist_layers


def trained_mist(spec: common.ModelSpec, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(MIST model after `--train-steps` steps, pristine copy of its base, batch)."""
    device = torch.device(args.device)
    base = common.build_base(spec, device)
    pristine = copy.deepcopy(base)
    model, _ = common.wrap("mist", base, args.density, args.grad_drop)
    model.train()
    opt = common.make_optimizer("mist", model, lr=1e-2)
    batch = common.build_batch(spec, device)
    for _ in range(args.train_steps):
        common.train_step(model, batch, opt)  # fp32: the delta, not autocast, is what this measures
    return model.eval(), pristine, batch


def base_plus_delta(pristine: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """The pristine base with every MIST delta added by hand: the reference output and the base cost."""
    ref = copy.deepcopy(pristine)
    weights = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer in mist_layers(model, "default").items():
            w = weights[name.split("base_model.model.", 1)[-1]].weight
            w.view(-1).index_add_(0, layer.mist_indices["default"], layer.mist_values["default"].to(w.dtype))
    return ref.eval()


def measure(spec: common.ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model, pristine, batch = trained_mist(spec, args)
    reference = base_plus_delta(pristine, model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        merged = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp).merge_and_unload().eval()
    amp = common.amp_dtype(args)
    models = {"base": reference, "unmerged": model, "merged": merged}

    def forward(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return m(**batch).last_hidden_state

    times = common.interleaved({k: (lambda m=m: forward(m)) for k, m in models.items()}, device, args.steps, 1)
    ref_out = forward(reference)
    basis = "cpu_median_s" if device.type == "cpu" else "wall_median_s"
    out: dict[str, Any] = {"spec": common.spec_dict(spec), "basis": basis, "times": times,
                           "output_abs_max": float(ref_out.abs().max())}
    for k in ("unmerged", "merged"):
        out[f"{k}_vs_base"] = common.ratio(times[k].get(basis), times["base"].get(basis))
        out[f"{k}_max_abs_diff"] = float((forward(models[k]) - ref_out).abs().max())
    return out


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = common.header("Inference: unmerged / merged MIST vs base forward", results["env"], args)
    basis = "process CPU time" if args.device == "cpu" else "wall time"
    lines += [f"eval + no_grad forward, median {basis} of {args.steps}, interleaved; MIST trained {args.train_steps} "
              "steps first. Max abs diff against an independently built base + delta.", ""]
    rows = []
    for r in results["models"]:
        t = {k: r["times"][k].get(r["basis"]) for k in ("base", "unmerged", "merged")}
        ms = {k: "error" if v is None else f"{v * 1e3:.1f} ms" for k, v in t.items()}
        rows.append([r["spec"]["description"], ms["base"],
                     f"{ms['unmerged']} ({common.fmt_ratio(r['unmerged_vs_base'])})",
                     f"{ms['merged']} ({common.fmt_ratio(r['merged_vs_base'])})",
                     f"{r['unmerged_max_abs_diff']:.1e} / {r['merged_max_abs_diff']:.1e}"])
    lines += common.md_table(["model", "base", "MIST unmerged", "MIST merged", "max abs diff unmerged / merged"],
                             rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(p)
    p.add_argument("--steps", type=int, default=5, help="timed forwards per model")
    p.add_argument("--train-steps", type=int, default=3, help="MIST steps before measuring")
    args = p.parse_args(argv)
    common.configure(args)
    device = torch.device(args.device)
    results = {"env": common.environment(device, args.note), "args": {**vars(args), "output_dir": None},
               "models": [measure(spec, args) for spec in common.specs_from_args(args)]}
    common.write_results(common.run_name("inference", args), results, markdown(results, args),
                         common.output_dir(args))
    return results


if __name__ == "__main__":
    main()
