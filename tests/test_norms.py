"""`tune_biases_and_norms`: dense deltas over every bias of the MIST layers and every LayerNorm/RMSNorm
(the reference's "always selectable, dense mask", still under gradient dropout and strict sparsity)."""

import json

import pytest
import torch
from conftest import MODELS, collate_rows, model_output, synthetic_rows, tiny_inputs, train
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from mist_peft import MISTConfig
from mist_peft import layer as layer_mod
from mist_peft.layer import DENSE_DELTAS, Norm, count_for
from mist_peft.selection import mist_layers

TARGETS = {"bert": ["query", "value", "dense", "word_embeddings"], "gpt2": ["c_attn", "c_proj", "c_fc"],
           "vit": "all-linear", "cnn": ["conv1", "conv2", "head"]}
KINDS = list(TARGETS)


def make(kind, seed=0, **kw):
    base = MODELS[kind](seed)
    snapshot = {k: v.detach().clone() for k, v in base.state_dict().items()}
    inputs = tiny_inputs(kind)
    with torch.no_grad():
        reference = model_output(base, inputs)
    kw.setdefault("selection", "random")
    kw.setdefault("tune_biases_and_norms", True)
    model = get_peft_model(base, MISTConfig(target_modules=TARGETS[kind], **kw))
    return model, inputs, reference, snapshot


def all_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, layer_mod.MISTLayer)}


def dense(model, adapter="default"):
    """(module name, layer, kind, delta) for every dense delta of the adapter."""
    return [(n, m, kind, getattr(m, kind)[adapter]) for n, m in all_layers(model).items()
            for kind in DENSE_DELTAS if adapter in getattr(m, kind)]


def out(model, inputs):
    with torch.no_grad():
        return model_output(model, inputs)


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_entries_are_selected_weights_plus_every_bias_and_norm_entry(kind):
    plain = MODELS[kind]()
    norms = [m for m in plain.modules() if isinstance(m, nn.LayerNorm)]
    norm_entries = sum(p.numel() for m in norms for p in m.parameters())
    model, *_ = make(kind, density=0.1)
    layers = mist_layers(model, "default")
    weights = sum(count_for(m.get_base_layer().weight.numel(), 0.1) for m in layers.values())
    biases = sum(m.get_base_layer().bias.numel() for m in layers.values()
                 if getattr(m.get_base_layer(), "bias", None) is not None)
    assert biases > 0 and (norm_entries > 0) == (kind != "cnn")
    assert sum(isinstance(m, Norm) for m in model.modules()) == len(norms)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == weights + biases + norm_entries
    # the dense deltas are never scored: a selection leaves them whole and at zero
    assert all(d.numel() == getattr(m.get_base_layer(), DENSE_DELTAS[k]).numel() and not d.any()
               for _, m, k, d in dense(model))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "cnn"])
@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.AdamW, {"weight_decay": 0.1}),
                                        (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01})])
def test_grad_drop_only_kept_bias_and_norm_entries_move_value_and_state(kind, opt_cls, kw):
    model, inputs, *_ = make(kind, grad_drop=0.9)
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=1e-2, **kw)
    model.train()
    moved = kept_total = total = 0
    for step in range(4):
        model_output(model, inputs).pow(2).mean().backward()
        before = []
        for _, m, k, d in dense(model):
            at, kept = m.mist_dense_kept["default"][k]
            assert at == m.mist_step == step
            assert kept.numel() == layer_mod.kept_count(d.numel(), 0.9, layer_mod.dropout_seed(
                0, m.mist_key ^ layer_mod.zlib.crc32(k.encode()), step))
            state = {s: v.clone() for s, v in opt.state.get(d, {}).items() if torch.is_tensor(v) and v.shape == d.shape}
            before.append((d, kept, d.detach().clone(), state))
        opt.step()
        opt.zero_grad()
        for d, kept, value, state in before:
            dropped = torch.ones(d.numel(), dtype=torch.bool)
            dropped[kept] = False
            assert torch.equal(d.detach()[dropped], value[dropped])
            for s, new in opt.state[d].items():
                if torch.is_tensor(new) and new.shape == d.shape:
                    old = state.get(s, torch.zeros_like(new))
                    assert torch.equal(new[dropped], old[dropped]), s
            moved += int((d.detach()[kept] != value[kept]).sum())
            kept_total += kept.numel()
            total += d.numel()
    assert moved >= 0.9 * kept_total > 0  # kept entries do move
    assert 0.05 < kept_total / total < 0.2  # about 1 - grad_drop of the entries per step


