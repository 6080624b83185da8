"""The MIST tuner on BERT, ViT, GPT-2 (Conv1D), a small Llama and a Conv2d model."""

import math

import pytest
import torch
from conftest import MODELS, model_output, tiny_bert, tiny_inputs, train
from peft import PeftModel, get_peft_model

import mist_peft
from mist_peft import MISTConfig
from mist_peft import layer as layer_mod
from mist_peft.selection import count_for, mist_layers

TARGETS = {
    "bert": ["query", "value", "dense", "word_embeddings"],
    "vit": "all-linear",
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "cnn": ["conv1", "conv2", "head"],
}


def make(kind, **kw):
    base = MODELS[kind]()
    snapshot = {k: v.detach().clone() for k, v in base.state_dict().items()}
    inputs = tiny_inputs(kind)
    with torch.no_grad():
        reference = model_output(base, inputs)
    kw.setdefault("selection", "magnitude")
    model = get_peft_model(base, MISTConfig(target_modules=TARGETS[kind], **kw))
    return model, inputs, reference, snapshot


def base_weight_key(name: str) -> str:
    return name.removeprefix("base_model.model.") + ".weight"


@pytest.mark.parametrize("kind", list(MODELS))
def test_output_equals_base_at_initialisation(kind):
    model, inputs, reference, _ = make(kind)
    with torch.no_grad():
        assert torch.equal(model_output(model, inputs), reference)


@pytest.mark.parametrize("kind", list(MODELS))
def test_training_changes_only_selected_entries(kind):
    model, inputs, reference, snapshot = make(kind, grad_drop=0.5)
    layers = mist_layers(model, "default")
    selected = {n: m.mist_indices["default"].clone() for n, m in layers.items()}
    train(model, inputs, steps=4, weight_decay=0.1)
    total_changed = 0
    state = model.state_dict()  # reports the true base weights, also while the in-place engine holds W + delta
    for name, layer in layers.items():
        original = snapshot[base_weight_key(name)]
        assert torch.equal(state[f"{name}.base_layer.weight"], original), "the base weight must stay untouched"
        layer.restore_base_weight()
        assert torch.equal(layer.get_base_layer().weight, original)
        changed = torch.nonzero((layer.get_delta_weight("default") + original != original).reshape(-1)).reshape(-1)
        assert torch.isin(changed, selected[name]).all()
        assert changed.numel() <= count_for(original.numel(), 0.05)
        total_changed += changed.numel()
    assert total_changed > 0
    with torch.no_grad():
        assert not torch.allclose(model_output(model, inputs), reference)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "cnn"])
def test_about_one_minus_grad_drop_of_selected_entries_move_per_step(kind):
    model, inputs, _, _ = make(kind, density=0.3, grad_drop=0.9)
    layers = mist_layers(model, "default")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    mist_peft.attach_optimizer(opt, model)
    model.train()
    shares = []
    for _ in range(4):
        before = {n: m.mist_values["default"].detach().clone() for n, m in layers.items()}
        model_output(model, inputs).pow(2).mean().backward()
        kept = {n: m.kept_positions("default") for n, m in layers.items()}
        opt.step()
        opt.zero_grad()
        moved = total = 0
        for n, m in layers.items():
            n_values = before[n].numel()
            assert kept[n].numel() in (math.floor(0.1 * n_values), math.ceil(0.1 * n_values)), n  # fixed count
            assert torch.unique(kept[n]).numel() == kept[n].numel(), "kept positions are distinct"
            if kept[n].device.type in layer_mod.SDDMM_DEVICES:  # sorted for SDDMM's CSR rows, else draw order
                assert bool((kept[n][1:] > kept[n][:-1]).all())
            diff = torch.nonzero(m.mist_values["default"].detach() != before[n]).reshape(-1)
            assert torch.isin(diff, kept[n]).all(), "an entry outside the kept subset moved"
            moved += diff.numel()
            total += before[n].numel()
        shares.append(moved / total)
    mean = sum(shares) / len(shares)
    assert 0.07 <= mean <= 0.13, shares  # an entry whose gradient is zero does not move


