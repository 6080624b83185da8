"""Hub upload without network: capture exactly what would be uploaded, then load those files back."""

import shutil

import torch
from conftest import tiny_bert, tiny_inputs
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel, get_peft_model

import mist_peft  # noqa: F401  (registers MIST)
from mist_peft import MISTConfig


def test_push_to_hub_uploads_the_sparse_checkpoint_and_a_peft_card(tmp_path, monkeypatch):
    uploaded = tmp_path / "uploaded"
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = (repo_id, kwargs)
        shutil.copytree(folder_path, uploaded)
        return "https://huggingface.co/user/mist-tiny/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    base = tiny_bert()
    base.config._name_or_path = "tiny/bert"
    model = get_peft_model(base, MISTConfig(target_modules=["query"], selection="magnitude", grad_drop=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mist_values" in name:
                p.normal_()
    model.eval()
    assert model.push_to_hub("user/mist-tiny", private=True) == "https://huggingface.co/user/mist-tiny/commit/abc"
    assert calls["create_repo"][0] == "user/mist-tiny" and calls["create_repo"][1]["private"] is True
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    card = ModelCard.load(uploaded / "README.md")
    assert card.data.library_name == "peft"
    assert {"mist", "peft", "sparse-delta"} <= set(card.data.tags)
    assert card.data.base_model == "tiny/bert"
    assert "## MIST adapter" in card.text and "| default | query | 0.05 |" in card.text
    selected = sum(p.numel() for n, p in model.named_parameters() if "mist_values" in n)
    share = selected / sum(p.numel() for n, p in model.named_parameters() if "mist_values" not in n)
    assert f"{100 * share:.4f}%" in card.text
    loaded = PeftModel.from_pretrained(tiny_bert(), uploaded)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_save_pretrained_card_is_peft_with_mist_facts(tmp_path):
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"], selection="random"))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and "mist" in card.data.tags
    assert "| default | query, value | 0.05 | per_tensor | random | 0.9 |" in card.text
    model.save_pretrained(tmp_path)  # saving again replaces the MIST section instead of repeating it
    assert ModelCard.load(tmp_path / "README.md").text.count("## MIST adapter") == 1
