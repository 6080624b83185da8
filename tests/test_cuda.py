"""CUDA paths (device generators, SDDMM on GPU, bf16 bases, autocast, host syncs); skipped without a GPU, as in CI."""

import pytest
import torch
from conftest import tiny_bert, tiny_inputs
from peft import PeftModel, get_peft_model

import mist_peft
from mist_peft import MISTConfig
from mist_peft.encoders import FeatureEncoder
from mist_peft.objectives import MIObjective
from mist_peft.scoring import adapter_layers, select_mi_fisher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def on_cuda(inputs):
    return {k: v.to(CUDA) for k, v in inputs.items()}


def mist_bert(dtype=torch.float32, grad_drop=0.9):
    """A tiny BERT with MIST on every attention and feed-forward Linear, its AdamW (strict sparsity) and layers."""
    model = get_peft_model(tiny_bert().to(CUDA, dtype), MISTConfig(target_modules=["query", "value", "dense"],
                                                                   selection="magnitude", density=0.3,
                                                                   grad_drop=grad_drop))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    mist_peft.attach_optimizer(opt, model)
    return model.train(), opt, adapter_layers(model, "default")


def assert_moved_only_kept(layers, before, kept):
    """Strict sparsity after one step: only kept entries moved, and some did."""
    moved = 0
    for n, m in layers.items():
        changed = torch.nonzero(m.mist_values["default"].detach() != before[n]).reshape(-1)
        assert torch.isin(changed, kept[n]).all(), n
        moved += changed.numel()
    assert moved > 0


def test_training_is_strictly_sparse_and_round_trips_on_cuda(tmp_path):
    model = get_peft_model(tiny_bert().to(CUDA), MISTConfig(target_modules=["query", "value", "dense"],
                                                            selection="magnitude", density=0.3, grad_drop=0.9))
    layers = adapter_layers(model, "default")
    assert all(m.mist_values["default"].is_cuda and m.mist_indices["default"].is_cuda for m in layers.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    mist_peft.attach_optimizer(opt, model)
    inputs = on_cuda(tiny_inputs("bert"))
    model.train()
    moved_share = []
    for _ in range(3):
        before = {n: m.mist_values["default"].detach().clone() for n, m in layers.items()}
        model(**inputs).last_hidden_state.pow(2).mean().backward()
        kept = {n: m.kept_positions("default") for n, m in layers.items()}
        opt.step()
        opt.zero_grad()
        moved = 0
        for n, m in layers.items():
            changed = torch.nonzero(m.mist_values["default"].detach() != before[n]).reshape(-1)
            assert torch.isin(changed, kept[n]).all()
            moved += changed.numel()
        moved_share.append(moved / sum(v.numel() for v in before.values()))
    assert all(0.06 < s < 0.14 for s in moved_share), moved_share
    model.eval()
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert().to(CUDA), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, out)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).last_hidden_state, out, rtol=1e-4, atol=1e-4)


def test_bf16_base_keeps_fp32_values_and_trains():
    model = get_peft_model(tiny_bert().to(CUDA, torch.bfloat16), MISTConfig(target_modules=["query", "value"],
                                                                           selection="magnitude", grad_drop=0.5))
    layers = adapter_layers(model, "default")
    assert all(m.mist_values["default"].dtype == torch.float32 for m in layers.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mist_peft.attach_optimizer(opt, model)
    model.train()
    model(**on_cuda(tiny_inputs("bert"))).last_hidden_state.float().pow(2).mean().backward()
    opt.step()
    assert sum(int((m.mist_values["default"] != 0).sum()) for m in layers.values()) > 0


def test_mi_fisher_selection_on_cuda():
    model = get_peft_model(tiny_bert().to(CUDA), MISTConfig(target_modules=["query"], density=0.1))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 120, (8, 12), generator=g).to(CUDA),
                "labels": torch.randint(0, 3, (8,), generator=g).to(CUDA)} for _ in range(3)]
    chosen = select_mi_fisher(model, MIObjective(FeatureEncoder(model)).to(CUDA), batches)
    for name, layer in adapter_layers(model, "default").items():
        assert layer.mist_values["default"].numel() == chosen[name].numel() == round(0.1 * 32 * 32)