def test_kept_draw_has_a_fixed_count_and_every_entry_keeps_probability_one_minus_grad_drop():
    """The sync-free draw: floor or ceil of (1 - p) n entries per step, a uniform subset (marginals 1 - p)."""
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], selection="magnitude", density=1.0,
                                                   grad_drop=0.9))
    layer = next(iter(mist_layers(model).values()))
    n = layer.mist_values["default"].numel()  # 1024: 102.4 expected per step
    model.train()
    hits = torch.zeros(n)
    counts = []
    steps = 500
    for _ in range(steps):
        kept = layer.kept_positions("default")
        counts.append(kept.numel())
        hits[kept] += 1
        layer.mist_step += 1
    assert set(counts) == {102, 103}
    assert abs(sum(counts) / steps - 102.4) < 0.1  # the fraction is rounded up with probability 0.4
    freq = hits / steps
    assert abs(float(freq.mean()) - 0.1) < 0.001
    assert float((freq - 0.1).abs().max()) < 0.07  # 5 binomial sd (0.013): no entry is favoured
    first, second = hits[: n // 2].sum(), hits[n // 2:].sum()
    assert abs(float(first - second)) / float(hits.sum()) < 0.02  # no bias toward low positions


def test_strict_sparsity_keeps_value_and_optimizer_state_of_dropped_entries():
    model, inputs, _, _ = make("bert", density=0.3, grad_drop=0.8)
    layers = mist_layers(model, "default")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1)
    mist_peft.attach_optimizer(opt, model)
    model.train()
    for step in range(5):
        values = {n: m.mist_values["default"] for n, m in layers.items()}
        before = {n: v.detach().clone() for n, v in values.items()}
        state = {n: opt.state[v]["momentum_buffer"].clone() for n, v in values.items() if v in opt.state}
        model_output(model, inputs).pow(2).mean().backward()
        kept = {n: m.kept_positions("default") for n, m in layers.items()}
        opt.step()
        opt.zero_grad()
        for n, v in values.items():
            dropped = torch.ones(v.numel(), dtype=torch.bool)
            dropped[kept[n]] = False
            assert torch.equal(v.detach()[dropped], before[n][dropped])
            if n in state:
                assert torch.equal(opt.state[v]["momentum_buffer"][dropped], state[n][dropped])
        assert step < 1 or state, "momentum buffers exist after the first step"


@pytest.mark.parametrize("kind", list(MODELS))
def test_merge_unmerge_and_merge_and_unload(kind):
    model, inputs, reference, snapshot = make(kind, grad_drop=0.0)
    train(model, inputs, steps=2)
    with torch.no_grad():
        unmerged = model_output(model, inputs)
        model.merge_adapter()
        merged = model_output(model, inputs)
        assert torch.equal(merged, unmerged)  # the same effective weight, the same kernel
        model.unmerge_adapter()
        for name, layer in mist_layers(model).items():
            assert torch.equal(layer.get_base_layer().weight, snapshot[base_weight_key(name)])
        assert torch.equal(model_output(model, inputs), unmerged)
        plain = model.merge_and_unload()
        assert not mist_layers(plain)
        assert torch.equal(model_output(plain, inputs), unmerged)


def test_unload_restores_the_original_model_exactly():
    model, inputs, reference, _ = make("bert", grad_drop=0.0)
    train(model, inputs, steps=2)
    plain = model.unload()
    with torch.no_grad():
        assert torch.equal(model_output(plain, inputs), reference)


