"""Test-wide settings: everything must run offline (models and data come from installed packages)."""

import os

# Set before any Hugging Face library is imported by a test module, so no test can reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

CLINC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=16, patch_size=8, num_channels=3)
    return ViTModel(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, pixel_values):
        h = torch.relu(self.conv2(torch.relu(self.conv1(pixel_values))))
        return self.head(h.mean((2, 3)))


def tiny_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return TinyCNN().eval()


def tiny_inputs(kind: str, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind in ("vit", "cnn"):
        size = 16
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    return {"input_ids": torch.randint(0, 120, (batch, 10), generator=g)}


def model_output(model, inputs):
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def lm_batch(seed: int = 0):
    """Random token ids as a causal-LM batch (labels = inputs) for the tiny Llama/GPT-2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


MODELS = {"bert": tiny_bert, "vit": tiny_vit, "gpt2": tiny_gpt2, "llama": tiny_llama, "cnn": tiny_cnn}


@pytest.fixture
def clinc_dir() -> Path:
    if not (CLINC_DIR / "data_full.json").exists():
        pytest.skip(f"CLINC150 not found at {CLINC_DIR} (../shared beside the repo)")
    return CLINC_DIR


def synthetic_rows(n: int, classes: int = 3, seed: int = 0):
    """Random token ids whose first tokens depend on the label (so the MI loss can fall)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(10, 120, (10,), generator=g)
        ids[:3] = 1 + (i % classes)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long), "labels": i % classes})
    return rows


def collate_rows(rows):
    """Batch `synthetic_rows` rows."""
    return {"input_ids": torch.stack([r["input_ids"] for r in rows]),
            "attention_mask": torch.stack([r["attention_mask"] for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows])}


def train(model, inputs, steps=3, opt_cls=torch.optim.AdamW, **opt_kw):
    """A plain loop on mean(output^2); returns the optimizer (its state is checked by some tests)."""
    import mist_peft

    opt_kw.setdefault("lr", 1e-2)
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], **opt_kw)
    mist_peft.attach_optimizer(opt, model)
    model.train()
    for _ in range(steps):
        model_output(model, inputs).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt

