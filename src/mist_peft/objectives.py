"""Mutual-information (contrastive) objectives used by MIST for scoring and tuning.

MIST scores every backbone weight with the squared gradient of a supervised contrastive loss and then tunes the
selected entries with the same loss (MIST_SPEC.md §3.3). This module provides:

- :class:`ProjectionHead`: the reference's linear 128-d head (no non-linearity). It returns the *raw* projection;
  L2 normalisation is done once, inside :class:`MILoss`, so the head and the loss never normalise twice.
- :func:`mist_loss`: the authors' loss (SimCLR pair NT-Xent + 2x SupCon with self counted as a positive).
- :func:`supcon_loss`: plain Khosla et al. SupCon, positives exclude self.
- :class:`MILoss`: normalises the embeddings (eps 1e-8) and dispatches to one of the two.

Both functional losses take ``z`` with 2B rows: rows ``0..B-1`` are view 1 and rows ``B..2B-1`` view 2 of the same
B samples, and ``labels`` with the B original labels (view ``j`` has label ``labels[j mod B]``). They use ``z``
as given (cosine similarities only if the rows are unit vectors; :class:`MILoss` guarantees that), and compute
every log-probability as ``s_jk/τ − logsumexp_{l≠j}(s_jl/τ)``, which is finite for any finite input.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SELF_POSITIVE_LOSS",
    "MILoss",
    "ProjectionHead",
    "mist_loss",
    "supcon_loss",
]

LossKind = Literal["mist", "supcon"]
_VALID_KINDS: tuple[str, ...] = get_args(LossKind)

#: Loss of the k = j ("self") positive in the reference: p_jj = 0 there, so ℓ_jj = −log(0 + 1e-8) = 8·ln 10.
#: It is a constant with zero gradient; keeping it reproduces the reference's logged loss scale (~12–18).
SELF_POSITIVE_LOSS: float = -math.log(1e-8)

_NORM_EPS = 1e-8


class ProjectionHead(nn.Module):
    """Linear projection (with bias, no non-linearity) from backbone features to the contrastive space.

    Matches the reference head (``Linear(768→128)``). The caller keeps one instance across tasks, as the reference
    does. The output is *not* normalised: :class:`MILoss` L2-normalises (eps 1e-8) before computing the loss.
    """

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"ProjectionHead: in_dim and out_dim must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        self.linear = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, features: Tensor) -> Tensor:
        """Project ``features[..., in_dim]`` to ``[..., out_dim]`` (unnormalised)."""
        return self.linear(features)


def _check_temperature(temperature: float, where: str) -> None:
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not ok or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{where}: temperature must be a finite number > 0, got temperature={temperature!r}")


def _check_inputs(z: Tensor, labels: Tensor, temperature: float, where: str) -> tuple[Tensor, Tensor]:
    """Validate shapes/temperature and return (z in ≥float32, labels on z's device)."""
    _check_temperature(temperature, where)
    if not isinstance(z, Tensor) or z.dim() != 2:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"{where}: z must be a 2-D tensor [2B, D], got {shape}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.numel() == 0:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{where}: labels must be a non-empty 1-D tensor [B], got {shape}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{where}: labels must be an integer (class id) tensor, got dtype {labels.dtype}")
    b = labels.shape[0]
    if z.shape[0] != 2 * b:
        raise ValueError(
            f"{where}: z must have 2*len(labels) rows (two views of each sample), expected shape "
            f"[{2 * b}, D] for len(labels)={b}, got {tuple(z.shape)}"
        )
    if z.dtype in (torch.float16, torch.bfloat16):
        # exp/logsumexp over 2B rows at τ = 0.07 needs more than half precision.
        z = z.float()
    return z, labels.to(z.device)


def _log_probs(z: Tensor, temperature: float) -> Tensor:
    """Matrix of log p_jk = s_jk/τ − logsumexp_{l≠j} s_jl/τ; the diagonal is finite but meaningless."""
    logits = (z @ z.T) / temperature
    n = logits.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    # The softmax denominator excludes l = j; -inf entries get exactly zero weight and zero gradient.
    lse = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    return logits - lse


def _views_labels(labels: Tensor) -> Tensor:
    return torch.cat([labels, labels])