def test_named_adapters_set_disable_delete():
    model, inputs, reference, _ = make("bert", grad_drop=0.0)
    train(model, inputs, steps=2)
    model.add_adapter("other", MISTConfig(target_modules=TARGETS["bert"], selection="random", seed=3))
    layers = mist_layers(model, "other")
    assert layers and all(m.mist_values["other"].numel() > 0 for m in layers.values())
    with torch.no_grad():
        out_default = model_output(model, inputs)
        model.set_adapter("other")
        assert torch.equal(model_output(model, inputs), reference)  # "other" is still all zeros
        model.set_adapter("default")
        assert torch.equal(model_output(model, inputs), out_default)
        with model.disable_adapter():
            assert torch.equal(model_output(model, inputs), reference)
    model.delete_adapter("other")
    assert not mist_layers(model, "other")
    assert all("other" not in m.mist_indices and "other" not in m.mist_seed for m in mist_layers(model).values())


def test_trainable_parameter_count_is_the_selected_entries():
    model, *_ = make("bert", density=0.1)
    expected = sum(count_for(m.get_base_layer().weight.numel(), 0.1) for m in mist_layers(model).values())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == sum(p.numel() for p in model.parameters())


def test_global_granularity_selects_density_of_all_targeted_weights():
    model, *_ = make("bert", density=0.1, granularity="global")
    layers = mist_layers(model).values()
    total = sum(m.get_base_layer().weight.numel() for m in layers)
    assert sum(m.mist_values["default"].numel() for m in layers) == round(0.1 * total)
    shares = [m.mist_values["default"].numel() / m.get_base_layer().weight.numel() for m in layers]
    assert max(shares) - min(shares) > 0.01  # a global top-k is not the same share everywhere


def test_magnitude_selection_picks_the_largest_weights():
    model, *_ = make("bert", density=0.1)
    for layer in mist_layers(model).values():
        w = layer.get_base_layer().weight.detach().abs().reshape(-1)
        chosen = torch.zeros_like(w, dtype=torch.bool)
        chosen[layer.mist_indices["default"]] = True
        assert w[chosen].min() >= w[~chosen].max()


