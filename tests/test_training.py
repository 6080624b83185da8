"""Tuning with the MI loss: the Accelerate loop on real data, the Trainer, and a real 2-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import collate_rows, synthetic_rows, tiny_bert
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import TrainerCallback

import mist_peft
from mist_peft import MISTConfig
from mist_peft.scoring import adapter_layers
from mist_peft.training import MISTTrainingConfig, train_mist
from mist_peft.views import FunctionViews

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
        layer.restore_base_weight()  # the in-place engine holds W + delta in the base weight while training
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
        layer.restore_base_weight()  # the in-place engine holds W + delta in the base weight while training
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
def test_two_process_run_has_identical_masks_subsets_and_adapters(tmp_path):
    """A real 2-process gloo run of the example on a small generated table (no data beside the repo needed)."""
    from transformers import AutoModel

    from mist_peft.assets import minilm_path

    words = [["book", "flight", "ticket", "plane"], ["weather", "rain", "sunny", "cold"],
             ["play", "song", "music", "album"]]
    g = torch.Generator().manual_seed(0)
    lines = ["text,label"]
    for i in range(96):
        label = i % 3
        picks = torch.randint(0, 4, (5,), generator=g).tolist()
        lines.append(" ".join(words[label][j] for j in picks) + f",{label}")
    (tmp_path / "intents.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "examples" / "train_mist.py"), "--data", str(tmp_path / "intents.csv"), "--max-steps", "4",
           "--score-batches", "2", "--batch-size", "8", "--classes", "0", "--output-dir", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and len(summary["process_fingerprints"]) == 2
    first, second = summary["process_fingerprints"]
    assert first == second and len(first["kept_per_step"]) == 4
    assert len(set(first["kept_per_step"])) == 4  # a new dropout subset at every step
    assert summary["processes_agree"]
    assert result.stdout.count("Saved MIST adapter to") == 1  # only the main process saves and reports
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "train_summary.json"]
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path()), out)
    assert mist_peft.training.state_fingerprint(loaded)["values"] == first["values"]


# ------------------------------------------------------------------ synthetic data: no files beside the repo
def bert_without_dropout(seed: int = 0):
    """Tiny BERT with random weights and no dropout, so runs that see the same batches are deterministic."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)).eval()


def shifted_views(batch):
    """Deterministic second view (tokens rolled by one), so two runs on the same batches are identical."""
    view2 = {**batch, "input_ids": torch.roll(batch["input_ids"], 1, dims=1)}
    return batch, view2


def mist_state(model):
    return {n: (m.mist_indices["default"].clone(), m.mist_values["default"].detach().clone(), m.mist_step)
            for n, m in adapter_layers(model, "default").items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]), name
        torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-6, atol=1e-7), name
        assert a[name][2] == b[name][2], name


def test_train_mist_on_synthetic_data_selects_tunes_and_keeps_the_rest():
    from mist_peft.training import build_objective

    rows = synthetic_rows(96)
    model = get_peft_model(bert_without_dropout(), MISTConfig(target_modules=["query", "value", "dense"],
                                                              density=0.1, grad_drop=0.5))
    base = {n: m.get_base_layer().weight.detach().clone() for n, m in adapter_layers(model, "default").items()}
    config = MISTTrainingConfig(max_steps=30, max_score_batches=2, lr=1e-2, log_kept_digest=True)
    views = FunctionViews(shifted_views)
    torch.manual_seed(0)
    head = build_objective(model, config).head
    held_out = [collate_rows(rows[i:i + 24]) for i in (0, 24)]
    objective = build_objective(model, config, head=head, views=views)
    before = fixed_loss(objective, held_out)
    result = train_mist(model, DataLoader(rows, batch_size=24, shuffle=True, collate_fn=collate_rows,
                                          generator=torch.Generator().manual_seed(0)),
                        head=head, config=config, views=views)
    after = fixed_loss(objective, held_out)
    assert after < before - 0.3, (before, after)
    assert result["steps"] == 30 and len(result["history"]) == 30
    shares = [h["kept_share"] for h in result["history"]]
    assert abs(sum(shares) / len(shares) - 0.5) < 0.02
    assert len({h["kept_digest"] for h in result["history"]}) == 30  # a new subset every step
    for name, layer in adapter_layers(model, "default").items():
        assert layer.mist_values["default"].numel() == round(0.1 * base[name].numel())  # MI-Fisher selected
        layer.restore_base_weight()  # the in-place engine holds W + delta in the base weight while training
        assert torch.equal(layer.get_base_layer().weight, base[name])
        effective = base[name] + layer.get_delta_weight("default")
        outside = torch.ones(base[name].numel(), dtype=torch.bool)
        outside[layer.mist_indices["default"]] = False
        assert torch.equal(effective.reshape(-1)[outside], base[name].reshape(-1)[outside])


