"""MIST is right in any training loop with no extra call: plain torch, a stock Trainer, TRL's SFTTrainer.

Every loop is checked the same way: after each optimizer step nothing outside that step's kept subset moved
(value and optimizer state), the kept subset is redrawn every step (after N steps with grad_drop=0.9 the share
of selected entries ever updated is close to 1 - 0.9^N), and save / reload / merge give identical outputs.
"""

import warnings

import pytest
import torch
from conftest import LLAMA_TARGETS, lm_batch, tiny_bert, tiny_inputs, tiny_llama
from peft import PeftModel, get_peft_model

import mist_peft
from mist_peft import MISTConfig
from mist_peft.layer import MISTSelectionError, count_for
from mist_peft.selection import install_selection, is_selected, mist_layers


class StrictnessProbe:
    """Snapshots before each optimizer step, checks after it, and records which entries ever moved."""

    def __init__(self, model, optimizer):
        self.layers = mist_layers(model, "default")
        self.optimizer = optimizer
        self.ever = {n: torch.zeros(m.mist_values["default"].numel(), dtype=torch.bool) for n, m in self.layers.items()}
        self.steps = 0

    def before(self):
        self.saved = {}
        for name, m in self.layers.items():
            p = m.mist_values["default"]
            kept = m.mist_kept["default"]
            assert kept[0] == m.mist_step  # drawn for this step
            keep = torch.zeros(p.numel(), dtype=torch.bool)
            keep[kept[1]] = True
            state = {k: v.clone() for k, v in self.optimizer.state.get(p, {}).items() if torch.is_tensor(v) and v.ndim}
            self.saved[name] = (keep, p.detach().clone(), state)

    def after(self):
        for name, m in self.layers.items():
            p = m.mist_values["default"].detach()
            keep, value, state = self.saved[name]
            assert torch.equal(p[~keep], value[~keep]), f"{name}: a dropped entry moved"
            for key, new in self.optimizer.state.get(m.mist_values["default"], {}).items():
                if torch.is_tensor(new) and new.ndim:
                    old = state.get(key, torch.zeros_like(new))
                    assert torch.equal(new[~keep], old[~keep]), f"{name}: optimizer state '{key}' moved when dropped"
            self.ever[name] |= p != value
        self.steps += 1

    def ever_share(self) -> float:
        return float(torch.cat(list(self.ever.values())).float().mean())



def assert_save_reload_merge_identical(model, make_base, tmp_path, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, out)
        assert torch.equal(model.merge_and_unload()(**inputs).logits, out)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_plain_torch_loop_is_strict_and_redraws_every_step(optimizer, tmp_path):
    model = get_peft_model(tiny_llama(), MISTConfig(target_modules=LLAMA_TARGETS, selection="random", density=0.2,
                                                    grad_drop=0.9, seed=3))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1))
    probe = StrictnessProbe(model, opt)
    model.train()
    steps = 12
    for step in range(steps):
        model(**lm_batch(step)).loss.backward()
        probe.before()
        opt.step()
        probe.after()
        opt.zero_grad()
    expected = 1 - 0.9**steps  # 0.718: a frozen 10% subset would give about 0.1
    assert abs(probe.ever_share() - expected) < 0.05, probe.ever_share()
    assert_save_reload_merge_identical(model, tiny_llama, tmp_path, lm_batch(99))


def test_attach_optimizer_and_callback_are_idempotent():
    """The old explicit call still works and does not apply the strict update twice."""
    moved = []
    for extra_calls in (0, 2):
        model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], selection="random", grad_drop=0.5))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        for _ in range(extra_calls):
            assert mist_peft.attach_optimizer(opt, model) == []
        model.train()
        for step in range(3):
            model(**tiny_inputs("bert", seed=step)).last_hidden_state.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        moved.append(torch.cat([m.mist_values["default"].detach().clone() for m in mist_layers(model).values()]))
        assert all(m.mist_step == 3 for m in mist_layers(model).values())  # one clock tick per step
    assert torch.equal(moved[0], moved[1])


def test_training_steps_do_not_make_the_users_own_warnings_repeat():
    """Python shows a warning once per place under its default filter. A `warnings.catch_warnings` in MIST's
    backward (to hide torch's once-per-process sparse-CSR notice) reset that registry at every step, so a user's
    deprecation warning printed again after each step."""
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"], selection="random"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()

    def users_code():
        warnings.warn("the user's own deprecation", FutureWarning, stacklevel=1)

    def step(seed: int) -> None:
        model(**tiny_inputs("bert", seed=seed)).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    step(0)  # the first sampled matmul of the process spends torch's notice (one registry reset, at most)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for seed in range(1, 4):
            users_code()
            step(seed)
    assert [str(w.message) for w in caught if w.category is FutureWarning] == ["the user's own deprecation"]
    assert all(m.mist_step == 4 for m in mist_layers(model).values())


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_fresh_optimizer_first_step_leaves_dropped_state_at_its_initial_value(optimizer):
    """Resume-like start: non-zero values, weight decay, optimizer state created lazily inside the first step."""
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"], selection="random",
                                                   density=0.3, grad_drop=0.9))
    with torch.no_grad():
        for m in mist_layers(model).values():
            m.mist_values["default"].normal_()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
           "adam": lambda: torch.optim.Adam(params, lr=0.1, weight_decay=0.1),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)}[optimizer]()
    probe = StrictnessProbe(model, opt)
    model.train()
    for step in range(2):
        model(**tiny_inputs("bert", seed=step)).last_hidden_state.pow(2).mean().backward()
        probe.before()
        opt.step()
        probe.after()
        opt.zero_grad()
    assert any(state for state in opt.state.values())  # the state exists and was checked at dropped entries