def test_get_delta_weight_and_safe_merge_rejects_nan():
    model, inputs, _, snapshot = make("bert", grad_drop=0.0)
    train(model, inputs, steps=1)
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    key = "encoder.layer.0.attention.self.query.weight"
    layer.merge()
    torch.testing.assert_close(layer.get_base_layer().weight - snapshot[key], layer.get_delta_weight("default"))
    layer.unmerge()
    with torch.no_grad():
        layer.mist_values["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, snapshot[key])


@pytest.mark.parametrize("sddmm_devices", [frozenset({"cpu"}), frozenset()])
def test_fused_linear_gradients_match_dense_autograd(sddmm_devices, monkeypatch):
    """Both backward paths (SDDMM and dense-then-gather) give autograd's gradients at kept entries."""
    monkeypatch.setattr(layer_mod, "SDDMM_DEVICES", sddmm_devices)
    for fan_in_fan_out in (False, True):
        torch.manual_seed(0)
        weight = torch.randn(6, 5) if not fan_in_fan_out else torch.randn(5, 6)
        bias = torch.randn(6)
        idx = torch.tensor([0, 3, 7, 11, 20, 29])
        values = torch.randn(6, requires_grad=True)
        kept = torch.tensor([1, 2, 5])
        x = torch.randn(3, 4, 5, requires_grad=True)
        y = layer_mod._SparseDeltaLinear.apply(x, weight, bias, fan_in_fan_out, [(idx, kept, 2.0)], values, False)
        y.pow(2).sum().backward()
        v_ref = values.detach().clone().requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        w_ref = weight.reshape(-1).index_add(0, idx, v_ref).view_as(weight)
        y_ref = x_ref @ w_ref + bias if fan_in_fan_out else x_ref @ w_ref.t() + bias
        y_ref.pow(2).sum().backward()
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
        expected = torch.zeros(6)
        expected[kept] = 2.0 * v_ref.grad[kept]
        torch.testing.assert_close(values.grad, expected)


@pytest.mark.parametrize("kind,precision", [("bert", "fp32"), ("bert", "bf16 autocast"), ("bert", "bf16 base"),
                                            ("vit", "fp32"), ("llama", "fp32")])
def test_query_key_value_share_one_token_major_input_bit_exactly(kind, precision, monkeypatch):
    """q/k/v read one tensor: its token-major copy is made once per block, not three times, the values'
    gradients are bit-identical to unshared copies (also under bf16 autocast, where each layer casts the input
    anew, and with bf16 base weights), and no copy outlives the backward."""
    targets = {"bert": ["query", "key", "value"], "vit": ["q_proj", "k_proj", "v_proj"],
               "llama": ["q_proj", "k_proj", "v_proj"]}[kind]
    made, holders = [], []
    real_major, real_init = layer_mod._token_major, layer_mod._InputMajor.__init__

    def counting_major(t):
        made.append(tuple(t.shape))
        return real_major(t)

    def recording_init(self):
        real_init(self)
        holders.append(self)

    monkeypatch.setattr(layer_mod, "_token_major", counting_major)
    monkeypatch.setattr(layer_mod._InputMajor, "__init__", recording_init)

    def grads(shared: bool):
        made.clear()
        holders.clear()
        if not shared:  # every forward gets its own holder, as for three different inputs
            monkeypatch.setattr(layer_mod._InputMajor, "shared", classmethod(lambda cls, x, dtype: _fresh_holder(cls)))
        base = MODELS[kind]()
        base = base.to(torch.bfloat16) if precision == "bf16 base" else base
        model = get_peft_model(base, MISTConfig(target_modules=targets, selection="magnitude", grad_drop=0.5))
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
            loss = model_output(model, tiny_inputs(kind)).float().pow(2).mean()
        loss.backward()
        monkeypatch.setattr(layer_mod._InputMajor, "shared", real_shared)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(made)

    real_shared = layer_mod._InputMajor.shared
    with_sharing, copies_shared = grads(True)
    assert all(h.tensor is None and h.users == 0 for h in holders)
    without, copies_unshared = grads(False)
    blocks = 2
    assert (copies_shared, copies_unshared) == (4 * blocks, 6 * blocks)
    assert with_sharing.keys() == without.keys() and len(with_sharing) == 3 * blocks
    for name, grad in with_sharing.items():
        assert torch.equal(grad, without[name]), name
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast"])
def test_key_gradient_laid_out_as_k_transposed_is_read_without_a_transposing_copy(precision, monkeypatch):
    """BERT's attention hands the key projection a gradient whose features are strided (it comes from k^T):
    `_token_rows` copies it features-major, so its SDDMM operand needs no transpose, and every gradient of a
    training step stays bit-identical to reading it as plain [tokens, features] rows."""
    strided, real_rows = [], layer_mod._token_rows

    def recording_rows(t):
        strided.append(t.stride(-1) != 1)
        return real_rows(t)

    def grads(rows):
        monkeypatch.setattr(layer_mod, "_token_rows", rows)
        model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "key", "value", "dense"],
                                                       selection="magnitude", grad_drop=0.5))
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
            loss = model_output(model, tiny_inputs("bert")).float().pow(2).mean()
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}  # not the unused pooler

    features_major = grads(recording_rows)
    assert sum(strided) == 2, strided  # the key projection of each of the 2 blocks, else this tests nothing
    plain = grads(lambda t: t.reshape(-1, t.shape[-1]))
    assert features_major.keys() == plain.keys() and len(plain) == 2 * 6
    for name, grad in features_major.items():
        assert torch.equal(grad, plain[name]), name

    k_transposed = torch.randn(2, 15, 4).transpose(1, 2)  # [batch, tokens=4, features=15], features strided
    rows = real_rows(k_transposed)
    assert torch.equal(rows, k_transposed.reshape(-1, 15))
    assert layer_mod._token_major(rows).data_ptr() == rows.data_ptr()  # already features-major: no copy


