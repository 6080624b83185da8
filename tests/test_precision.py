"""Mixed precision and half-precision bases; the PEFT layer contract (in/out features, low_cpu_mem_usage,
empty layers under a global selection); tied weights; loading never selects."""

import pytest
import torch
from conftest import LLAMA_TARGETS, lm_batch, model_output, tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn

from mist_peft import MISTConfig
from mist_peft import layer as layer_mod
from mist_peft import model as model_mod
from mist_peft.selection import is_selected, mist_layers


@pytest.mark.parametrize("make,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward_match_a_plain_linear(make, targets, dtype):
    """Under autocast MIST computes in autocast's dtype, as nn.Linear / Conv1D do, and trains."""
    plain = make()
    model = get_peft_model(make(), MISTConfig(target_modules=targets, selection="random", density=0.3, grad_drop=0.5))
    inputs = {"input_ids": lm_batch()["input_ids"]}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        reference = model_output(plain, inputs)
        out = model_output(model, inputs)
    assert out.dtype == reference.dtype
    assert torch.equal(out, reference)  # zero deltas: the same kernels in the same dtype
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        loss = model_output(model, inputs).float().pow(2).mean()
    loss.backward()
    layers = mist_layers(model).values()
    assert all(m.mist_values["default"].grad.dtype == torch.float32 for m in layers)
    opt.step()
    assert all(bool((m.mist_values["default"] != 0).any()) for m in layers)


def test_fp16_grad_scaler_skips_overflow_steps_without_touching_mist_state():
    model = get_peft_model(tiny_llama(), MISTConfig(target_modules=LLAMA_TARGETS, selection="random", grad_drop=0.9))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    layers = list(mist_layers(model).values())
    model.train()

    def step(poison: bool):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**lm_batch()).loss
        scaler.scale(loss).backward()
        if poison:
            layers[0].mist_values["default"].grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    step(poison=False)
    before = [(m.mist_step, m.mist_values["default"].detach().clone(),
               {k: v.clone() for k, v in opt.state[m.mist_values["default"]].items()}) for m in layers]
    step(poison=True)
    for m, (clock, values, state) in zip(layers, before, strict=True):
        assert m.mist_step == clock  # the skipped step did not advance the dropout clock
        assert torch.equal(m.mist_values["default"], values)
        assert all(torch.equal(opt.state[m.mist_values["default"]][k], v) for k, v in state.items())
    step(poison=False)
    assert all(m.mist_step == before[0][0] + 1 for m in layers)