def mist_loss(z: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """The authors' MI loss (MIST_SPEC.md §3.3), used for both sensitivity scoring and sparse tuning.

    ``L = (1/(2B))·Σ_i (ℓ_{i,i+B} + ℓ_{i+B,i}) + (1/B)·Σ_j (1/|P(j)|)·Σ_{k∈P(j)} ℓ_jk`` with ``ℓ_jk = −log p_jk``,
    ``p_jk`` the softmax of ``s_jk/τ`` over ``l ≠ j`` and ``P(j) = {k : ỹ_k = ỹ_j}`` *including* ``k = j``.

    Differences from the reference implementation, by design:

    - ℓ_jk for k ≠ j is exact (log-sum-exp). The reference computes ``−log(p_jk + 1e-8)`` with a ``+1e-8`` in the
      softmax denominator, which caps ℓ at about 18.4 for tiny probabilities; values agree whenever all
      probabilities are well above 1e-8.
    - ℓ_jj (self-positive, p_jj = 0 in the reference) is reproduced as the constant ``−log(1e-8)``
      (:data:`SELF_POSITIVE_LOSS`), with zero gradient, so the loss sits on the reference's scale.

    Args:
        z: ``[2B, D]`` embeddings, view 1 rows then view 2 rows (normalise them first; :class:`MILoss` does).
        labels: ``[B]`` integer class ids of the original samples.
        temperature: softmax temperature τ (> 0).
    """
    z, labels = _check_inputs(z, labels, temperature, "mist_loss")
    b = labels.shape[0]
    n = 2 * b
    log_p = _log_probs(z, temperature)

    idx = torch.arange(b, device=z.device)
    pair = -(log_p[idx, idx + b] + log_p[idx + b, idx]).sum() / n

    y = _views_labels(labels)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = (y[:, None] == y[None, :]) & ~eye  # positives other than self
    n_pos = pos.sum(dim=1).to(log_p.dtype) + 1.0  # |P(j)| counts self
    # where(), not multiplication, so the unused diagonal never mixes into the sum.
    pos_sum = -torch.where(pos, log_p, torch.zeros((), dtype=log_p.dtype, device=z.device)).sum(dim=1)
    per_anchor = (pos_sum + SELF_POSITIVE_LOSS) / n_pos
    sup = per_anchor.sum() / b
    return pair + sup


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out") over the 2B views, positives exclude self.

    ``L = (1/(2B))·Σ_j −(1/|P'(j)|)·Σ_{k∈P'(j)} log p_jk`` with ``P'(j) = {k ≠ j : ỹ_k = ỹ_j}`` (never empty: the
    other view of the same sample is always a positive). No temperature/base-temperature rescaling.
    Offered as the "plain SupCon" option of the spec's decision table.
    """
    z, labels = _check_inputs(z, labels, temperature, "supcon_loss")
    n = 2 * labels.shape[0]
    log_p = _log_probs(z, temperature)
    y = _views_labels(labels)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(dim=1).to(log_p.dtype)
    pos_sum = -torch.where(pos, log_p, torch.zeros((), dtype=log_p.dtype, device=z.device)).sum(dim=1)
    return (pos_sum / n_pos).mean()


class MILoss(nn.Module):
    """L2-normalise embeddings (eps 1e-8, as the reference) and apply :func:`mist_loss` or :func:`supcon_loss`.

    Args:
        kind: ``"mist"`` (the authors' loss, default) or ``"supcon"`` (plain SupCon).
        temperature: softmax temperature τ (> 0); the reference uses 0.07.
    """

    def __init__(self, kind: LossKind = "mist", temperature: float = 0.07) -> None:
        super().__init__()
        if kind not in _VALID_KINDS:
            raise ValueError(f"MILoss: kind={kind!r} is not valid; valid options are {list(_VALID_KINDS)}")
        _check_temperature(temperature, "MILoss")
        self.kind: LossKind = kind
        self.temperature = float(temperature)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """``z``: ``[2B, D]`` projections (view 1 rows, then view 2 rows); ``labels``: ``[B]``."""
        z, labels = _check_inputs(z, labels, self.temperature, "MILoss")
        z = F.normalize(z, p=2.0, dim=1, eps=_NORM_EPS)
        fn = mist_loss if self.kind == "mist" else supcon_loss
        return fn(z, labels, self.temperature)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, temperature={self.temperature}"


class CosineClassifier(nn.Module):
    """The reference's CE-ablation head (`CosineLinear`): cosine similarity to one weight row per class, times a
    learnable scale initialised to 1, no bias."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_dim) / in_dim**0.5)
        self.sigma = nn.Parameter(torch.ones(()))

    def forward(self, features: Tensor) -> Tensor:
        return self.sigma * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


class MIObjective(nn.Module):
    """Batch -> loss for MIST: two views in one forward, pooled features, projection head, MI (or CE) loss.

    Used by both the scoring pass and the tuning loop, so they optimise exactly the same objective.
    ``loss="ce"`` (the spec's CE ablation, §3.11) replaces the projection head by a :class:`CosineClassifier`
    over ``num_classes`` and applies cross-entropy to both views on the logits of the new classes only: the
    classes present in the batch (the current task's), as the reference's head over the task's new classes.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module | None = None, loss: str = "mist",
                 temperature: float = 0.07, views=None, num_classes: int | None = None, proj_dim: int = 128) -> None:
        super().__init__()
        from .views import default_views

        self.encoder = encoder
        if loss == "ce":
            if head is None and num_classes is None:
                raise ValueError("MIObjective(loss='ce') needs num_classes (or a classifier head).")
            self.head = head if head is not None else CosineClassifier(encoder.hidden_size, num_classes)
            self.loss_fn = None
        else:
            self.head = head if head is not None else ProjectionHead(encoder.hidden_size, proj_dim)
            self.loss_fn = MILoss(loss, temperature)
        self.loss = loss
        self.views = views
        self._default_views = default_views

    def forward(self, batch: dict) -> Tensor:
        labels = batch["labels"]
        if self.views is None:
            self.views = self._default_views(batch, self.encoder)  # picked once, so a warning is given once
        both = self.views({k: v for k, v in batch.items()})
        both.pop("labels", None)
        out = self.head(self.encoder(**both))
        if self.loss_fn is None:
            classes = torch.unique(labels)  # sorted: the batch's (new) classes
            targets = torch.searchsorted(classes, torch.cat([labels, labels]).to(classes.device))
            return F.cross_entropy(out[:, classes], targets)
        return self.loss_fn(out, labels)