def test_inference_mode_and_no_grad_match_with_two_active_adapters():
    """Two active adapters take the composition path even without gradients: inference_mode's tensors (which
    have no version counter) must run it, with the same output as no_grad."""
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"], selection="magnitude"))
    model.add_adapter("b", MISTConfig(target_modules=["query", "value"], selection="magnitude", density=0.1))
    model.base_model.set_adapter(["default", "b"])
    for layer in mist_layers(model, "default").values():
        for name in ("default", "b"):
            with torch.no_grad():
                layer.mist_values[name].normal_()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected = model_output(model, inputs)
    with torch.inference_mode():
        got = model_output(model, {k: v.clone() for k, v in inputs.items()})
    assert torch.equal(got, expected)


def _fresh_holder(cls):
    holder = cls()
    holder.users += 1
    return holder


def test_kept_subset_depends_only_on_seed_layer_and_step():
    """Two independently built models (two processes) draw the same subsets, step after step."""
    draws = []
    for _ in range(2):
        model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], selection="magnitude", density=0.5))
        model.train()
        steps = []
        for _ in range(3):
            steps.append([m.kept_positions("default").clone() for m in mist_layers(model).values()])
            for m in mist_layers(model).values():
                m.mist_step += 1
        draws.append(steps)
    for a, b in zip(draws[0], draws[1], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(draws[0][0][0], draws[0][1][0])


def test_unsupported_module_type_names_the_module_and_the_fix():
    with pytest.raises(ValueError, match="LayerNorm.*exclude_modules"):
        get_peft_model(tiny_bert(), MISTConfig(target_modules=["LayerNorm"], selection="magnitude"))


def test_mi_fisher_adapter_starts_unselected_at_its_final_size_and_keeps_the_base_output():
    base = tiny_bert()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        reference = model_output(base, inputs)
    model = get_peft_model(base, MISTConfig(target_modules=["query"]))
    layers = mist_layers(model).values()
    assert all(not m.mist_selected["default"] and m.mist_indices["default"].numel() == 0 for m in layers)
    expected = sum(count_for(m.get_base_layer().weight.numel(), 0.05) for m in layers)
    assert model.get_nb_trainable_parameters()[0] == expected  # an optimizer can be built now
    with torch.no_grad():
        assert torch.equal(model_output(model, inputs), reference)
    model.train()
    with pytest.raises(layer_mod.MISTSelectionError, match="train_mist.*selection='fisher'.*magnitude"):
        model_output(model, inputs)


def test_two_active_adapters_compose_merge_and_train_together():
    model, inputs, reference, _ = make("llama", grad_drop=0.0)
    model.add_adapter("other", MISTConfig(target_modules=TARGETS["llama"], selection="random", density=0.1))
    model.base_model.set_adapter(["default", "other"])  # both active on every targeted layer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"default", "other"}
    model.train()
    for _ in range(2):
        model_output(model, inputs).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        both = model_output(model, inputs)
        model.base_model.set_adapter("default")
        only_default = model_output(model, inputs)
        model.base_model.set_adapter(["default", "other"])
        assert not torch.equal(both, only_default) and not torch.equal(both, reference)
        model.merge_adapter(["default", "other"])
        assert torch.equal(model_output(model, inputs), both)
        model.unmerge_adapter()
        assert torch.equal(model_output(model, inputs), both)


@pytest.mark.parametrize("rescale", [False, True])
def test_rescale_kept_grads_scales_the_kept_gradient_by_one_over_keep_probability(rescale):
    model, inputs, _, _ = make("bert", grad_drop=0.75, rescale_kept_grads=rescale, density=0.2)
    reference, *_ = make("bert", grad_drop=0.0, density=0.2)
    for m in (model, reference):  # eval mode: no dropout, the same numbers; grad enabled: a training forward
        model_output(m, inputs).pow(2).mean().backward()
    for (name, layer), ref in zip(mist_layers(model).items(), mist_layers(reference).values(), strict=True):
        full = ref.mist_values["default"].grad
        if full is None:  # the pooler does not feed last_hidden_state
            assert layer.mist_values["default"].grad is None
            continue
        kept = layer.mist_kept["default"][1]
        expected = torch.zeros_like(full)
        expected[kept] = full[kept] * (4.0 if rescale else 1.0)
        torch.testing.assert_close(layer.mist_values["default"].grad, expected, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "cnn", "bert"])