def test_optimizer_built_before_mi_fisher_selection_trains_the_selected_entries():
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], grad_drop=0.0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)  # before selection
    layers = mist_layers(model)
    chosen = {n: torch.arange(0, 2 * count_for(m.get_base_layer().weight.numel(), 0.05), 2) for n, m in layers.items()}
    install_selection(model, "default", chosen)  # what select_mi_fisher does after scoring
    model.train()
    model(**tiny_inputs("bert")).last_hidden_state.pow(2).mean().backward()
    opt.step()
    assert all(bool((m.mist_values["default"] != 0).any()) for m in layers.values())


def test_optimizer_built_before_a_global_selection_raises_with_the_fix():
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"], granularity="global"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    layers = mist_layers(model)
    install_selection(model, "default", {n: torch.tensor([0, 5]) for n in layers})
    with pytest.raises(RuntimeError, match="Create the optimizer after selection"):
        mist_peft.attach_optimizer(opt, model)
    model.train()
    model(**tiny_inputs("bert")).last_hidden_state.pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="replaced when the adapter's entries were selected"):
        opt.step()


def test_mi_fisher_in_a_plain_loop_refuses_at_the_first_training_forward():
    model = get_peft_model(tiny_llama(), MISTConfig(target_modules=LLAMA_TARGETS))
    model.train()
    with pytest.raises(MISTSelectionError, match="select_mi_fisher.*selection='fisher'.*data-free"):
        model(**lm_batch(0))


def test_fisher_selection_scores_the_loops_own_loss_then_tunes():
    score_steps = 3
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"], selection="fisher",
                                                   score_steps=score_steps, density=0.1, grad_drop=0.5))
    reference = tiny_bert()  # the same weights: squared gradients of the same loss, by plain autograd
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    layers = mist_layers(model)
    expected = {n: torch.zeros_like(m.get_base_layer().weight) for n, m in layers.items()}
    ref_weights = {n: reference.get_submodule(n.removeprefix("base_model.model.")).weight for n in layers}
    for w in ref_weights.values():
        w.requires_grad_(True)
    for step in range(score_steps + 4):
        inputs = tiny_inputs("bert", seed=step)
        model(**inputs).last_hidden_state.pow(2).mean().backward()  # eval mode: no dropout, same numbers
        if step < score_steps:
            assert not is_selected(model, "default")
            reference(**inputs).last_hidden_state.pow(2).mean().backward()
            for n, w in ref_weights.items():
                expected[n] += w.grad.pow(2)
                w.grad = None
        opt.step()
        opt.zero_grad()
        if step < score_steps - 1:
            assert all(bool((m.mist_values["default"] == 0).all()) for m in layers.values())  # nothing moves
    assert is_selected(model, "default")
    for n, m in layers.items():
        k = count_for(expected[n].numel(), 0.1)
        top = set(torch.topk(expected[n].reshape(-1), k).indices.tolist())
        got = set(m.mist_indices["default"].tolist())
        assert len(got) == k and len(got & top) >= k - 1, n  # ties at the boundary may differ by one
        assert bool((m.mist_values["default"] != 0).any())  # tuning started after the warm-up


def test_fisher_with_global_granularity_is_refused_up_front():
    with pytest.raises(ValueError, match="granularity.*per_tensor"):
        MISTConfig(selection="fisher", granularity="global")


@pytest.mark.parametrize("seed", [2**40, 2**70, -7])
def test_any_integer_seed_trains(seed):
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query"], selection="random", seed=seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**tiny_inputs("bert")).last_hidden_state.pow(2).mean().backward()
    opt.step()
    assert any(bool((m.mist_values["default"] != 0).any()) for m in mist_layers(model).values())


def test_stock_trainer_with_a_classification_loss_needs_no_callback(tmp_path):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    def make_base():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=64, num_labels=3))

    model = get_peft_model(make_base(), MISTConfig(target_modules=["query", "value", "intermediate.dense"],
                                                   selection="magnitude", density=0.2, grad_drop=0.9,
                                                   modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 120, (10,), generator=g), "labels": int(i % 3)} for i in range(64)]

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if not hasattr(self, "probe"):
                self.probe = StrictnessProbe(model, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
            self.probe.before()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.probe.after()

    probe = Probe()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=50)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[probe]).train()
    assert probe.probe.steps == 12
    print(f"Trainer: share of selected entries ever updated after 12 steps {probe.probe.ever_share():.3f}")
    assert abs(probe.probe.ever_share() - (1 - 0.9**12)) < 0.06, probe.probe.ever_share()
    assert_save_reload_merge_identical(model, make_base, tmp_path, {"input_ids": data[0]["input_ids"][None]})


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(110)} | {"[PAD]": 110, "[EOS]": 111, "[UNK]": 112}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def _sft(tmp_path, config, bf16=False, steps=10):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 110, (12,), generator=g)) for _ in range(48)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=steps, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, bf16=bf16,
                         logging_steps=50, max_length=16)
    trainer = trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=_tiny_tokenizer(), peft_config=config)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("selection", ["fisher", "magnitude"])
