"""Toy models for the conformance table (tests/test_conformance.py): one per layer type MIST supports.

Each entry says how to build the model (seeded), what a batch looks like, which modules the MIST adapter
targets, a disjoint second target set for the two-adapter checks, and a head for `modules_to_save`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 2)

    def forward(self, x):
        h = torch.relu(self.lin0(x))
        h = torch.relu(self.lin1(h))
        return self.head(torch.tanh(self.lin2(h)))


class EmbConv1D(nn.Module):
    """transformers' Conv1D (GPT-2 style, weight stored [in, out]) fed by an Embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.conv1d = Conv1D(8, 6)  # nf=8 outputs, nx=6 inputs
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids):
        return self.head(torch.relu(self.conv1d(self.emb(input_ids))).mean(1))


class ConvNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, groups=groups, padding=kernel // 2)
        self.mix = nn.Conv2d(out_channels, out_channels, 1)
        self.head = nn.Linear(out_channels, 2)
        self.in_channels = in_channels

    def forward(self, x):
        h = torch.relu(self.mix(torch.relu(self.conv(x))))
        return self.head(h.mean((2, 3)))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                      bos_token_id=0, eos_token_id=0))


def _ids(batch: int = 3, length: int = 7, vocab: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=g)}


def _images(channels: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {"x": torch.randn(3, channels, 6, 6, generator=g)}


@dataclass(frozen=True)
class ToyModel:
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    targets: tuple[str, ...]  # the adapter's target_modules
    other: tuple[str, ...]  # targets disjoint from `targets`, for the second adapter
    head: str  # a module outside `targets` for modules_to_save
    layer_types: tuple[type, ...]  # the base layer types among `targets` (what the row covers)

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()


MODELS: dict[str, ToyModel] = {
    "mlp": ToyModel(MLP, lambda: {"x": torch.randn(3, 10, generator=torch.Generator().manual_seed(11))},
                    ("lin0", "lin1"), ("lin2",), "head", (nn.Linear,)),
    "emb_conv1d": ToyModel(EmbConv1D, _ids, ("emb", "conv1d"), ("head",), "head", (nn.Embedding, Conv1D)),
    "conv2d": ToyModel(lambda: ConvNet(3, 4, 3), lambda: _images(3), ("conv",), ("mix",), "head", (nn.Conv2d,)),
    "conv2d_groups": ToyModel(lambda: ConvNet(4, 6, 3, groups=2), lambda: _images(4), ("conv",), ("mix",), "head",
                              (nn.Conv2d,)),
    "conv2d_1x1": ToyModel(lambda: ConvNet(3, 5, 1), lambda: _images(3), ("conv", "mix"), ("head",), "head",
                           (nn.Conv2d,)),
    "bert": ToyModel(_bert, _ids, ("query", "value", "word_embeddings"), ("key", "intermediate.dense"),
                     "encoder.layer.0.output.LayerNorm", (nn.Linear, nn.Embedding)),
    "llama": ToyModel(_llama, _ids, ("q_proj", "v_proj", "down_proj"), ("k_proj", "up_proj"), "lm_head",
                      (nn.Linear,)),
    "gpt2": ToyModel(_gpt2, _ids, ("c_attn", "wte"), ("c_fc",), "lm_head", (Conv1D, nn.Embedding)),
}


def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits, last hidden state, or the plain tensor)."""
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state