def test_kept_share_and_digest_count_the_dense_draws():
    from mist_peft.training import kept_digest, kept_share

    model, inputs, *_ = make("bert", grad_drop=0.9, density=0.05)
    model.train()
    model_output(model, inputs).pow(2).mean().backward()
    sparse = [(m.mist_values["default"].numel(), m.mist_kept["default"][1]) for m in all_layers(model).values()
              if "default" in m.mist_values]
    dense_draws = [(d.numel(), m.mist_dense_kept["default"][kind][1]) for _, m, kind, d in dense(model)]
    assert dense_draws and all(kept is not None for _, kept in sparse + dense_draws)
    expected = sum(k.numel() for _, k in sparse + dense_draws) / sum(n for n, _ in sparse + dense_draws)
    assert kept_share(model, "default") == pytest.approx(expected, rel=1e-12)
    digest = kept_digest(model, "default")
    _, m, kind, _ = dense(model)[0]
    step, kept = m.mist_dense_kept["default"][kind]
    m.mist_dense_kept["default"][kind] = (step, kept[:-1])  # another dense draw must give another digest
    assert kept_digest(model, "default") != digest


def test_bias_and_norm_draws_differ_from_each_other_and_from_the_weight_draw():
    model, inputs, *_ = make("bert", grad_drop=0.5, density=1.0)
    model.train()
    model_output(model, inputs).pow(2).mean().backward()
    norms = [m for m in model.modules() if isinstance(m, Norm)]
    assert any(not torch.equal(m.mist_dense_kept["default"]["mist_norm_values"][1],
                               m.mist_dense_kept["default"]["mist_bias_values"][1]) for m in norms)
    # the bias draw is salted: it is not the draw the weight values would get for a tensor of its size
    linears = [m for m in mist_layers(model, "default").values() if "default" in m.mist_bias_values]
    assert linears and all(not torch.equal(
        m.mist_dense_kept["default"]["mist_bias_values"][1],
        layer_mod._draw_kept(m.mist_bias_values["default"].numel(), 0.5, layer_mod.dropout_seed(0, m.mist_key, 0),
                             torch.device("cpu"))) for m in linears)


def assert_disable_merge_unmerge_exact(model, inputs, reference, tuned):
    """Disabled gives the base output; merged and unmerged give the tuned one, bit for bit."""
    with model.disable_adapter():
        assert torch.equal(out(model, inputs), reference)
    model.merge_adapter()
    assert torch.equal(out(model, inputs), tuned)
    model.unmerge_adapter()
    assert torch.equal(out(model, inputs), tuned)


@pytest.mark.parametrize("kind", KINDS)
def test_disable_merge_unmerge_unload_are_exact(kind):
    model, inputs, reference, snapshot = make(kind)
    train(model, inputs)
    # every delta the output depends on moved (the pooler is not part of the output here)
    assert all(bool(d.detach().any()) == ("pooler" not in n) for n, _, _, d in dense(model))
    tuned = out(model, inputs)
    assert not torch.equal(tuned, reference)
    assert_disable_merge_unmerge_exact(model, inputs, reference, tuned)
    for name, m, k, _ in dense(model):
        key = name.removeprefix("base_model.model.") + "." + DENSE_DELTAS[k]
        assert torch.equal(getattr(m.get_base_layer(), DENSE_DELTAS[k]), snapshot[key]), key
    merged = model.merge_and_unload()
    assert not any(isinstance(m, layer_mod.MISTLayer) for m in merged.modules())
    assert torch.equal(out(merged, inputs), tuned)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "cnn"])
