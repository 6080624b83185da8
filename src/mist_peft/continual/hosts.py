"""Exemplar-free class-incremental classifiers ("hosts") on top of frozen or MIST-tuned features.

Both hosts see each task's training features once, keep no examples, and predict over every class seen so far:

- :class:`SimpleCIL`: one prototype (mean feature) per class, cosine-similarity prediction. Prototypes of old
  classes are never recomputed, as in the MIST reference (spec §3.9).
- :class:`RanPAC`: a fixed random ReLU projection, then a ridge-regression head from Gram statistics accumulated
  over tasks (spec §3.10).

Labels are non-negative integers used as class ids; they need not be contiguous or arrive in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["SimpleCIL", "RanPAC", "RIDGE_GRID"]

RIDGE_GRID: tuple[float, ...] = tuple(10.0**k for k in range(-8, 9))
"""Candidate ridge penalties 10^-8 .. 10^8, as in RanPAC."""


def _as_inputs(
    features: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    features = torch.as_tensor(features).detach().float().cpu()
    if features.dim() != 2:
        raise ValueError(f"features must be [N, H], got shape {tuple(features.shape)}.")
    if labels is None:
        return features, None
    labels = torch.as_tensor(labels).detach().long().cpu().reshape(-1)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels.")
    if labels.numel() and labels.min() < 0:
        raise ValueError("labels must be non-negative class ids.")
    return features, labels


class SimpleCIL:
    """Cosine prototype classifier: each class is the mean of its training features, fixed once added."""

    def __init__(self) -> None:
        self.prototypes = torch.empty(0, 0)  # [C, H], rows in the order classes were added
        self.classes = torch.empty(0, dtype=torch.long)  # [C] class id of each row

    @property
    def seen_classes(self) -> list[int]:
        """Class ids the classifier can predict, in the order they were added."""
        return self.classes.tolist()

    def fit_task(self, features: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Add prototypes for the classes in ``labels`` not seen before; return those new class ids.

        Features of already-seen classes are ignored: their prototypes stay as first computed.
        """
        features, labels = _as_inputs(features, labels)
        if self.prototypes.numel() and features.shape[1] != self.prototypes.shape[1]:
            raise ValueError(
                f"Feature size {features.shape[1]} differs from earlier tasks' {self.prototypes.shape[1]}."
            )
        known = set(self.seen_classes)
        new = [c for c in torch.unique(labels).tolist() if c not in known]
        if new:
            rows = torch.stack([features[labels == c].mean(dim=0) for c in new])
            self.prototypes = rows if not self.prototypes.numel() else torch.cat([self.prototypes, rows])
            self.classes = torch.cat([self.classes, torch.tensor(new, dtype=torch.long)])
        return new

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``[N, C]`` between features and prototypes (columns follow ``seen_classes``)."""
        if not self.classes.numel():
            raise RuntimeError("SimpleCIL has no classes yet; call fit_task first.")
        features, _ = _as_inputs(features)
        return F.normalize(features, dim=1) @ F.normalize(self.prototypes, dim=1).T

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Class id of the most similar prototype, ``[N]`` long."""
        return self.classes[self.scores(features).argmax(dim=1)]