def _train_mist_with_accumulation(accumulation: int, batches: int):
    from accelerate import Accelerator

    rows = synthetic_rows(8) * batches  # every batch holds the same 8 rows
    model = get_peft_model(bert_without_dropout(), MISTConfig(target_modules=["query", "value"], density=0.2,
                                                              grad_drop=0.5, selection="magnitude"))
    torch.manual_seed(0)
    result = train_mist(model, DataLoader(rows, batch_size=8, collate_fn=collate_rows),
                        config=MISTTrainingConfig(optimizer="sgd", momentum=0.0, lr=0.5, log_kept_digest=True),
                        accelerator=Accelerator(gradient_accumulation_steps=accumulation, cpu=True),
                        views=FunctionViews(shifted_views))
    return result, mist_state(model)


def test_train_mist_honours_accelerate_gradient_accumulation():
    """2 optimizer steps on batch R, or on (R, R) accumulated: the same gradients, so the same run."""
    plain, plain_state = _train_mist_with_accumulation(1, 2)
    accumulated, accumulated_state = _train_mist_with_accumulation(2, 4)
    assert plain["steps"] == accumulated["steps"] == 2
    assert all(s == 2 for *_, s in accumulated_state.values())  # the dropout clock counts optimizer steps
    assert [h["kept_digest"] for h in plain["history"]] == [h["kept_digest"] for h in accumulated["history"]]
    for a, b in zip(plain["history"], accumulated["history"], strict=True):
        assert a["mi_loss"] == pytest.approx(b["mi_loss"], rel=1e-6)
    assert_same_state(plain_state, accumulated_state)
    assert any(bool((v != 0).any()) for _, v, _ in plain_state.values())


def _trainer(tmp_path, model, rows, **args):
    from transformers import TrainingArguments

    from mist_peft.training import MISTTrainer

    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=0.5, logging_steps=1,
                    report_to=[], remove_unused_columns=False, save_strategy="no", use_cpu=True,
                    train_sampling_strategy="sequential", seed=0)
    return MISTTrainer(model=model, args=TrainingArguments(**{**defaults, **args}), train_dataset=rows,
                       data_collator=collate_rows, views=FunctionViews(shifted_views),
                       mist_config=MISTTrainingConfig(optimizer="sgd", momentum=0.0, max_score_batches=1))


def _mist_model():
    return get_peft_model(bert_without_dropout(), MISTConfig(target_modules=["query", "value"], density=0.2,
                                                             grad_drop=0.5))


def test_trainer_loss_and_update_do_not_depend_on_gradient_accumulation(tmp_path):
    """One step on batch R, or on (R, R) accumulated: same logged loss, grad norm and values, as with a stock
    Trainer and a mean loss."""
    rows = synthetic_rows(8)
    runs = {}
    for accumulation in (1, 2):
        model = _mist_model()
        trainer = _trainer(tmp_path / str(accumulation), model, rows * accumulation, max_steps=1,
                           gradient_accumulation_steps=accumulation)
        trainer.train()
        log = next(e for e in trainer.state.log_history if "loss" in e)
        runs[accumulation] = (log["loss"], log["grad_norm"], mist_state(model))
    assert runs[2][0] == pytest.approx(runs[1][0], rel=1e-5)
    assert runs[2][1] == pytest.approx(runs[1][1], rel=1e-5)
    assert_same_state(runs[1][2], runs[2][2])