class TokensToPixels(torch.nn.Module):
    """Plain torch layers only (Embedding, Linear, Conv2d), so any host sync in the step is MIST's: a
    transformers model syncs on its own (e.g. when it checks an attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(120, 32)
        self.fc = torch.nn.Linear(32, 48)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, input_ids):
        h = self.fc(self.embed(input_ids))  # [batch, tokens, 48]
        return self.conv(h.view(h.shape[0], -1, 3, 4, 4).flatten(0, 1))


@pytest.mark.parametrize("grad_drop", [0.9, 0.0])
def test_training_step_does_not_sync_the_host(grad_drop):
    torch.manual_seed(0)
    model = get_peft_model(TokensToPixels().to(CUDA), MISTConfig(target_modules=["embed", "fc", "conv"],
                                                                  selection="magnitude", density=0.3,
                                                                  grad_drop=grad_drop))
    layers = adapter_layers(model, "default")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    inputs = on_cuda(tiny_inputs("bert"))  # host-to-device copies sync; done before the checked step

    def step():
        model(**inputs).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    model.train()
    step()  # one-time set-up (optimizer state) is not part of the check
    before = {n: m.mist_values["default"].detach().clone() for n, m in layers.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(m._live == "default" for m in layers.values())  # the in-place engine ran on all three types
    assert all(not torch.equal(m.mist_values["default"].detach(), before[n]) for n, m in layers.items())


def test_bf16_autocast_training_step_is_strictly_sparse():
    model, opt, layers = mist_bert()
    inputs = on_cuda(tiny_inputs("bert"))
    before = {n: m.mist_values["default"].detach().clone() for n, m in layers.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**inputs)  # the pooler's output too, so that every MIST layer (pooler.dense) gets a gradient
        loss = out.last_hidden_state.float().pow(2).mean() + out.pooler_output.float().pow(2).mean()
    loss.backward()
    kept = {n: m.kept_positions("default") for n, m in layers.items()}
    assert all(m.mist_values["default"].grad.dtype == torch.float32 for m in layers.values())
    opt.step()
    assert torch.isfinite(loss)
    assert_moved_only_kept(layers, before, kept)


def test_fp16_autocast_with_grad_scaler_is_strictly_sparse():
    model, opt, layers = mist_bert()
    inputs = on_cuda(tiny_inputs("bert"))
    scaler = torch.amp.GradScaler("cuda")
    before = {n: m.mist_values["default"].detach().clone() for n, m in layers.items()}
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(**inputs).last_hidden_state.float().pow(2).mean()
    scaler.scale(loss).backward()
    kept = {n: m.kept_positions("default") for n, m in layers.items()}
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale  # no inf/NaN gradient: the step was taken, not skipped
    assert_moved_only_kept(layers, before, kept)


def test_bf16_base_merged_equals_unmerged_and_base_comes_back_bit_exact():
    base = tiny_bert().to(CUDA, torch.bfloat16)
    inputs = on_cuda(tiny_inputs("bert"))
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    with torch.no_grad():
        base_out = base(**inputs).last_hidden_state.clone()
    model, opt, layers = mist_bert(torch.bfloat16, grad_drop=0.5)
    for _ in range(2):
        model(**inputs).last_hidden_state.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        unmerged = model(**inputs).last_hidden_state
        assert not torch.equal(unmerged, base_out)  # the trained delta is there
        with model.disable_adapter():
            assert torch.equal(model(**inputs).last_hidden_state, base_out)
        model.merge_adapter()
        assert torch.equal(model(**inputs).last_hidden_state, unmerged)
        model.unmerge_adapter()
        assert torch.equal(model(**inputs).last_hidden_state, unmerged)
    restored = dict(model.unload().named_parameters())
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[n], original[n]) for n in original)
