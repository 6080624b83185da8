"""Sparse checkpoints: what is written, exact round trips, every loading entry point, clear errors, atomicity."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_bert, tiny_inputs
from peft import (
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file

import mist_peft
from mist_peft import MISTConfig
from mist_peft.selection import mist_layers

CONFIG = dict(target_modules=["query", "value", "dense"], selection="magnitude", grad_drop=0.0)


def trained_adapter(tmp_path, **kw):
    model = get_peft_model(tiny_bert(), MISTConfig(**{**CONFIG, **kw}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mist_peft.attach_optimizer(opt, model)
    model.train()
    inputs = tiny_inputs("bert")
    for _ in range(2):
        model(**inputs).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    return model, path, inputs, out


def test_checkpoint_holds_only_indices_values_and_shapes(tmp_path):
    model, path, *_ = trained_adapter(tmp_path)
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(path / "adapter_model.safetensors")
    layers = mist_layers(model)
    assert len(tensors) == 3 * len(layers)
    biggest_weight = max(m.get_base_layer().weight.numel() for m in layers.values())
    for key, t in tensors.items():
        assert key.rsplit(".", 1)[1] in ("mist_values", "mist_indices", "mist_shape")
        assert t.numel() < 0.1 * biggest_weight
        if key.endswith("mist_indices"):
            assert t.dtype == torch.uint8  # varint gaps: about one byte per index at density 0.05
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MIST" and config["density"] == 0.05
    targeted = sum(m.get_base_layer().weight.numel() for m in layers.values())
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload / targeted <= 0.3  # fp32 values (0.2 B/weight) + varint indices (~0.05 B/weight)


def test_round_trip_is_bit_exact(tmp_path):
    model, path, inputs, out = trained_adapter(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), path)
    for (name, a), b in zip(mist_layers(model).items(), mist_layers(loaded).values(), strict=True):
        assert torch.equal(a.mist_indices["default"], b.mist_indices["default"]), name
        assert torch.equal(a.mist_values["default"], b.mist_values["default"]), name
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, out)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default
    trainable = PeftModel.from_pretrained(tiny_bert(), path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
    low_mem = PeftModel.from_pretrained(tiny_bert(), path, low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.equal(low_mem(**inputs).last_hidden_state, out)


def test_round_trip_in_a_fresh_process(tmp_path):
    _, path, inputs, out = trained_adapter(tmp_path)
    torch.save({"inputs": inputs, "out": out}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
import mist_peft
from peft import PeftModel
from conftest import tiny_bert
exp = torch.load({str(tmp_path / 'expected.pt')!r})
model = PeftModel.from_pretrained(tiny_bert(), {str(path)!r})
with torch.no_grad():
    assert torch.equal(model(**exp["inputs"]).last_hidden_state, exp["out"])
print("EXACT")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "EXACT" in result.stdout, result.stderr[-2000:]


def test_every_loading_entry_point(tmp_path):
    from transformers import AutoConfig, AutoModel

    _, path, inputs, out = trained_adapter(tmp_path)
    config = PeftConfig.from_pretrained(path)
    assert isinstance(config, MISTConfig) and config.inference_mode
    # AutoPeftModel resolves the base model from base_model_name_or_path: point it at a local copy.
    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    from peft import AutoPeftModel

    auto = AutoPeftModel.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(auto(**inputs).last_hidden_state, out)
    # transformers' integration
    hf = AutoModel.from_config(AutoConfig.from_pretrained(base_dir))
    hf.load_state_dict(tiny_bert().state_dict())
    hf.eval().load_adapter(str(path))
    with torch.no_grad():
        assert torch.equal(hf(**inputs).last_hidden_state, out)
    # inject_adapter_in_model + get/set_peft_model_state_dict
    injected = inject_adapter_in_model(MISTConfig(**CONFIG), tiny_bert())
    set_peft_model_state_dict(injected, load_file(path / "adapter_model.safetensors"))
    with torch.no_grad():
        assert torch.equal(injected(**inputs).last_hidden_state, out)
    again = get_peft_model_state_dict(injected)
    assert torch.equal(again["encoder.layer.0.attention.self.query.mist_values"],
                       load_file(path / "adapter_model.safetensors")[
                           "base_model.model.encoder.layer.0.attention.self.query.mist_values"])


def test_named_adapter_saved_in_its_subfolder(tmp_path):
    model, path, inputs, out = trained_adapter(tmp_path)
    model.add_adapter("second", MISTConfig(**{**CONFIG, "selection": "random"}))
    model.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "second" / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "both")
    loaded.load_adapter(tmp_path / "both" / "second", adapter_name="second")
    assert set(loaded.peft_config) == {"default", "second"}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, out)


def _rewrite(path, fn):
    tensors = load_file(path / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


QKEY = "base_model.model.encoder.layer.0.attention.self.query"


def test_wrong_base_shape_names_module_and_shapes(tmp_path):
    from transformers import BertConfig, BertModel

    _, path, *_ = trained_adapter(tmp_path)
    other = BertModel(BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"module 'base_model\.model\.encoder\.layer\.\d\..*\(32, 32\).*\(48, 48\)"):
        PeftModel.from_pretrained(other, path)


def test_other_module_names_are_reported(tmp_path):
    _, path, *_ = trained_adapter(tmp_path)
    _rewrite(path, lambda t: t.update({k.replace("query", "quarry"): t.pop(k) for k in list(t) if "query" in k}))
    with pytest.raises(ValueError, match="quarry.*base model it was trained on"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_indices_out_of_range(tmp_path):
    from mist_peft.sparse_io import decode_indices, encode_indices

    _, path, *_ = trained_adapter(tmp_path)

    def shift(t):
        idx = decode_indices(t[f"{QKEY}.mist_indices"])
        t[f"{QKEY}.mist_indices"] = encode_indices(idx + 5000)

    _rewrite(path, shift)
    with pytest.raises(ValueError, match=r"index \d+ is out of range for a weight of shape \(32, 32\)"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_duplicated_indices(tmp_path):
    from mist_peft.sparse_io import decode_indices

    _, path, *_ = trained_adapter(tmp_path)

    def duplicate(t):
        idx = decode_indices(t[f"{QKEY}.mist_indices"])
        idx[1] = idx[0]
        t[f"{QKEY}.mist_indices"] = idx.to(torch.int32)  # plain integer indices are accepted too

    _rewrite(path, duplicate)
    with pytest.raises(ValueError, match="corrupted at module .*query.*duplicates"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_values_and_indices_disagree(tmp_path):
    _, path, *_ = trained_adapter(tmp_path)
    _rewrite(path, lambda t: t.update({f"{QKEY}.mist_values": t[f"{QKEY}.mist_values"][:-1].clone()}))
    with pytest.raises(ValueError, match="values for .* indices"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_truncated_file_does_not_load(tmp_path):
    _, path, *_ = trained_adapter(tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)incomplete|deserializ|truncat"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_corrupted_index_stream(tmp_path):
    _, path, *_ = trained_adapter(tmp_path)

    def corrupt(t):
        stream = t[f"{QKEY}.mist_indices"].clone()
        stream[-1] = 0x80  # an unterminated varint, as a cut stream would end
        t[f"{QKEY}.mist_indices"] = stream

    _rewrite(path, corrupt)
    with pytest.raises(ValueError, match="corrupted at module .*query.*truncated"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_index_stream_that_wraps_around_int64_names_the_module(tmp_path):
    from mist_peft.sparse_io import encode_indices

    _, path, *_ = trained_adapter(tmp_path)

    def wrap(t):
        n = t[f"{QKEY}.mist_values"].numel()
        t[f"{QKEY}.mist_indices"] = torch.cat([encode_indices(torch.tensor([2**62]))] * n)

    _rewrite(path, wrap)
    with pytest.raises(ValueError, match="corrupted at module .*query.*(overflow int64|out of range)"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_invalid_config_file(tmp_path):
    _, path, *_ = trained_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["density"] = 1.5
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"MISTConfig\.density=1\.5 is invalid"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_interrupted_save_never_leaves_a_loadable_half_adapter(tmp_path, monkeypatch):
    import peft.peft_model

    model, path, inputs, out = trained_adapter(tmp_path)
    with torch.no_grad():
        for m in mist_layers(model).values():
            m.mist_values["default"].add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut while writing the weights")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    monkeypatch.undo()
    assert not [f for f in os.listdir(path) if f.startswith(".mist-save-")], "temporary files are cleaned up"
    # The earlier complete adapter is still there and loads exactly; nothing of the new one leaked in.
    loaded = PeftModel.from_pretrained(tiny_bert(), path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, out)


def test_interrupted_move_leaves_no_config(tmp_path, monkeypatch):
    from mist_peft import integration

    model, path, *_ = trained_adapter(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise KeyboardInterrupt("interrupted before the config was moved into place")
        real_replace(src, dst)

    monkeypatch.setattr(integration.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    assert not (path / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftConfig.from_pretrained(path)


@pytest.mark.parametrize("field,value,hint", [
    ("density", 0.0, "0 < density <= 1"), ("density", 2, "0 < density <= 1"),
    ("grad_drop", 1.0, "0 <= grad_drop < 1"), ("grad_drop", -0.1, "0 <= grad_drop < 1"),
    ("granularity", "layer", "per_tensor"), ("selection", "fishr", "mi_fisher"),
    ("rescale_kept_grads", "yes", "True or False"), ("seed", 1.5, "integer"),
])
def test_config_validation_names_field_value_and_range(field, value, hint):
    with pytest.raises(ValueError, match=rf"MISTConfig\.{field}=.*{value!r}.*invalid.*{hint}".replace("(", r"\(")):
        MISTConfig(**{field: value})


# ------------------------------------------------------------------------------- transformers' integration
def _outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("how", ["adapter_kwargs", "top_level", "load_config"])
def test_transformers_load_adapter_honours_subfolder_however_it_is_passed(tmp_path, how):
    from transformers.modeling_utils import LoadStateDictConfig

    model, path, inputs, out = trained_adapter(tmp_path)
    model.save_pretrained(tmp_path / "repo" / "sub")
    options = {"adapter_kwargs": {"adapter_kwargs": {"subfolder": "sub"}},
               "top_level": {"subfolder": "sub", "local_files_only": True, "token": "unused-for-local-files"},
               "load_config": {"load_config": LoadStateDictConfig(download_kwargs={"subfolder": "sub"})}}[how]
    hf = tiny_bert()
    hf.load_adapter(str(tmp_path / "repo"), **options)
    assert torch.equal(_outputs(hf, inputs), out)
    assert options.get("load_config") is None or options["load_config"].download_kwargs == {"subfolder": "sub"}


def test_from_pretrained_of_an_adapter_folder_decodes_mist(tmp_path):
    from transformers import AutoModel

    _, path, inputs, out = trained_adapter(tmp_path)
    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    assert torch.equal(_outputs(AutoModel.from_pretrained(path).eval(), inputs), out)


def test_a_mist_checkpoint_never_reaches_a_loader_that_cannot_decode_it(tmp_path):
    _, path, inputs, out = trained_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "density": 1.5}))
    with pytest.raises(ValueError, match=r"MISTConfig\.density=1\.5 is invalid"):
        tiny_bert().load_adapter(str(path))
    with pytest.raises(TypeError, match="unexpected keyword arguments.*revison"):
        tiny_bert().load_adapter(str(path), revison="main")
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    hf = tiny_bert()  # a config object and a state dict, as PEFT users pass them
    hf.load_adapter(peft_config=PeftConfig.from_pretrained(path),
                    adapter_state_dict=load_file(path / "adapter_model.safetensors"))
    assert torch.equal(_outputs(hf, inputs), out)


def test_transformers_adapter_calls_on_a_loaded_mist_adapter(tmp_path):
    """Every call of transformers' PEFT integration: adapted, disabled = base, re-enabled, switched, deleted."""
    model, path, inputs, out = trained_adapter(tmp_path)
    base_out = _outputs(tiny_bert(), inputs)
    hf = tiny_bert()
    hf.load_adapter(str(path))
    assert hf.active_adapters() == ["default"]
    assert torch.equal(_outputs(hf, inputs), out) and not torch.equal(out, base_out)
    hf.disable_adapters()
    assert torch.equal(_outputs(hf, inputs), base_out)
    hf.enable_adapters()
    assert torch.equal(_outputs(hf, inputs), out)
    saved = {k.removeprefix("base_model.model."): v for k, v in load_file(path / "adapter_model.safetensors").items()}
    state = hf.get_adapter_state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    second = get_peft_model(tiny_bert(), MISTConfig(**{**CONFIG, "selection": "random"}))
    with torch.no_grad():
        for m in mist_layers(second).values():
            m.mist_values["default"].normal_()
    second.save_pretrained(tmp_path / "second")
    second_out = _outputs(second.eval(), inputs)
    hf.load_adapter(str(tmp_path / "second"), adapter_name="second")
    hf.set_adapter("second")
    assert hf.active_adapters() == ["second"] and torch.equal(_outputs(hf, inputs), second_out)
    hf.set_adapter("default")
    hf.delete_adapter("second")
    assert list(hf.peft_config) == ["default"] and torch.equal(_outputs(hf, inputs), out)
    assert all("second" not in m.mist_values for m in mist_layers(hf).values())


def test_other_peft_types_take_transformers_own_loader(tmp_path):
    from peft import LoraConfig

    import mist_peft.integration

    lora = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    inputs = tiny_inputs("bert")
    expected = _outputs(lora.eval(), inputs)
    calls = []
    original = mist_peft.integration._original_load_adapter

    def spy(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(mist_peft.integration, "_original_load_adapter", spy)
    try:
        hf = tiny_bert()
        hf.load_adapter(str(tmp_path), adapter_kwargs={"subfolder": "lora"})
    finally:
        mp.undo()
    assert calls == [str(tmp_path)]
    assert torch.equal(_outputs(hf, inputs), expected)