def test_train_mist_runs_under_accelerate_bf16_mixed_precision():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from mist_peft.training import MISTTrainingConfig, train_mist

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests fixed fp32 in the process singleton

    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 120, (8, 10), generator=g), "labels": torch.arange(8) % 4}
               for _ in range(3)]
    result = train_mist(model, batches, config=MISTTrainingConfig(max_steps=2, max_score_batches=2),
                        accelerator=Accelerator(mixed_precision="bf16", cpu=True))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert result["steps"] == 2 and is_selected(model, "default")
    assert any(bool((m.mist_values["default"] != 0).any()) for m in mist_layers(model).values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_trains_saves_loads_and_merges_exactly(dtype, tmp_path):
    def make():
        return tiny_llama().to(dtype)

    base_weights = {k: v.clone() for k, v in make().state_dict().items()}
    model = get_peft_model(make(), MISTConfig(target_modules=LLAMA_TARGETS, selection="magnitude", grad_drop=0.5))
    assert all(m.mist_values["default"].dtype == torch.float32 for m in mist_layers(model).values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        model(**lm_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    inputs = {"input_ids": lm_batch(9)["input_ids"]}
    with torch.no_grad():
        out = model(**inputs).logits
        model.save_pretrained(tmp_path / "a")
        reloaded = PeftModel.from_pretrained(make(), tmp_path / "a").eval()
        assert torch.equal(reloaded(**inputs).logits, out)
        model.merge_adapter()
        assert torch.equal(model(**inputs).logits, out)  # merged = unmerged, bit for bit
        model.unmerge_adapter()
        restored = model.get_base_model().state_dict()
        for key, value in base_weights.items():
            mist_key = key.replace(".weight", ".base_layer.weight")
            assert torch.equal(restored.get(mist_key, restored.get(key)), value), key


def test_half_precision_delta_below_half_an_ulp_accumulates_in_fp32_values():
    """The documented semantics: W_eff = round_bf16(W + v); a tiny v changes nothing until it adds up."""
    layer_model = get_peft_model(nn.Sequential(nn.Linear(4, 4, bias=False)).to(torch.bfloat16),
                                 MISTConfig(target_modules=["0"], selection="magnitude", density=1.0))
    layer = layer_model.base_model.model[0]
    weight = layer.get_base_layer().weight
    x = torch.eye(4, dtype=torch.bfloat16)
    with torch.no_grad():
        base_out = layer_model(x)
        ulp = (weight.float().abs().max() * 2.0**-8).item()
        layer.mist_values["default"].fill_(ulp / 8)  # far below half an ulp of every entry
        assert torch.equal(layer_model(x), base_out)
        layer.mist_values["default"].mul_(64)  # 8 ulps of the largest entry: now it shows
        assert not torch.equal(layer_model(x), base_out)
        assert layer.mist_values["default"].dtype == torch.float32


@pytest.mark.parametrize("make,expected", [
    (lambda: nn.Sequential(nn.Linear(10, 20)), (10, 20)),
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3)), (3, 6)),
    (lambda: nn.Sequential(nn.Embedding(30, 7)), (30, 7)),
])
def test_layers_expose_in_and_out_features_like_peft_layers(make, expected):
    model = get_peft_model(make(), MISTConfig(target_modules=["0"], selection="random"))
    layer = model.base_model.model[0]
    assert (layer.in_features, layer.out_features) == expected


def test_conv1d_in_and_out_features():
    model = get_peft_model(tiny_gpt2(), MISTConfig(target_modules=["c_fc"], selection="random"))
    layer = next(iter(mist_layers(model).values()))
    assert (layer.in_features, layer.out_features) == (32, 128)


def small_query_bert():
    """A BERT whose first query weight is tiny, so a global magnitude selection gives it no entry."""
    base = tiny_bert()
    with torch.no_grad():
        base.encoder.layer[0].attention.self.query.weight.mul_(1e-3)
    return base


def test_global_selection_leaves_no_empty_trainable_tensor():
    model = get_peft_model(small_query_bert(), MISTConfig(target_modules=["query", "value"], selection="magnitude",
                                                          granularity="global", density=0.05))
    sizes = {n: m.mist_values["default"].numel() for n, m in mist_layers(model).items()}
    assert sizes["base_model.model.encoder.layer.0.attention.self.query"] == 0 and all(
        v for n, v in sizes.items() if "layer.0.attention.self.query" not in n)
    assert all(p.numel() > 0 for p in model.parameters() if p.requires_grad)
    model.set_adapter("default")  # PEFT's activation must not re-enable them
    assert all(p.numel() > 0 for p in model.parameters() if p.requires_grad)


def test_low_cpu_mem_usage_puts_values_on_meta_and_selects_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("selection ran")

    monkeypatch.setattr(model_mod, "select_data_free", refuse)
    model = inject_adapter_in_model(MISTConfig(target_modules=["query"], selection="magnitude"), tiny_bert(),
                                    low_cpu_mem_usage=True)
    layers = mist_layers(model).values()
    assert layers and all(m.mist_values["default"].is_meta for m in layers)


