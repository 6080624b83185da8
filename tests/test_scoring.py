"""MI-Fisher selection: shares, difference from magnitude, stability, cache, exclusion."""

import pytest
import torch
from conftest import tiny_bert
from peft import get_peft_model

from mist_peft import MISTConfig
from mist_peft.encoders import FeatureEncoder
from mist_peft.objectives import MIObjective
from mist_peft.scoring import adapter_layers, select_mi_fisher
from mist_peft.selection import count_for


def batches(n=4, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 120, (batch, 12), generator=g),
             "attention_mask": torch.ones(batch, 12, dtype=torch.long),
             "labels": torch.randint(0, 3, (batch,), generator=g)} for _ in range(n)]


def scored(seed=0, **kw):
    torch.manual_seed(seed)
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value", "dense"], **kw))
    torch.manual_seed(seed)
    objective = MIObjective(FeatureEncoder(model))
    torch.manual_seed(seed)
    chosen = select_mi_fisher(model, objective, batches())
    return model, chosen


def test_per_tensor_share_equals_density():
    model, chosen = scored(density=0.1)
    for name, layer in adapter_layers(model, "default").items():
        numel = layer.get_base_layer().weight.numel()
        assert layer.mist_values["default"].numel() == count_for(numel, 0.1) == chosen[name].numel()
    assert model.get_nb_trainable_parameters()[0] > 0
    assert all(not m.get_base_layer().weight.requires_grad and m.get_base_layer().weight.grad is None
               for m in adapter_layers(model, "default").values())


def test_global_share_equals_density():
    model, chosen = scored(density=0.1, granularity="global")
    total = sum(m.get_base_layer().weight.numel() for m in adapter_layers(model, "default").values())
    assert sum(c.numel() for c in chosen.values()) == round(0.1 * total)


def test_differs_from_magnitude_and_is_stable_for_a_fixed_seed_and_data():
    model_a, chosen_a = scored(seed=0)
    _, chosen_b = scored(seed=0)
    assert all(torch.equal(chosen_a[n], chosen_b[n]) for n in chosen_a)
    magnitude = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value", "dense"],
                                                       selection="magnitude"))
    mag = {n: m.mist_indices["default"] for n, m in adapter_layers(magnitude, "default").items()}
    overlap = sum(int(torch.isin(chosen_a[n], mag[n]).sum()) for n in chosen_a)
    assert overlap / sum(c.numel() for c in chosen_a.values()) < 0.5


def test_cache_file_is_reused(tmp_path):
    cache = tmp_path / "scores.pt"
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"]))
    objective = MIObjective(FeatureEncoder(model))
    torch.manual_seed(0)
    first = select_mi_fisher(model, objective, batches(), cache_file=cache)
    assert cache.exists()

    class Exploding:
        def __iter__(self):
            raise AssertionError("the cached scores should have been used")

    second = select_mi_fisher(model, objective, Exploding(), cache_file=cache)
    assert all(torch.equal(first[n], second[n]) for n in first)
    other = get_peft_model(tiny_bert(), MISTConfig(target_modules=["value"]))
    with pytest.raises(ValueError, match="other weights"):
        select_mi_fisher(other, MIObjective(FeatureEncoder(other)), Exploding(), cache_file=cache)


def test_excluded_entries_are_never_selected():
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], density=0.2))
    objective = MIObjective(FeatureEncoder(model))
    torch.manual_seed(0)
    free = select_mi_fisher(model, objective, batches())
    exclude = {}
    for name, idx in free.items():
        mask = torch.zeros(model.get_submodule("base_model.model." + name).get_base_layer().weight.shape,
                           dtype=torch.bool)
        mask.view(-1)[idx[: idx.numel() // 2]] = True
        exclude[name] = mask
    torch.manual_seed(0)
    again = select_mi_fisher(model, objective, batches(), exclude=exclude)
    for name, idx in again.items():
        assert not exclude[name].view(-1)[idx].any()
        assert idx.numel() == free[name].numel()


def test_empty_dataloader_is_an_error():
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="no batch"):
        select_mi_fisher(model, MIObjective(FeatureEncoder(model)), [])


def test_cross_task_frozen_set_and_overlap_decay():
    from mist_peft.scoring import CrossTaskState

    state = CrossTaskState(frozen_quantile=0.99, overlap_decay=0.9)
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], density=0.2))
    objective = MIObjective(FeatureEncoder(model))
    torch.manual_seed(0)
    first = select_mi_fisher(model, objective, batches(), cross_task=state)
    layers = adapter_layers(model, "default")
    assert all("default" not in m.mist_grad_scale for m in layers.values())  # no earlier task yet
    for name, frozen in state.frozen.items():
        n = frozen.numel()  # at or above the interpolated 0.99 quantile: the top n - floor(0.99 (n - 1)) - 1
        assert int(frozen.sum()) == n - int(0.99 * (n - 1)) - 1
        assert frozen.view(-1)[first[name]].sum() == frozen.sum()  # the top scores were selected
    frozen_after_first = {n: f.clone() for n, f in state.frozen.items()}
    torch.manual_seed(0)
    second = select_mi_fisher(model, objective, batches(seed=1), cross_task=state)
    for name, idx in second.items():
        assert not frozen_after_first[name].view(-1)[idx].any()
        previous = torch.isin(idx, first[name])
        scale = layers[name].mist_grad_scale["default"]
        assert torch.allclose(scale[previous], torch.tensor(0.9)) and torch.all(scale[~previous] == 1.0)
        assert previous.any() and (~previous).any()


def test_frozen_quantile_one_keeps_the_maximum_and_its_ties():
    from mist_peft.scoring import CrossTaskState, at_or_above_quantile

    scores = torch.tensor([[0.5, 3.0, 1.0], [3.0, 0.1, 2.9]])
    assert at_or_above_quantile(scores, 1.0).tolist() == [[False, True, False], [True, False, False]]
    assert at_or_above_quantile(scores, 0.0).all()
    assert int(at_or_above_quantile(torch.arange(10.0), 0.5).sum()) == 5  # >= 4.5
    with pytest.raises(ValueError, match="frozen_quantile"):
        CrossTaskState(frozen_quantile=1.5)
    with pytest.raises(ValueError, match="overlap_decay"):
        CrossTaskState(overlap_decay=0.0)


def test_scores_are_the_mean_of_squared_minibatch_gradients():
    """Against autograd by hand: each batch's full gradient of the MI loss, squared, averaged over batches."""
    from mist_peft.scoring import mi_fisher_scores

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"]))
    objective = MIObjective(FeatureEncoder(model))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    layers = adapter_layers(model, "default")
    data = batches(n=3)
    with pytest.warns(UserWarning, match="identical"):
        scores = mi_fisher_scores(objective, data, layers)
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    expected = {name: torch.zeros_like(w) for name, w in weights.items()}
    objective.train()
    for w in weights.values():
        w.requires_grad_(True)
    for batch in data:
        grads = torch.autograd.grad(objective(batch), list(weights.values()))
        for (name, _), g in zip(weights.items(), grads, strict=True):
            expected[name] += g.pow(2) / len(data)
    for w in weights.values():
        w.requires_grad_(False)
    for name in weights:
        assert scores[name].abs().sum() > 0
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-12)
