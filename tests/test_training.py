"""Tuning with the MI loss: the Accelerate loop on real data, the Trainer, and a real 2-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader

import mist_peft
from mist_peft import MISTConfig
from mist_peft.scoring import adapter_layers
from mist_peft.training import MISTTrainingConfig, train_mist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clinc_minilm():
    from conftest import CLINC_DIR
    from transformers import AutoModel, AutoTokenizer

    from mist_peft.assets import load_clinc150, minilm_path
    from mist_peft.encoders import text_collate

    if not (CLINC_DIR / "data_full.json").exists():
        pytest.skip("CLINC150 not found beside the repo")
    path = minilm_path()
    data = load_clinc150(CLINC_DIR)["train"].filter(lambda r: r["label"] < 15).shuffle(seed=0).select(range(384))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return lambda: AutoModel.from_pretrained(path), data, text_collate(tokenizer, 32)


def fixed_loss(objective, batches, seed=123):
    """MI loss on fixed batches with fixed dropout masks (views need train mode)."""
    torch.manual_seed(seed)
    objective.train()
    with torch.no_grad():
        return sum(float(objective(b)) for b in batches) / len(batches)


def test_mi_loss_falls_on_clinc150_with_packaged_minilm(clinc_minilm):
    make, data, collate = clinc_minilm
    torch.manual_seed(0)
    model = get_peft_model(make(), MISTConfig(target_modules="all-linear", exclude_modules=["pooler.dense"]))
    snapshot = {n: m.get_base_layer().weight.detach().clone() for n, m in adapter_layers(model, "default").items()}
    loader = DataLoader(data, batch_size=32, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    held_out = [collate([data[i] for i in range(j, j + 32)]) for j in (0, 32)]
    from mist_peft.training import build_objective

    config = MISTTrainingConfig(max_steps=24, max_score_batches=4)
    torch.manual_seed(0)
    head = build_objective(model, config).head
    objective = build_objective(model, config, head=head)
    before = fixed_loss(objective, held_out)
    result = train_mist(model, loader, head=head, config=config)
    after = fixed_loss(objective, held_out)
    assert after < before - 0.5, (before, after)
    shares = [h["kept_share"] for h in result["history"]]
    assert abs(sum(shares) / len(shares) - 0.1) < 0.005  # 1 - grad_drop of ~530k selected entries
    # entries outside the mask are bit-identical to the base
    for name, layer in adapter_layers(model, "default").items():
        weight = layer.get_base_layer().weight
        assert torch.equal(weight, snapshot[name])
        effective = weight + layer.get_delta_weight("default")
        outside = torch.ones(weight.numel(), dtype=torch.bool)
        outside[layer.mist_indices["default"]] = False
        assert torch.equal(effective.reshape(-1)[outside], weight.reshape(-1)[outside])


def test_changed_share_of_selected_entries_per_step_is_one_minus_grad_drop(clinc_minilm):
    make, data, collate = clinc_minilm
    model = get_peft_model(make(), MISTConfig(target_modules="all-linear", exclude_modules=["pooler.dense"],
                                              selection="magnitude"))
    layers = adapter_layers(model, "default")
    loader = DataLoader(data, batch_size=16, collate_fn=collate)
    shares = []
    for _ in range(2):
        before = {n: m.mist_values["default"].detach().clone() for n, m in layers.items()}
        train_mist(model, loader, config=MISTTrainingConfig(max_steps=1))
        moved = sum(int((m.mist_values["default"].detach() != before[n]).sum()) for n, m in layers.items())
        shares.append(moved / sum(v.numel() for v in before.values()))
    assert all(abs(s - 0.1) < 0.01 for s in shares), shares  # tolerance: 1 point of the selected entries


def test_trainer_integration_selects_tunes_logs_and_saves(tmp_path):
    from transformers import TrainingArguments

    from mist_peft.training import MISTTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 120, (10,), generator=g), "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": int(i % 3)} for i in range(32)]

    def collate(batch):
        return {"input_ids": torch.stack([r["input_ids"] for r in batch]),
                "attention_mask": torch.stack([r["attention_mask"] for r in batch]),
                "labels": torch.tensor([r["labels"] for r in batch])}

    base = tiny_bert()
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, MISTConfig(target_modules=["query", "value"], density=0.2, grad_drop=0.5))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=2, report_to=[], remove_unused_columns=False,
                             save_strategy="no", use_cpu=True)
    trainer = MISTTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                          mist_config=MISTTrainingConfig(max_score_batches=2))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(abs(entry["mist_kept_share"] - 0.5) < 0.1 for entry in logs)
    for name, layer in adapter_layers(model, "default").items():
        weight = snapshot[name + ".weight"]
        assert torch.equal(layer.get_base_layer().weight, weight)
        assert layer.mist_values["default"].numel() == round(0.2 * weight.numel())
        assert int((layer.mist_values["default"] != 0).sum()) > 0
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "mist_head.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "final")
    batch = collate(rows[:4])
    with torch.no_grad():
        model.eval()
        assert torch.equal(reloaded(input_ids=batch["input_ids"]).last_hidden_state,
                           model(input_ids=batch["input_ids"]).last_hidden_state)


def test_fsdp_is_refused_with_what_to_do():
    from accelerate.utils import DistributedType

    class FakeFSDP:
        distributed_type = DistributedType.FSDP

    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], selection="magnitude"))
    with pytest.raises(ValueError, match="FSDP.*multi_gpu"):
        train_mist(model, [], accelerator=FakeFSDP())


@pytest.mark.slow
def test_two_process_run_has_identical_masks_subsets_and_adapters(tmp_path, clinc_minilm):
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "examples" / "train_mist.py"), "--max-steps", "4", "--score-batches", "2",
           "--batch-size", "16", "--classes", "15", "--output-dir", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and len(summary["process_fingerprints"]) == 2
    first, second = summary["process_fingerprints"]
    assert first == second and len(first["kept_per_step"]) == 4
    assert summary["processes_agree"]
    assert result.stdout.count("Saved MIST adapter to") == 1  # only the main process saves and reports
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "train_summary.json"]
    make, *_ = clinc_minilm
    loaded = PeftModel.from_pretrained(make(), out)
    assert mist_peft.training.state_fingerprint(loaded)["values"] == first["values"]
