"""Hub upload without network: capture exactly what would be uploaded, then load those files back."""

import copy
import shutil
import types

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
        return types.SimpleNamespace(repo_id=repo_id)

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
    # Share of base weights changed, counted independently: entries a merge changes / parameters of the base.
    merged = copy.deepcopy(model).merge_and_unload()
    fresh = dict(tiny_bert().named_parameters())
    changed = sum(int((p != fresh[n]).sum()) for n, p in merged.named_parameters())
    assert changed == 2 * 51  # every selected entry: 5% of 32x32 in each of the 2 query layers
    assert f"{100 * changed / sum(p.numel() for p in fresh.values()):.4f}%" in card.text
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


class FakeHub:
    """A local stand-in for the Hub API: repos with branches; commits to a missing branch fail as on the Hub."""

    def __init__(self, tmp_path):
        self.root, self.calls, self.branches = tmp_path / "hub", [], {"main"}

    def create_repo(self, repo_id, *, private=None, token=None, exist_ok=False, repo_type=None, **kw):
        self.calls.append(("create_repo", repo_id, private, token))
        full = repo_id if "/" in repo_id else f"me/{repo_id}"
        return type("RepoUrl", (), {"repo_id": full})()

    def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, repo_type=None, **kw):
        self.calls.append(("create_branch", repo_id, branch))
        self.branches.add(branch)

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, create_pr=False,
                      commit_description=None, token=None, repo_type=None, **kw):
        if revision is not None and revision not in self.branches:
            raise RuntimeError(f"404: revision {revision} not found")  # what the Hub answers
        self.calls.append(("upload_folder", repo_id, revision, commit_message, create_pr, commit_description))
        shutil.copytree(folder_path, self.root / repo_id / (revision or "main"))
        return f"https://huggingface.co/{repo_id}/commit/1"

    def install(self, monkeypatch):
        for name in ("create_repo", "create_branch", "upload_folder"):
            monkeypatch.setattr(HfApi, name, lambda api, *a, _n=name, **k: getattr(self, _n)(*a, **k))


def test_push_to_hub_takes_every_argument_of_the_method_it_replaces():
    import inspect

    from transformers.utils.hub import PushToHubMixin

    from mist_peft import hub

    ours = inspect.signature(hub.push_to_hub).parameters
    theirs = inspect.signature(PushToHubMixin.push_to_hub).parameters
    assert set(theirs) - {"self"} <= set(ours) - {"model"}
    assert {"safe_serialization", "use_temp_dir"} <= set(ours)  # transformers 4.x arguments


def test_push_to_hub_options_reach_the_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path)
    hub.install(monkeypatch)
    monkeypatch.chdir(tmp_path)
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], selection="magnitude", grad_drop=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mist_values" in name:
                p.normal_()
    model.eval()
    url = model.push_to_hub("tiny", revision="dev", safe_serialization=False, max_shard_size="1GB",
                            use_temp_dir=True, commit_message="v1", commit_description="why", private=True,
                            token="tok", tags=["demo"])
    assert url == "https://huggingface.co/me/tiny/commit/1"
    assert hub.calls == [("create_repo", "tiny", True, "tok"), ("create_branch", "me/tiny", "dev"),
                         ("upload_folder", "me/tiny", "dev", "v1", False, "why")]
    uploaded = hub.root / "me" / "tiny" / "dev"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    assert "demo" in ModelCard.load(uploaded / "README.md").data.tags
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(tiny_bert(), uploaded)(**inputs).last_hidden_state,
                           model(**inputs).last_hidden_state)
    hub.calls.clear()
    model.push_to_hub("me/kept", use_temp_dir=False, create_pr=True)
    assert (tmp_path / "kept" / "adapter_model.safetensors").exists()  # saved locally and kept, as documented
    assert hub.calls[-1] == ("upload_folder", "me/kept", None, "Upload MIST adapter", True, None)
