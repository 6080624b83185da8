"""Model card and Hub upload of MIST adapters (exactly the sparse checkpoint that `save_pretrained` writes)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

from huggingface_hub import HfApi, ModelCard

from .layer import DENSE_DELTAS, MISTLayer
from .names import is_mist_config
from .selection import mist_layers

CARD_HEADING = "## MIST adapter"


def adapter_stats(model: Any, adapter_name: str) -> dict[str, Any]:
    """Counts that describe what an adapter changes in the base model."""
    layers = list(mist_layers(model, adapter_name).values())
    targeted = sum(m.get_base_layer().weight.numel() for m in layers)
    selected = sum(m.mist_values[adapter_name].numel() for m in layers)
    # tune_biases_and_norms: dense deltas over whole biases and norm weights (every MIST layer type)
    dense = [getattr(m, kind)[adapter_name] for m in model.modules() if isinstance(m, MISTLayer)
             for kind in DENSE_DELTAS if adapter_name in getattr(m, kind)]
    changed = sum(int((m.mist_values[adapter_name] != 0).sum()) for m in layers) + sum(int((d != 0).sum())
                                                                                        for d in dense)
    mist_params = {id(m.mist_values[adapter_name]) for m in layers} | {id(d) for d in dense}
    base_params = sum(p.numel() for p in model.parameters() if id(p) not in mist_params)
    return {"modules": len(layers), "targeted_weights": targeted, "selected_entries": selected,
            "dense_entries": sum(d.numel() for d in dense), "changed_entries": changed,
            "base_parameters": base_params}


def add_mist_model_card(model: Any, readme_path: str, extra_tags: list[str] | None = None) -> None:
    """Add MIST's tags and facts (targets, density, share of base weights changed) to PEFT's model card."""
    card = ModelCard.load(readme_path)
    tags = set(card.data.tags or []) | {"mist", "peft", "sparse-delta"} | set(extra_tags or [])
    card.data.tags = sorted(tags)
    card.data.library_name = "peft"
    lines = [CARD_HEADING, "",
             "Sparse deltas over selected entries of frozen base weights, trained with MIST (Mutual "
             "Information-guided Sparse Tuning, arXiv 2505.19943) using [mist-peft](https://pypi.org/project/mist-peft/). "
             "Load with `import mist_peft` before `PeftModel.from_pretrained`.", "",
             "| adapter | targets | density | granularity | selection | grad_drop | selected entries | "
             "changed entries | share of base weights changed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, config in model.peft_config.items():
        if not is_mist_config(config):
            continue
        s = adapter_stats(model, name)
        targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(
            sorted(config.target_modules))
        share = s["changed_entries"] / max(1, s["base_parameters"])
        dense = f" + {s['dense_entries']:,} bias/norm" if s["dense_entries"] else ""
        lines.append(f"| {name} | {targets} | {config.density} | {config.granularity} | {config.selection} | "
                     f"{config.grad_drop} | {s['selected_entries']:,} of {s['targeted_weights']:,}{dense} | "
                     f"{s['changed_entries']:,} | {100 * share:.4f}% |")
    text = card.text
    if CARD_HEADING in text:
        text = text[: text.index(CARD_HEADING)].rstrip() + "\n"
    card.text = text + "\n" + "\n".join(lines) + "\n"
    card.save(readme_path)


def push_to_hub(model: Any, repo_id: str, *, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                tags: list[str] | None = None, safe_serialization: bool = True, use_temp_dir: bool | None = None) -> Any:
    """Upload the adapter folder `save_pretrained` writes (sparse weights, config, PEFT model card).

    Takes the arguments of transformers' `push_to_hub`, plus `safe_serialization` (False writes
    `adapter_model.bin`) and `use_temp_dir` (False saves into the local folder `./<repo name>` and keeps it).
    A `revision` branch is created when it does not exist. PEFT writes an adapter as one file, so
    `max_shard_size` has no effect on it (as with every PEFT adapter).
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model").repo_id
    with contextlib.ExitStack() as stack:
        if use_temp_dir is False:
            folder = repo_id.split("/")[-1]
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
        model.save_pretrained(folder, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
        if tags:
            add_mist_model_card(model, os.path.join(folder, "README.md"), extra_tags=tags)
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload MIST adapter",
                                 commit_description=commit_description, token=token, revision=revision,
                                 create_pr=create_pr, repo_type="model")