@pytest.mark.parametrize("granularity", ["per_tensor", "global"])
@pytest.mark.parametrize("low_cpu", [False, True])
def test_loading_a_data_free_adapter_never_selects(granularity, low_cpu, tmp_path, monkeypatch):
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"], selection="random",
                                                   granularity=granularity, density=0.1))
    with torch.no_grad():
        for m in mist_layers(model).values():
            m.mist_values["default"].normal_()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        out = model_output(model, inputs)
    model.save_pretrained(tmp_path / "a")

    def refuse(*args, **kwargs):
        raise AssertionError("selection ran while loading a checkpoint that already holds the indices")

    monkeypatch.setattr(model_mod, "select_data_free", refuse)
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", low_cpu_mem_usage=low_cpu,
                                           is_trainable=trainable)
        assert is_selected(loaded, "default")
        with torch.no_grad():
            assert torch.equal(model_output(loaded, inputs), out)
        assert all(p.requires_grad == trainable for n, p in loaded.named_parameters()
                   if "mist_values" in n and p.numel())


def test_unselected_adapter_survives_save_and_load(tmp_path):
    """Saved before MI-Fisher selection: it loads unselected (train_mist would still select it)."""
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"]))
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", is_trainable=True)
    assert not is_selected(loaded, "default")


def test_a_selected_global_adapter_stays_selected_after_reload(tmp_path):
    model = get_peft_model(small_query_bert(), MISTConfig(target_modules=["query", "value"], selection="magnitude",
                                                          granularity="global", density=0.05))
    indices = {n: m.mist_indices["default"].clone() for n, m in mist_layers(model).items()}
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(small_query_bert(), tmp_path / "a", is_trainable=True)
    assert is_selected(loaded, "default") and any(not len(i) for i in indices.values())
    assert all(torch.equal(m.mist_indices["default"], indices[n]) for n, m in mist_layers(loaded).items())


def test_tied_weights_are_refused_with_the_fix():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert lm.lm_head.weight is lm.transformer.wte.weight
    with pytest.raises(ValueError, match="wte.*shares its weight with 'lm_head'.*exclude_modules"):
        get_peft_model(lm, MISTConfig(target_modules=["wte"], selection="random"))
    model = get_peft_model(lm, MISTConfig(target_modules=["c_fc"], selection="random"))  # untied targets: fine
    assert mist_layers(model)


class EmbedConv(nn.Module):
    """An Embedding feeding a Conv2d (plain torch), for the in-place engine of both layer types."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 48, padding_idx=0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, ids):
        return self.conv(self.embed(ids).view(-1, 3, 4, 4))


@pytest.mark.parametrize("setting", ["bf16 base", "bf16 autocast"])
def test_conv2d_and_embedding_engines_agree_in_half_precision(setting, monkeypatch):
    """In-place and compose engines give bit-identical outputs, value gradients and values with a bf16 base
    and under bf16 autocast (values stay fp32)."""
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    runs = {}
    for engine in ("compose", "inplace"):
        monkeypatch.setattr(layer_mod, "ENGINE", engine)
        torch.manual_seed(0)
        base = EmbedConv().to(torch.bfloat16) if setting == "bf16 base" else EmbedConv()
        model = get_peft_model(base, MISTConfig(target_modules=["embed", "conv"], selection="random", density=0.3,
                                                grad_drop=0.5))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        trace = []
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "bf16 autocast"):
                out = model(ids)
            out.float().pow(2).mean().backward()
            values = [m.mist_values["default"] for m in mist_layers(model).values()]
            assert all(v.grad.dtype == torch.float32 and bool((v.grad != 0).any()) for v in values)
            trace += [out.detach().clone()] + [v.grad.clone() for v in values]
            opt.step()
            opt.zero_grad()
        trace += [m.mist_values["default"].detach().clone() for m in mist_layers(model).values()]
        assert all((m._live == "default") == (engine == "inplace") for m in mist_layers(model).values())
        runs[engine] = trace
    assert all(torch.equal(a, b) for a, b in zip(runs["compose"], runs["inplace"], strict=True))
