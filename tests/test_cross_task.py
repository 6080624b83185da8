"""The reference's cross-task state (frozen set, overlap decay) as `MISTConfig` fields: validation, the state
that carries it between tasks, agreement between the two, checkpoints, and the loops that select."""

import pytest
import torch
from conftest import collate_rows, synthetic_rows, tiny_bert
from peft import PeftModel, get_peft_model

from mist_peft import MISTConfig
from mist_peft.encoders import FeatureEncoder
from mist_peft.objectives import MIObjective
from mist_peft.scoring import CrossTaskState, adapter_layers, select_mi_fisher
from mist_peft.training import MISTTrainingConfig, train_mist

CROSS = {"frozen_quantile": 0.99, "overlap_decay": 0.9}


def batches(seed, n=3, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 120, (batch, 12), generator=g),
             "attention_mask": torch.ones(batch, 12, dtype=torch.long),
             "labels": torch.randint(0, 3, (batch,), generator=g)} for _ in range(n)]


def two_tasks(config_fields: dict, state: CrossTaskState):
    """Select on two tasks, each on a fresh MIST model over the same base (the merge-and-rewrap flow)."""
    base = tiny_bert()
    chosen, scales, frozen = [], [], []
    for task in range(2):
        model = get_peft_model(base, MISTConfig(target_modules=["query"], density=0.2, **config_fields))
        torch.manual_seed(task)
        chosen.append(select_mi_fisher(model, MIObjective(FeatureEncoder(model)), batches(task), cross_task=state))
        scales.append({n: m.mist_grad_scale.get("default") for n, m in adapter_layers(model, "default").items()})
        frozen.append({n: f.clone() for n, f in state.frozen.items()})
        base = model.merge_and_unload()
    return chosen, scales, frozen, model


@pytest.mark.parametrize("fields, match", [
    ({"frozen_quantile": 1.5}, "frozen_quantile"),
    ({"frozen_quantile": True}, "frozen_quantile"),
    ({"overlap_decay": 0.0}, "overlap_decay"),
    ({"overlap_decay": "0.9"}, "overlap_decay"),
    ({"overlap_decay": 0.9, "selection": "magnitude"}, "selection='mi_fisher'"),
    ({"frozen_quantile": 1.0, "selection": "fisher"}, "selection='mi_fisher'"),
])
def test_config_rejects_bad_cross_task_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        MISTConfig(**fields)


def test_config_fields_select_exactly_like_an_explicit_state():
    configured = CrossTaskState.from_config(MISTConfig(**CROSS))
    chosen_a, scales_a, frozen_a, _ = two_tasks(CROSS, configured)
    chosen_b, scales_b, frozen_b, last_b = two_tasks({}, CrossTaskState(**CROSS))
    for a, b in zip(chosen_a + scales_a + frozen_a, chosen_b + scales_b + frozen_b, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)
    # the second task never re-selects an entry frozen after the first, and decays the re-selected ones
    for name, idx in chosen_a[1].items():
        assert frozen_a[0][name].any() and not frozen_a[0][name].view(-1)[idx].any()
        again = torch.isin(idx, chosen_a[0][name])
        assert again.any() and torch.allclose(scales_a[1][name][again], torch.tensor(0.9))
        assert torch.all(scales_a[1][name][~again] == 1.0)
    # a config without the fields records the state's parameters, so the saved adapter says what was used
    assert (last_b.peft_config["default"].frozen_quantile, last_b.peft_config["default"].overlap_decay) == (0.99, 0.9)


def test_config_fields_without_a_state_are_an_error_naming_the_fix():
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], density=0.2, **CROSS))
    with pytest.raises(ValueError, match=r"CrossTaskState.from_config\(config\)"):
        select_mi_fisher(model, MIObjective(FeatureEncoder(model)), batches(0))
    loader = torch.utils.data.DataLoader(synthetic_rows(16), batch_size=8, collate_fn=collate_rows)
    with pytest.raises(ValueError, match="cross_task=state"):
        train_mist(model, loader, config=MISTTrainingConfig(max_steps=1, max_score_batches=1))


def test_a_state_that_disagrees_with_the_config_is_an_error():
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], density=0.2, **CROSS))
    with pytest.raises(ValueError, match="frozen_quantile=1.0, overlap_decay=0.9 but the adapter's MISTConfig"):
        select_mi_fisher(model, MIObjective(FeatureEncoder(model)), batches(0),
                         cross_task=CrossTaskState(frozen_quantile=1.0, overlap_decay=0.9))


def test_fields_survive_save_and_load(tmp_path):
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], density=0.2, **CROSS))
    select_mi_fisher(model, MIObjective(FeatureEncoder(model)), batches(0), cross_task=CrossTaskState(**CROSS))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).peft_config["default"]
    assert (loaded.frozen_quantile, loaded.overlap_decay) == (0.99, 0.9)


def test_train_mist_and_the_trainer_carry_the_state_across_tasks(tmp_path):
    from transformers import TrainingArguments

    from mist_peft.training import MISTTrainer

    state = CrossTaskState.from_config(MISTConfig(**CROSS))
    loader = torch.utils.data.DataLoader(synthetic_rows(16), batch_size=8, collate_fn=collate_rows)
    first = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], density=0.2, **CROSS))
    torch.manual_seed(0)
    train_mist(first, loader, config=MISTTrainingConfig(max_steps=2, max_score_batches=2), cross_task=state)
    first_chosen = {n: m.mist_indices["default"].clone() for n, m in adapter_layers(first, "default").items()}
    frozen = {n: f.clone() for n, f in state.frozen.items()}
    assert frozen and all(f.any() for f in frozen.values())

    second = get_peft_model(first.merge_and_unload(), MISTConfig(target_modules=["query"], density=0.2, **CROSS))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, report_to=[],
                             remove_unused_columns=False, save_strategy="no", use_cpu=True)
    torch.manual_seed(1)
    MISTTrainer(model=second, args=args, train_dataset=synthetic_rows(16, seed=1), data_collator=collate_rows,
                mist_config=MISTTrainingConfig(max_score_batches=2), cross_task=state).train()
    for name, layer in adapter_layers(second, "default").items():
        idx = layer.mist_indices["default"]
        assert not frozen[name].view(-1)[idx].any()  # frozen after task 1: never selected again
        again = torch.isin(idx, first_chosen[name])
        assert torch.allclose(layer.mist_grad_scale["default"][again], torch.tensor(0.9))