def test_inplace_engine_equals_the_compose_reference_step_for_step(kind, monkeypatch, tmp_path):
    """Both engines give bit-identical outputs, gradients and trained values (Linear, Conv1D, Conv2d in "cnn",
    Embedding in "bert"); the in-place one restores the true base weight for everything that reads it."""
    runs = {}
    for engine in ("compose", "inplace"):
        monkeypatch.setattr(layer_mod, "ENGINE", engine)
        model, inputs, reference, snapshot = make(kind, grad_drop=0.5, selection="random")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        grads = []
        for _ in range(3):
            model_output(model, inputs).pow(2).mean().backward()
            values = [m.mist_values["default"] for m in mist_layers(model).values()]
            grads.append(torch.cat([torch.zeros_like(v) if v.grad is None else v.grad.clone() for v in values]))
            opt.step()
            opt.zero_grad()
        live = {type(m).__name__ for m in mist_layers(model).values() if m._live == "default"}
        assert live == (set() if engine == "compose" else {type(m).__name__ for m in mist_layers(model).values()})
        values = torch.cat([m.mist_values["default"].detach().clone() for m in mist_layers(model).values()])
        with torch.no_grad():
            out = model_output(model, inputs)
            with model.disable_adapter():
                assert torch.equal(model_output(model, inputs), reference)
            assert torch.equal(model_output(model, inputs), out)
            model.merge_adapter()
            assert torch.equal(model_output(model, inputs), out)
            model.unmerge_adapter()
            assert torch.equal(model_output(model, inputs), out)
        for name in mist_layers(model):
            assert torch.equal(model.state_dict()[f"{name}.base_layer.weight"], snapshot[base_weight_key(name)])
        model.save_pretrained(tmp_path / engine)
        loaded = PeftModel.from_pretrained(MODELS[kind](), tmp_path / engine)
        with torch.no_grad():
            assert torch.equal(model_output(loaded, inputs), out)
        runs[engine] = (out, grads, values)
        plain = model.unload()
        with torch.no_grad():
            assert torch.equal(model_output(plain, inputs), reference)
    assert torch.equal(runs["compose"][0], runs["inplace"][0])
    assert all(torch.equal(a, b) for a, b in zip(runs["compose"][1], runs["inplace"][1], strict=True))
    assert torch.equal(runs["compose"][2], runs["inplace"][2])


def test_loading_an_adapter_state_into_a_live_layer_keeps_the_base_exact():
    """Loading new indices and values while the in-place engine holds W + delta restores the base first."""
    source, inputs, reference, _ = make("bert", grad_drop=0.5, selection="random", seed=1)
    train(source, inputs, steps=2)
    target, *_ = make("bert", grad_drop=0.5, selection="random", seed=2)
    train(target, inputs, steps=2)
    assert all(m._live == "default" for m in mist_layers(target).values())
    state = {k: v for k, v in source.state_dict().items() if "mist_" in k}
    assert not target.load_state_dict(state, strict=False).unexpected_keys  # plain torch loading, in place
    with torch.no_grad():
        assert torch.equal(model_output(target, inputs), model_output(source, inputs))
        with target.disable_adapter():
            assert torch.equal(model_output(target, inputs), reference)