def test_trainer_resume_continues_from_the_saved_head_values_and_dropout_clock(tmp_path):
    rows = synthetic_rows(32)
    full = _mist_model()
    trainer = _trainer(tmp_path / "full", full, rows, max_steps=4, save_strategy="steps", save_steps=2,
                       optim="sgd")
    trainer.train()
    expected = mist_state(full)
    expected_head = {k: v.clone() for k, v in trainer.objective.head.state_dict().items()}
    assert all(p.grad is None for p in trainer.objective.head.parameters())  # zeroed after every step
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "mist_head.safetensors").exists()
    resumed_model = _mist_model()
    resumed = _trainer(tmp_path / "resumed", resumed_model, rows, max_steps=4, optim="sgd")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_state(expected, mist_state(resumed_model))
    for k, v in resumed.objective.head.state_dict().items():
        torch.testing.assert_close(v, expected_head[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="has no mist_head.safetensors"):
        _trainer(tmp_path / "x", _mist_model(), rows, max_steps=4).train(resume_from_checkpoint=str(tmp_path))


def test_mist_callback_on_a_plain_trainer_redraws_per_step_and_keeps_dropped_entries():
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    from mist_peft.training import MISTCallback

    torch.manual_seed(0)
    config = bert_without_dropout().config
    config.num_labels = 3
    base = BertForSequenceClassification(config)
    model = get_peft_model(base, MISTConfig(target_modules=["query", "value"], density=0.2, grad_drop=0.5,
                                            selection="magnitude", modules_to_save=["classifier"]))
    seen: list[dict] = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append({n: m.mist_values["default"].detach().clone()
                         for n, m in adapter_layers(model, "default").items()})

    args = TrainingArguments(output_dir="unused", max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                             weight_decay=0.1, report_to=[], save_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=synthetic_rows(24), data_collator=collate_rows,
            callbacks=[MISTCallback(), Watch()]).train()
    layers = adapter_layers(model, "default")
    assert all(m.mist_step == 3 for m in layers.values())  # the clock advanced once per optimizer step
    total = sum(v.numel() for v in seen[0].values())
    changed = sum(int((m.mist_values["default"] != seen[0][n]).sum()) for n, m in layers.items())
    assert abs(changed / total - (1 - 0.5**3)) < 0.05  # three independent halves were kept, AdamW moved them
    # In the last step only its kept half moved; the rest (with AdamW momentum and weight decay) did not.
    moved_last = sum(int((m.mist_values["default"] != seen[-1][n]).sum()) for n, m in layers.items())
    assert abs(moved_last / total - 0.5) < 0.05


def test_head_file_round_trip_and_old_files_without_a_clock_warn(tmp_path):
    from safetensors.torch import save_file

    from mist_peft.training import load_head, save_head

    model = _mist_model()
    for m in adapter_layers(model, "default").values():
        m.mist_step = 7
    head = torch.nn.Linear(4, 2)
    save_head(head, model, tmp_path / "h.safetensors")
    fresh, other = torch.nn.Linear(4, 2), _mist_model()
    load_head(fresh, other, tmp_path / "h.safetensors")
    assert torch.equal(fresh.weight, head.weight) and all(m.mist_step == 7 for m in adapter_layers(other, "default").values())
    save_file({k: v.detach() for k, v in head.state_dict().items()}, tmp_path / "old.safetensors")
    with pytest.warns(UserWarning, match="no dropout clock"):
        load_head(torch.nn.Linear(4, 2), _mist_model(), tmp_path / "old.safetensors")