def test_both_engines_give_identical_outputs_gradients_and_values(kind, monkeypatch):
    runs = {}
    for engine in ("compose", "inplace"):
        monkeypatch.setattr(layer_mod, "ENGINE", engine)
        model, inputs, *_ = make(kind, grad_drop=0.5)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        grads = []
        for _ in range(3):
            model_output(model, inputs).pow(2).mean().backward()
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone()
                          for p in model.parameters() if p.requires_grad])
            opt.step()
            opt.zero_grad()
        model.eval()
        runs[engine] = (out(model, inputs), grads, [d.detach().clone() for *_, d in dense(model)])
    assert torch.equal(runs["compose"][0], runs["inplace"][0])
    assert all(torch.equal(a, b) for ga, gb in zip(runs["compose"][1], runs["inplace"][1], strict=True)
               for a, b in zip(ga, gb, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(runs["compose"][2], runs["inplace"][2], strict=True))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_load_round_trip_is_exact_and_stores_the_dense_deltas(kind, tmp_path):
    model, inputs, *_ = make(kind)
    train(model, inputs)
    tuned = out(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    expected = {f"{n}.{k}" for n, _, k, _ in dense(model)}
    assert {k for k in saved if k.rpartition(".")[2] in DENSE_DELTAS} == expected
    assert all(saved[f"{n}.{k}"].dtype == torch.float32 for n, _, k, _ in dense(model))
    loaded = PeftModel.from_pretrained(MODELS[kind](), tmp_path)
    assert torch.equal(out(loaded, inputs), tuned)
    for (_, _, _, a), (_, _, _, b) in zip(dense(model), dense(loaded), strict=True):
        assert torch.equal(a, b)
    plain = MODELS[kind]()
    plain.load_adapter(str(tmp_path))  # transformers' integration
    assert torch.equal(out(plain, inputs), tuned)
    assert not any(p.requires_grad for p in plain.parameters())


def test_checkpoint_with_dense_deltas_refuses_a_config_without_them(tmp_path):
    model, inputs, *_ = make("bert")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["tune_biases_and_norms"] = False
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tune_biases_and_norms"):
        PeftModel.from_pretrained(MODELS["bert"](), tmp_path)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_option_off_is_todays_behaviour(kind, tmp_path):
    model, inputs, *_ = make(kind, tune_biases_and_norms=False)
    assert not dense(model) and not any(isinstance(m, Norm) for m in model.modules())
    layers = mist_layers(model, "default").values()
    assert model.get_nb_trainable_parameters()[0] == sum(m.mist_values["default"].numel() for m in layers)
    model.save_pretrained(tmp_path)
    leaves = {k.rpartition(".")[2] for k in load_file(tmp_path / "adapter_model.safetensors")}
    assert leaves == {"mist_values", "mist_indices", "mist_shape"}


def test_two_adapters_set_adapter_and_delete_adapter():
    model, inputs, reference, _ = make("bert")
    train(model, inputs)
    tuned = out(model, inputs)
    model.add_adapter("plain", MISTConfig(target_modules=TARGETS["bert"], selection="random"))
    model.set_adapter("plain")
    assert torch.equal(out(model, inputs), reference)  # zero deltas, and the bias/norm deltas are not active
    assert model.get_nb_trainable_parameters()[0] == sum(m.mist_values["plain"].numel()
                                                         for m in mist_layers(model, "plain").values())
    model.set_adapter("default")
    assert torch.equal(out(model, inputs), tuned)
    model.delete_adapter("default")
    assert not dense(model) and all("default" not in m.mist_dense_kept for m in all_layers(model).values())
    assert torch.equal(out(model, inputs), reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_deltas_and_exact_paths(dtype):
    model, inputs, _, _ = make("bert")
    base = MODELS["bert"]().to(dtype)
    with torch.no_grad():
        reference = model_output(base, inputs)
    model = get_peft_model(base, MISTConfig(target_modules=TARGETS["bert"], selection="random",
                                            tune_biases_and_norms=True))
    assert all(d.dtype == torch.float32 for *_, d in dense(model))
    train(model, inputs, lr=5e-2)
    tuned = out(model, inputs)
    assert tuned.dtype == dtype and not torch.equal(tuned, reference)
    assert_disable_merge_unmerge_exact(model, inputs, reference, tuned)


class _RMSModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.RMSNorm(8)

    def forward(self, x):
        return self.norm(self.proj(x))


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch without nn.RMSNorm")
def test_torch_rmsnorm_is_tuned_and_merges_exactly():
    model = get_peft_model(_RMSModel(), MISTConfig(target_modules=["proj"], selection="random", density=0.25,
                                                   grad_drop=0.0, tune_biases_and_norms=True))
    assert isinstance(model.base_model.model.norm, Norm)
    assert model.get_nb_trainable_parameters()[0] == 16 + 8 + 8
    x = torch.randn(4, 8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    (model(x) * torch.arange(1.0, 9.0)).sum().backward()
    opt.step()
    assert bool((model.base_model.model.norm.mist_norm_values["default"] != 0).all())  # grad_drop 0: all move
    with torch.no_grad():
        tuned = model(x)
        model.merge_adapter()
        assert torch.equal(model(x), tuned)
        model.unmerge_adapter()
        with model.disable_adapter():
            assert torch.equal(model(x), _RMSModel()(x))


def test_llama_rmsnorm_is_skipped_with_a_warning_naming_the_class():
    with pytest.warns(UserWarning, match="LlamaRMSNorm"):
        model = get_peft_model(MODELS["llama"](), MISTConfig(target_modules=["q_proj", "v_proj"],
                                                             selection="random", tune_biases_and_norms=True))
    assert not any(isinstance(m, Norm) for m in model.modules())
    assert not dense(model)  # Llama's projections have no bias


def test_exclude_modules_and_layers_to_transform_apply_to_norms():
    model = get_peft_model(MODELS["bert"](), MISTConfig(target_modules=["query"], selection="random",
                                                        tune_biases_and_norms=True,
                                                        exclude_modules=["embeddings.LayerNorm"]))
    norms = {n for n, m in model.named_modules() if isinstance(m, Norm)}
    assert len(norms) == 4 and not any(n.endswith("embeddings.LayerNorm") for n in norms)
    model = get_peft_model(MODELS["bert"](), MISTConfig(target_modules=["query"], selection="random",
                                                        tune_biases_and_norms=True, layers_to_transform=[0]))
    norms = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, Norm))
    assert norms == ["encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.output.LayerNorm"]


def test_config_rejects_a_non_bool():
    with pytest.raises(ValueError, match="tune_biases_and_norms"):
        MISTConfig(tune_biases_and_norms="yes")


def test_continual_flag_reaches_mist_through_adapt_backbone_and_train_mist():
    from torch.utils.data import DataLoader

    from mist_peft.cli import build_parser, make_config
    from mist_peft.continual.runner import adapt_backbone

    config = make_config(build_parser().parse_args(["continual", "--steps-per-task", "3",
                                                    "--score-batches", "1", "--lr", "1e-2", "--grad-drop", "0.5"]))
    off = make_config(build_parser().parse_args(["continual", "--no-tune-biases-and-norms"]))
    assert config.tune_biases_and_norms and not off.tune_biases_and_norms  # on by default in the continual job
    base = MODELS["bert"]()
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    loader = DataLoader(synthetic_rows(48), batch_size=16, collate_fn=collate_rows)
    plain, _ = adapt_backbone(base, "mist", loader, config, head=None, num_classes=3, accelerator=None)
    after = plain.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # train_mist's optimizer trained the norm and bias deltas (MI-Fisher selected only the weights' entries)
    assert any(k.endswith("LayerNorm.weight") for k in changed) and any(k.endswith("LayerNorm.bias") for k in changed)
    assert any(k.endswith("query.bias") for k in changed)
    assert not any(k.startswith("pooler.") for k in changed)  # excluded by the runner's default
    for k in changed:
        if k.endswith(".weight") and "LayerNorm" not in k and "embeddings" not in k:
            assert int((before[k] != after[k]).sum()) <= count_for(before[k].numel(), config.density), k


def test_hub_stats_count_the_dense_deltas_as_changed_entries_not_as_base_parameters():
    import copy

    from mist_peft.hub import adapter_stats

    model, inputs, *_ = make("bert", grad_drop=0.0)
    train(model, inputs, steps=1)
    stats = adapter_stats(model, "default")
    fresh = dict(MODELS["bert"]().named_parameters())
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert stats["base_parameters"] == sum(p.numel() for p in fresh.values())
    assert stats["changed_entries"] == sum(int((merged[n] != p).sum()) for n, p in fresh.items())
    assert stats["dense_entries"] == sum(d.numel() for *_, d in dense(model)) > 0


def test_low_cpu_mem_usage_load_is_exact(tmp_path):
    model, inputs, *_ = make("gpt2")
    train(model, inputs)
    tuned = out(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MODELS["gpt2"](), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(out(loaded, inputs), tuned)
    assert len(dense(loaded)) == len(dense(model)) > 0


def test_safe_merge_rejects_a_nan_bias_or_norm_delta_and_changes_nothing():
    for kind in DENSE_DELTAS:
        model, inputs, reference, snapshot = make("bert")
        name, layer, _, delta = next(d for d in dense(model) if d[2] == kind)
        with torch.no_grad():
            delta[0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            layer.merge(safe_merge=True)
        assert not layer.merged
        key = name.removeprefix("base_model.model.") + "." + DENSE_DELTAS[kind]
        assert torch.equal(getattr(layer.get_base_layer(), DENSE_DELTAS[kind]), snapshot[key])