class RanPAC:
    """Random-projection ridge classifier (McDonnell et al., NeurIPS'23) without its first-session PETL step.

    ``W_rand`` [H, M] is drawn once from a standard normal with a seeded generator. For each task, the projected
    features ``P = ReLU(F W_rand)`` update ``G += P^T P`` (M x M) and ``Q += P^T Y`` (M x C, one-hot ``Y``); the
    head is ``W_o = (G + lambda I)^-1 Q`` in float64. ``lambda`` is picked from ``ridges`` on the current task
    alone: fit on 80% of its rows, lowest mean squared error on the other 20%. The rows are shuffled (seeded)
    before that split, as the reference's shuffled loader does, so class-sorted inputs still give a fair split.

    Memory: G is ``8 * M^2`` bytes (0.8 GB for the reference ``M = 10000``, 32 MB for ``M = 2000``).
    """

    def __init__(
        self, projection_dim: int = 10000, seed: int = 0, ridges: Sequence[float] = RIDGE_GRID
    ) -> None:
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be positive, got {projection_dim}.")
        if not ridges or min(ridges) <= 0:
            raise ValueError("ridges must be a non-empty list of positive penalties.")
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        self.ridges = tuple(float(r) for r in ridges)
        self.ridge: float | None = None  # penalty chosen at the last fit_task
        self.w_rand: torch.Tensor | None = None  # [H, M] float32
        self.gram: torch.Tensor | None = None  # G [M, M] float64
        self.targets: torch.Tensor | None = None  # Q [M, C] float64, column = class id
        self.w_out: torch.Tensor | None = None  # W_o [M, C] float64
        self._seen: list[int] = []
        self.num_tasks = 0

    @property
    def seen_classes(self) -> list[int]:
        """Class ids the classifier can predict, in the order they were first seen."""
        return list(self._seen)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``ReLU(features @ W_rand)`` in float64, drawing ``W_rand`` on first use."""
        features, _ = _as_inputs(features)
        if self.w_rand is None:
            generator = torch.Generator().manual_seed(self.seed)
            self.w_rand = torch.randn(features.shape[1], self.projection_dim, generator=generator)
        elif features.shape[1] != self.w_rand.shape[0]:
            raise ValueError(
                f"Feature size {features.shape[1]} differs from earlier tasks' {self.w_rand.shape[0]}."
            )
        return torch.relu(features @ self.w_rand).double()

    @staticmethod
    def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
        """``(gram + ridge I)^-1 rhs`` by Cholesky, falling back to LU if rounding breaks positive definiteness."""
        system = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, factor)
        return torch.linalg.solve(system, rhs)

    def _choose_ridge(self, projected: torch.Tensor, onehot: torch.Tensor) -> float:
        n = projected.shape[0]
        cut = int(0.8 * n)
        if cut < 1 or cut >= n:
            raise ValueError(f"RanPAC needs at least 2 training rows per task to choose the ridge, got {n}.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 1 + self.num_tasks))
        fit, val = order[:cut], order[cut:]
        gram, rhs = projected[fit].T @ projected[fit], projected[fit].T @ onehot[fit]
        errors = [
            torch.mean((projected[val] @ self._ridge_solve(gram, rhs, ridge) - onehot[val]) ** 2).item()
            for ridge in self.ridges
        ]
        return self.ridges[min(range(len(errors)), key=errors.__getitem__)]

    def fit_task(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Accumulate one task's statistics, re-choose the ridge and re-solve the head; return the ridge."""
        features, labels = _as_inputs(features, labels)
        projected = self.project(features)
        num_columns = max(int(labels.max()) + 1, 0 if self.targets is None else self.targets.shape[1])
        onehot = F.one_hot(labels, num_columns).double()
        if self.gram is None:
            self.gram = torch.zeros(self.projection_dim, self.projection_dim, dtype=torch.float64)
            self.targets = torch.zeros(self.projection_dim, 0, dtype=torch.float64)
        if self.targets.shape[1] < num_columns:
            grow = torch.zeros(self.projection_dim, num_columns - self.targets.shape[1], dtype=torch.float64)
            self.targets = torch.cat([self.targets, grow], dim=1)
        self.ridge = self._choose_ridge(projected, onehot)
        self.gram += projected.T @ projected
        self.targets += projected.T @ onehot
        self._seen += [c for c in torch.unique(labels).tolist() if c not in self._seen]
        self.w_out = self._ridge_solve(self.gram, self.targets, self.ridge)
        self.num_tasks += 1
        return self.ridge

    def scores(self, features: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Ridge outputs ``[N, C]`` for the seen classes (columns follow ``seen_classes``)."""
        if self.w_out is None:
            raise RuntimeError("RanPAC has no classes yet; call fit_task first.")
        head = self.w_out[:, self._seen]
        return torch.cat(
            [self.project(chunk) @ head for chunk in torch.split(torch.as_tensor(features), batch_size)]
        )

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Class id with the largest ridge output among seen classes, ``[N]`` long."""
        return torch.tensor(self._seen, dtype=torch.long)[self.scores(features).argmax(dim=1)]