def test_inplace_conv2d_and_embedding_take_unbatched_and_int32_inputs(monkeypatch):
    """The in-place gradients handle what the base layers accept: an unbatched image, int32 token ids."""
    grads = {}
    for engine in ("compose", "inplace"):
        monkeypatch.setattr(layer_mod, "ENGINE", engine)
        torch.manual_seed(0)
        base = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(3, 4, 3), "embed": torch.nn.Embedding(20, 6)})
        model = get_peft_model(base, MISTConfig(target_modules=["conv", "embed"], selection="random", density=0.5,
                                                grad_drop=0.5))
        conv, embed = model.base_model.model["conv"], model.base_model.model["embed"]
        image = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(1))
        ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
        (conv(image).pow(2).sum() + embed(ids).pow(2).sum()).backward()
        assert (conv._live == embed._live == "default") == (engine == "inplace")
        grads[engine] = [m.mist_values["default"].grad for m in (conv, embed)]
    assert all(bool((g != 0).any()) for g in grads["inplace"])
    assert all(torch.equal(a, b) for a, b in zip(grads["compose"], grads["inplace"], strict=True))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "cnn"])
def test_live_fast_path_follows_every_change_of_the_adapter_state(kind):
    """After its first forward a live layer skips forward's checks (`_fast_live`). Every later change must
    still show in the very next output: new values, switching, disabling, merging, new indices, a trainable
    base weight (a scoring pass) and training itself; each output is checked against the merged weights."""
    model, inputs, reference, _ = make(kind, grad_drop=0.5)
    model.add_adapter("other", MISTConfig(target_modules=TARGETS[kind], selection="random", seed=3))
    layers = mist_layers(model)
    with torch.no_grad():
        for m in layers.values():
            for name in ("default", "other"):
                m.mist_values[name].normal_(0, 0.05)

    def merged_output():
        model.merge_adapter()
        out = model_output(model, inputs)
        model.unmerge_adapter()
        return out

    model.eval()
    with torch.no_grad():
        first = model_output(model, inputs)
        assert all(m._fast_live is not None for m in layers.values())  # the second call takes the fast path
        assert torch.equal(model_output(model, inputs), first)
        assert torch.equal(first, merged_output())
        assert not torch.equal(first, reference)
        for m in layers.values():
            m.mist_values["default"].mul_(2.0)  # in place: only the version counter tells
        doubled = model_output(model, inputs)
        assert not torch.equal(doubled, first)
        assert torch.equal(doubled, merged_output())
        model.set_adapter("other")
        other = model_output(model, inputs)
        assert torch.equal(other, merged_output())
        assert not torch.equal(other, doubled)
        model.set_adapter("default")
        assert torch.equal(model_output(model, inputs), doubled)
        with model.disable_adapter():
            assert torch.equal(model_output(model, inputs), reference)
        assert torch.equal(model_output(model, inputs), doubled)
        layer = next(iter(layers.values()))
        layer.set_indices("default", layer.mist_indices["default"][:1], layer.mist_values["default"][:1].clone())
        fewer = model_output(model, inputs)
        assert not torch.equal(fewer, doubled)
        assert torch.equal(fewer, merged_output())
    weight = layer.get_base_layer().weight
    weight.requires_grad_(True)  # a scoring pass: the fast path must step aside for the dense gradient
    model_output(model, inputs).pow(2).mean().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    weight.requires_grad_(False)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)  # moves tiny gradients
    for _ in range(2):  # the second step runs on the fast path
        before = {n: m.mist_values["default"].detach().clone() for n, m in layers.items()}
        model_output(model, inputs).pow(2).mean().backward()
        kept = {n: m.kept_positions("default") for n, m in layers.items()}
        opt.step()
        opt.zero_grad()
        for n, m in layers.items():
            changed = torch.nonzero(m.mist_values["default"].detach() != before[n]).reshape(-1)
            assert torch.isin(changed, kept[n]).all(), n
        assert any(not torch.equal(m.mist_values["default"].detach(), before[n]) for n, m in layers.items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model_output(model, inputs), merged_output())
