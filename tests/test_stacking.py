"""Prompt tuning (BERT) and prefix tuning (small Llama) stacked on MIST: train, save, reload, resume."""

import torch
from conftest import tiny_bert, tiny_inputs, tiny_llama
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

import mist_peft
from mist_peft import MISTConfig
from mist_peft.selection import mist_layers
from mist_peft.stacking import load_stacked, merge_then_prompt, mist_part, save_stacked, stack_prompt


def bert_seq_cls(seed=0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert().config).eval()


def mist_values(model):
    return {n.split("base_model.model.")[-1]: m.mist_values["default"].detach().clone()
            for n, m in mist_layers(model).items()}


def run(model, batch, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mist_peft.attach_optimizer(opt, model)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_merge_then_prompt_trains_only_the_prompt():
    base = bert_seq_cls()
    mist = get_peft_model(base, MISTConfig(target_modules=["query", "value"], selection="magnitude", grad_drop=0.0,
                                           task_type=TaskType.SEQ_CLS))
    batch = {**tiny_inputs("bert"), "labels": torch.tensor([0, 1, 0, 1])}
    run(mist, batch)
    prompt = merge_then_prompt(mist, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    assert not mist_layers(prompt)
    trainable = {n for n, p in prompt.named_parameters() if p.requires_grad}
    assert any("prompt_encoder" in n for n in trainable)
    assert not any("encoder.layer" in n and "prompt" not in n for n in trainable)
    before = prompt.prompt_encoder["default"].embedding.weight.detach().clone()
    run(prompt, batch, steps=1)
    assert not torch.equal(prompt.prompt_encoder["default"].embedding.weight, before)


def _stack_round_trip(tmp_path, make_base, targets, prompt_config, batch, forward_inputs):
    mist = get_peft_model(make_base(), MISTConfig(target_modules=targets, selection="magnitude", grad_drop=0.0,
                                                  task_type=prompt_config.task_type))
    stacked = stack_prompt(mist, prompt_config)
    values0 = mist_values(stacked)
    prompt0 = stacked.prompt_encoder["default"].embedding.weight.detach().clone()
    run(stacked, batch)
    # both adapters trained
    assert any(not torch.equal(v, values0[k]) for k, v in mist_values(stacked).items())
    assert not torch.equal(stacked.prompt_encoder["default"].embedding.weight, prompt0)
    with torch.no_grad():
        expected = stacked(**forward_inputs).logits
    save_stacked(stacked, tmp_path / "stack")
    assert (tmp_path / "stack" / "mist" / "adapter_model.safetensors").exists()
    assert (tmp_path / "stack" / "prompt" / "adapter_model.safetensors").exists()
    loaded = load_stacked(make_base(), tmp_path / "stack")
    with torch.no_grad():
        assert torch.equal(loaded(**forward_inputs).logits, expected)
    # resume training of both
    resumed = load_stacked(make_base(), tmp_path / "stack", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(resumed(**forward_inputs).logits, expected)
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "mist_values" in n)
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "prompt_encoder" in n)
    values1 = mist_values(resumed)
    prompt1 = resumed.prompt_encoder["default"].embedding.weight.detach().clone()
    run(resumed, batch, steps=1)
    assert any(not torch.equal(v, values1[k]) for k, v in mist_values(resumed).items())
    assert not torch.equal(resumed.prompt_encoder["default"].embedding.weight, prompt1)
    assert isinstance(mist_part(resumed), type(mist))


def test_prompt_tuning_stacked_on_unmerged_mist(tmp_path):
    batch = {**tiny_inputs("bert"), "labels": torch.tensor([0, 1, 0, 1])}
    _stack_round_trip(tmp_path, bert_seq_cls, ["query", "value"], PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4),
                      batch, tiny_inputs("bert"))


def test_prefix_tuning_stacked_on_unmerged_mist_llama(tmp_path):
    ids = tiny_inputs("llama")["input_ids"]
    batch = {"input_ids": ids, "labels": ids}
    _stack_round_trip(tmp_path, tiny_llama, ["q_proj", "v_proj"], PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
                      batch, {"input_ids": ids})


def test_merge_mist_while_prompt_is_stacked_keeps_outputs():
    mist = get_peft_model(bert_seq_cls(), MISTConfig(target_modules=["query"], selection="magnitude", grad_drop=0.0,
                                                     task_type=TaskType.SEQ_CLS))
    stacked = stack_prompt(mist, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    run(stacked, {**tiny_inputs("bert"), "labels": torch.tensor([0, 1, 0, 1])})
    with torch.no_grad():
        before = stacked(**tiny_inputs("bert")).logits
        mist_part(stacked).merge_adapter()
        torch.testing.assert_close(stacked(**tiny_inputs("bert")).logits, before, rtol=1e-5, atol=1e-5)


def test_stacked_prompt_keeps_bias_and_norm_deltas_training():
    """`tune_biases_and_norms`: under a stacked prompt the dense bias/norm deltas train with the weight deltas."""
    mist = get_peft_model(bert_seq_cls(), MISTConfig(target_modules=["query", "value"], selection="magnitude",
                                                     grad_drop=0.0, tune_biases_and_norms=True,
                                                     task_type=TaskType.SEQ_CLS))
    stacked = stack_prompt(mist, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    dense = {n: p for n, p in stacked.named_parameters() if "mist_bias_values" in n or "mist_norm_values" in n}
    assert dense and all(p.requires_grad for p in dense.values())
    before = {n: p.detach().clone() for n, p in dense.items()}
    run(stacked, {**tiny_inputs("bert"), "labels": torch.tensor([0, 1, 0, 1])})
    moved = [n for n, p in dense.items() if not torch.equal(p, before[n])]
    assert any("mist_bias_values" in n for n in moved) and any("mist_norm_values" in n for n in moved)
    frozen = stack_prompt(get_peft_model(bert_seq_cls(), MISTConfig(
        target_modules=["query"], selection="magnitude", tune_biases_and_norms=True, task_type=TaskType.SEQ_CLS)),
        PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4), train_mist=False)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "mist_" in n)
