"""CUDA paths (device generators, SDDMM on GPU, bf16 bases); skipped where no GPU is present, as in CI."""

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
