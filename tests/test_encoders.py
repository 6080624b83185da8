"""FeatureEncoder pooling, collate functions and extract_features."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    ViTConfig,
    ViTModel,
)

from mist_peft.assets import minilm_path
from mist_peft.encoders import FeatureEncoder, extract_features, image_collate, text_collate

torch.set_num_threads(2)


def small_bert(dropout: float = 0.0) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def minilm():
    return AutoTokenizer.from_pretrained(minilm_path()), BertModel.from_pretrained(minilm_path()).eval()


def test_mean_pooling_ignores_padding_with_packaged_minilm(minilm):
    tokenizer, model = minilm
    encoder = FeatureEncoder(model)
    collate = text_collate(tokenizer, max_length=32)
    rows = [
        {"text": "what is my balance", "label": 3},
        {"text": "please freeze my account right now, it was stolen", "label": 5},
    ]
    padded = collate(rows)
    alone = collate(rows[:1])
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]  # row 0 is padded in the pair
    assert padded["labels"].tolist() == [3, 5]
    with torch.no_grad():
        together = encoder(**padded)
        single = encoder(**alone)
    assert together.shape == (2, encoder.hidden_size) == (2, 384)
    torch.testing.assert_close(together[0], single[0], rtol=1e-4, atol=1e-5)
    # Without the mask, the padding tokens would shift the mean noticeably.
    with torch.no_grad():
        unmasked = model(**padded).last_hidden_state[0].mean(dim=0)
    assert (unmasked - single[0]).abs().max() > 1e-2


def test_cls_pooling_and_image_mean_skips_cls_token():
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=28,
            patch_size=7,
        ),
        add_pooling_layer=False,
    ).eval()
    batch = image_collate(28)([{"image": np.full((28, 28), i * 40, np.uint8), "label": i} for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 28, 28) and batch["labels"].tolist() == [0, 1, 2]
    with torch.no_grad():
        tokens = vit(pixel_values=batch["pixel_values"]).last_hidden_state  # [3, 1 + 16, 16]
        mean = FeatureEncoder(vit, "mean")(**batch)
        cls = FeatureEncoder(vit, "cls")(**batch)
    torch.testing.assert_close(mean, tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(cls, tokens[:, 0])
    with pytest.raises(ValueError, match="pooling"):
        FeatureEncoder(vit, "max")


def test_peft_wrapped_and_classification_backbones_pass_through():
    from peft import LoraConfig, get_peft_model

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    base = small_bert()
    with torch.no_grad():
        plain = FeatureEncoder(base)(input_ids=ids, attention_mask=mask)
        # LoRA starts as an identity update, so the wrapped model must give the same features.
        wrapped = get_peft_model(small_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
        via_peft = FeatureEncoder(wrapped)(input_ids=ids, attention_mask=mask)
        classifier = BertForSequenceClassification(base.config).eval()
        classifier.bert.load_state_dict(base.state_dict(), strict=False)
        via_hidden_states = FeatureEncoder(classifier)(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(via_peft, plain)
    # BertForSequenceClassification has no last_hidden_state: hidden_states[-1] is the same tensor.
    torch.testing.assert_close(via_hidden_states, plain)
    assert FeatureEncoder(wrapped).hidden_size == 16


@pytest.mark.parametrize("start_in_training_mode", [True, False])
def test_extract_features_runs_in_eval_and_restores_mode(start_in_training_mode):
    model = small_bert(dropout=0.5)  # dropout makes train-mode outputs random, eval-mode ones fixed
    encoder = FeatureEncoder(model).train(start_in_training_mode)
    rng = np.random.default_rng(0)
    data = datasets.Dataset.from_dict(
        {"input_ids": rng.integers(1, 100, size=(10, 6)).tolist(), "label": list(range(10))}
    )

    def collate(rows):
        return {
            "input_ids": torch.tensor([r["input_ids"] for r in rows]),
            "attention_mask": torch.ones(len(rows), 6, dtype=torch.long),
            "labels": torch.tensor([r["label"] for r in rows]),
        }

    loader = DataLoader(data, batch_size=4, collate_fn=collate)
    first, labels = extract_features(encoder, loader)
    second, _ = extract_features(encoder, loader)
    assert encoder.training is start_in_training_mode and model.training is start_in_training_mode
    assert first.shape == (10, 16) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert labels.dtype == torch.long and labels.tolist() == list(range(10))
    assert torch.equal(first, second)  # eval mode: no dropout
    assert not first.requires_grad