def test_trl_sft_trainer_trains_the_selected_entries_with_redraws(tmp_path, selection, bf16):
    trainer = _sft(tmp_path, MISTConfig(target_modules=LLAMA_TARGETS, selection=selection, score_steps=2,
                                        density=0.2, grad_drop=0.9), bf16=bf16)
    model = trainer.model
    layers = mist_layers(model)
    trainer.train()
    assert is_selected(model, "default")
    values = torch.cat([m.mist_values["default"].detach() for m in layers.values()])
    tuned_steps = 10 - (2 if selection == "fisher" else 0)
    share = float((values != 0).float().mean())
    print(f"TRL {selection} bf16={bf16}: ever updated after {tuned_steps} tuning steps {share:.3f}")
    assert abs(share - (1 - 0.9**tuned_steps)) < 0.06, share  # redrawn every step, not a frozen 10%
    inputs = {"input_ids": torch.randint(0, 110, (2, 8))}
    model.eval()
    base = tiny_llama()  # with the dtypes TRL left (with bf16 it casts the frozen weights to bf16)
    dtypes = {k.replace(".base_layer", ""): p.dtype for k, p in model.base_model.model.named_parameters()}
    for k, p in base.named_parameters():
        p.data = p.data.to(dtypes[k])
    with torch.no_grad():
        out = model(**inputs).logits
        model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # Accelerate wrapped the trained forward
            assert torch.equal(reloaded(**inputs).logits.float(), out)


@pytest.mark.slow
def test_trl_sft_trainer_with_the_default_mi_fisher_refuses_clearly(tmp_path):
    trainer = _sft(tmp_path, MISTConfig(target_modules=LLAMA_TARGETS), steps=2)
    with pytest.raises(MISTSelectionError, match="selection='fisher'"):
        trainer.train()


def test_optimizer_hooks_follow_a_grown_optimizer_and_replaced_values():
    """The hooks remember each optimizer's MIST parameters between steps. A parameter group added later must
    get strict sparsity too, and values replaced by a new selection after steps were taken must still raise."""
    model = get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"], selection="magnitude"))
    layers = list(mist_layers(model).values())
    values = [m.mist_values["default"] for m in layers]
    opt = torch.optim.SGD(values[:2], lr=0.5, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad()
        model(**tiny_inputs("bert")).last_hidden_state.pow(2).mean().backward()
        before = [v.detach().clone() for v in values]
        kept = [m.kept_positions("default") for m in layers]
        opt.step()
        return [(v.detach() != b).nonzero().flatten() for v, b in zip(values, before, strict=True)], kept

    step()
    opt.add_param_group({"params": values[2:]})
    _, earlier = step()  # momentum of the new group's kept entries: they would move in the next step without the hooks
    changed, kept = step()
    assert all(not torch.equal(a, b) for a, b in zip(earlier, kept, strict=True))  # every subset was redrawn
    assert all(c.numel() > 0 for c in changed)
    assert all(set(c.tolist()) <= set(k.tolist()) for c, k in zip(changed, kept, strict=True))
    layers[0].set_indices("default", torch.arange(5))  # a new size: the values tensor is replaced (retired)
    with pytest.raises(RuntimeError, match="replaced when the adapter's entries were selected"):
        step()


def test_one_optimizer_over_mixed_dtypes_and_late_created_state_stays_strict():
    """The hooks snapshot and restore all values of one dtype as one concatenated tensor: an optimizer that
    holds fp32 and fp64 values, one of which gets its Adam state only in the second step (no gradient in the
    first), still leaves every dropped entry and its state exactly as it was."""
    models = [get_peft_model(tiny_bert(), MISTConfig(target_modules=["query", "value"], selection="random",
                                                     density=0.3, grad_drop=0.8, seed=5)) for _ in range(2)]
    models[1].double()
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.float32, torch.float64}
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    probes = [StrictnessProbe(m, opt) for m in models]
    late = next(iter(mist_layers(models[0]).values())).mist_values["default"]
    for m in models:
        m.train()
    for step in range(3):
        for m in models:
            out = m(**tiny_inputs("bert", seed=step)).last_hidden_state
            out.pow(2).mean().backward()
        if step == 0:
            late.grad = None  # the optimizer skips it now and creates its state in the next step
        for probe in probes:
            probe.before()
        opt.step()
        for probe in probes:
            probe.after()
        opt.zero_grad()
        assert (late in opt.state) == (step > 0)
    assert all(probe.ever_share() > 0 for probe in probes)
