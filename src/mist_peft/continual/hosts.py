"""Exemplar-free class-incremental classifiers ("hosts") on top of frozen or MIST-tuned features.

Both hosts see each task's training features once, keep no examples, and predict over every class seen so far:

- :class:`SimpleCIL`: one prototype (mean feature) per class, cosine-similarity prediction (spec §3.9).
- :class:`RanPAC`: a fixed random ReLU projection, then a ridge-regression head from Gram statistics accumulated
  over tasks (spec §3.10).

When the backbone moves between tasks (MIST before every task), old-class statistics were computed with an older
backbone. :func:`fit_drift` estimates the drift from the current task's paired features (before/after adapting,
same inputs, same transform) and both hosts' ``compensate`` carry their old statistics forward with it. The
reference never does this (its old prototypes and Gram statistics go stale, spec A7). A host given ``anchor`` rows
(the same inputs through the pre-trained backbone) also keeps its classes' statistics in that space, which never
drifts; ``compensate(drift, anchored=True)`` then maps them with one drift fitted from the pre-trained features to
the current ones, instead of chaining one map per adaptation.

Labels are non-negative integers used as class ids; they need not be contiguous or arrive in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["SimpleCIL", "RanPAC", "FusedHost", "RIDGE_GRID", "DriftMap", "fit_drift", "DRIFT_MODES", "RIDGE_VALIDATION"]

RIDGE_GRID: tuple[float, ...] = tuple(10.0**k for k in range(-8, 9))
"""Candidate ridge penalties 10^-8 .. 10^8, as in RanPAC."""

DRIFT_MODES: tuple[str, ...] = ("none", "linear", "sdc")
"""Drift compensation of old-class statistics: none (the reference), an affine map, or SDC translations."""

RESYNTHESIS: tuple[str, ...] = ("full", "delta")
"""How RanPAC.compensate carries old classes' G and Q: rebuilt from Gaussian draws, or corrected by the change."""

RIDGE_VALIDATION: tuple[str, ...] = ("task", "all")
"""How RanPAC validates its ridge: on the current task's rows alone (the reference), or with every earlier class's
statistics in the system being validated."""

SHRINK_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, float("inf"))
"""Ridge strengths of the affine map, relative to the mean eigenvalue of the centred feature Gram; ``inf``
leaves only the mean translation."""

SDC_WIDTHS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
"""SDC kernel widths sigma^2, relative to the median squared distance of the old features to their class mean."""


@dataclass
class DriftMap:
    """Where a feature computed with the old backbone lands with the new one: ``f1 = f0 @ matrix + shift``.

    ``matrix`` is ``[H, H]`` (identity when None). ``shift`` is one ``[H]`` vector for every class (the affine
    map) or, for SDC, a dict ``class id -> [H]`` of per-class translations. ``choice`` records the setting
    chosen on pseudo-old classes and ``errors`` its validation error per candidate.
    """

    matrix: torch.Tensor | None
    shift: torch.Tensor | dict[int, torch.Tensor]
    mode: str = "linear"
    choice: float | None = None
    errors: dict[str, float] = field(default_factory=dict)

    def points(self, x: torch.Tensor, class_id: int) -> torch.Tensor:
        """Map rows ``x`` (features of class ``class_id`` under the old backbone)."""
        x = x.double()
        out = x if self.matrix is None else x @ self.matrix
        shift = self.shift[class_id] if isinstance(self.shift, dict) else self.shift
        return out + shift

    def covariance(self, cov: torch.Tensor) -> torch.Tensor:
        """``M^T cov M``: the covariance of the mapped features (translations leave it unchanged)."""
        return cov if self.matrix is None else self.matrix.T @ cov.double() @ self.matrix


def _affine(f0: torch.Tensor, f1: torch.Tensor, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge-to-identity affine map ``f1 ~ f0 (I + D) + b``: ``D = (X^T X + lam I)^-1 X^T (Y - X)`` on centred
    features, ``lam = shrink * tr(X^T X) / H``. Shrinking to the identity (not to 0) keeps the directions the
    current task does not span where they were."""
    m0, m1 = f0.mean(0), f1.mean(0)
    dim = f0.shape[1]
    if shrink == float("inf"):
        matrix = torch.eye(dim, dtype=torch.float64)
    else:
        x, y = f0 - m0, f1 - m1
        gram = x.T @ x
        lam = shrink * float(torch.trace(gram)) / dim + 1e-12
        delta = torch.linalg.solve(gram + lam * torch.eye(dim, dtype=torch.float64), x.T @ (y - x))
        matrix = torch.eye(dim, dtype=torch.float64) + delta
    return matrix, m1 - m0 @ matrix


def _sdc_shift(f0: torch.Tensor, f1: torch.Tensor, centre: torch.Tensor, width: float) -> torch.Tensor:
    """Yu et al.'s SDC: the mean drift of the pairs, weighted by a Gaussian kernel around the old prototype."""
    d2 = ((f0 - centre) ** 2).sum(1)
    w = torch.softmax(-d2 / (2 * width), dim=0)
    return w @ (f1 - f0)


def fit_drift(f0: torch.Tensor, f1: torch.Tensor, labels: torch.Tensor, mode: str = "linear",
              old_means: dict[int, torch.Tensor] | None = None) -> DriftMap:
    """Estimate the backbone's drift from paired features of the current task (rows i of ``f0`` and ``f1`` are
    the same input before and after adapting).

    The one setting (the affine map's shrinkage, SDC's kernel width) is chosen without old data: each class of
    the current task in turn plays an old class, the drift is fitted on the other classes' pairs, and the
    setting whose predicted class mean lands nearest the true one (squared error summed over held-out classes)
    wins. ``old_means`` (class id -> prototype under the old backbone) is needed by SDC, whose shifts are per class.
    """
    if mode not in DRIFT_MODES or mode == "none":
        raise ValueError(f"fit_drift mode={mode!r} is invalid: use 'linear' or 'sdc'.")
    f0, f1 = torch.as_tensor(f0).double(), torch.as_tensor(f1).double()
    labels = torch.as_tensor(labels).long().reshape(-1)
    if f0.shape != f1.shape or f0.shape[0] != labels.shape[0]:
        raise ValueError(f"fit_drift needs paired features: got {tuple(f0.shape)}, {tuple(f1.shape)} and "
                         f"{labels.shape[0]} labels.")
    classes = torch.unique(labels).tolist()
    grid = SHRINK_GRID if mode == "linear" else SDC_WIDTHS
    scale = 1.0
    if mode == "sdc":
        means = torch.stack([f0[labels == c].mean(0) for c in classes])
        spread = ((f0 - means[torch.searchsorted(torch.tensor(classes), labels)]) ** 2).sum(1)
        scale = float(spread.median()) + 1e-12
    errors = {}
    for setting in grid:
        err = 0.0
        for held in classes if len(classes) > 1 else []:
            rest, out = labels != held, labels == held
            mu0, mu1 = f0[out].mean(0), f1[out].mean(0)
            if mode == "linear":
                matrix, shift = _affine(f0[rest], f1[rest], setting)
                guess = mu0 @ matrix + shift
            else:
                guess = mu0 + _sdc_shift(f0[rest], f1[rest], mu0, setting * scale)
            err += float(((guess - mu1) ** 2).sum())
        errors[str(setting)] = err
    best = min(grid, key=lambda s: errors[str(s)])
    if mode == "linear":
        matrix, shift = _affine(f0, f1, best)
        return DriftMap(matrix, shift, "linear", best, errors)
    shifts = {int(c): _sdc_shift(f0, f1, m.double(), best * scale) for c, m in (old_means or {}).items()}
    return DriftMap(None, shifts, "sdc", best, errors)


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


def _check_anchor(anchor: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor | None:
    if anchor is None:
        return None
    anchor, _ = _as_inputs(anchor)
    if anchor.shape[0] != features.shape[0]:
        raise ValueError(f"anchor has {anchor.shape[0]} rows but features have {features.shape[0]}: pass the same "
                         "inputs through the pre-trained backbone.")
    return anchor


def _require_anchors(stored, classes) -> None:
    missing = [c for c in classes if c not in stored]
    if missing:
        raise RuntimeError(f"Classes {missing} have no anchor statistics: pass anchor= to every fit_task to "
                           "compensate with anchored=True.")


class SimpleCIL:
    """Cosine prototype classifier: each class is the mean of its training features, fixed once added."""

    def __init__(self) -> None:
        self.prototypes = torch.empty(0, 0)  # [C, H], rows in the order classes were added
        self.classes = torch.empty(0, dtype=torch.long)  # [C] class id of each row
        self.anchors: dict[int, torch.Tensor] = {}  # class id -> mean of its anchor rows (pre-trained features)

    @property
    def seen_classes(self) -> list[int]:
        """Class ids the classifier can predict, in the order they were added."""
        return self.classes.tolist()

    def fit_task(self, features: torch.Tensor, labels: torch.Tensor,
                 anchor: torch.Tensor | None = None) -> list[int]:
        """Add prototypes for the classes in ``labels`` not seen before; return those new class ids.

        Features of already-seen classes are ignored: their prototypes stay as first computed. ``anchor``: the
        same rows through the pre-trained backbone; their class means are kept for ``compensate(anchored=True)``.
        """
        features, labels = _as_inputs(features, labels)
        anchor = _check_anchor(anchor, features)
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
            if anchor is not None:
                self.anchors.update({c: anchor[labels == c].mean(dim=0) for c in new})
        return new

    def means(self, anchored: bool = False) -> dict[int, torch.Tensor]:
        """Prototype of every seen class, by class id (``anchored``: its mean anchor row)."""
        if anchored:
            _require_anchors(self.anchors, self.seen_classes)
            return {c: self.anchors[c] for c in self.seen_classes}
        return {int(c): p for c, p in zip(self.classes.tolist(), self.prototypes, strict=True)}

    def compensate(self, drift: DriftMap, anchored: bool = False) -> None:
        """Move every stored prototype to where ``drift`` says its class's features went: from the current
        prototypes, or (``anchored``, with ``drift`` fitted from pre-trained to current features) from the anchors."""
        if self.classes.numel():
            self.prototypes = torch.stack(
                [drift.points(p[None], c)[0] for c, p in self.means(anchored).items()]).float()

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
    head is ``W_o = (G + lambda I)^-1 Q`` in float64. ``lambda`` is picked from ``ridges`` on the current task:
    fit on 80% of its rows, lowest mean squared error on the other 20%. The rows are shuffled (seeded)
    before that split, as the reference's shuffled loader does, so class-sorted inputs still give a fair split.
    ``ridge_validation="task"`` (the reference) fits on those rows alone; ``"all"`` keeps every earlier class's G
    and Q in the system being validated, so a penalty that lets the new classes' head outgrow the old ones
    fails validation (on adapted features the current-task rule picked 1e-8 at a last task: the head collapsed).

    Memory: G is ``8 * M^2`` bytes (0.8 GB for the reference ``M = 10000``, 32 MB for ``M = 2000``).

    Drift compensation (:meth:`compensate`): G and Q are sums over ReLU-projected features, which no map of G
    itself can update. So the host also keeps, per class, the count, sum and second moment of the raw ``[H]``
    features (``4 H^2`` bytes per class, 0.6 MB at H = 384). At each compensation it maps every stored class's
    mean and covariance with the drift and rebuilds that class's share of G and Q from ``samples`` Gaussian draws
    pushed through the fixed projection (as SLCA and AdaGauss re-synthesise features), so G stays positive
    semi-definite. The current task always enters exactly. After a re-synthesis the ridge is validated with the
    old statistics in the system: chosen on the current task alone it came out tiny on adapted features and the
    solve amplified the synthetic classes' noise (measured: the head collapsed).

    ``resynthesis="delta"`` keeps the shares in G and Q and adds only what the drift changes: per class, the same
    Gaussian draws before and after the map (``drift.points``), pushed through the projection, and the difference
    of their statistics. A class whose features do not move keeps its real statistics exactly, and the Gaussian
    shape enters only through the change (a control variate). It needs the moments and the map in one space, so
    anchored compensations (``anchored=True``) always rebuild in full.
    """

    def __init__(
        self, projection_dim: int = 10000, seed: int = 0, ridges: Sequence[float] = RIDGE_GRID,
        resynthesis: str = "full", ridge_validation: str = "task",
    ) -> None:
        if resynthesis not in RESYNTHESIS:
            raise ValueError(f"resynthesis={resynthesis!r} is invalid: use one of {list(RESYNTHESIS)}.")
        if ridge_validation not in RIDGE_VALIDATION:
            raise ValueError(f"ridge_validation={ridge_validation!r} is invalid: use one of {list(RIDGE_VALIDATION)}.")
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be positive, got {projection_dim}.")
        if not ridges or min(ridges) <= 0:
            raise ValueError("ridges must be a non-empty list of positive penalties.")
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        self.ridges = tuple(float(r) for r in ridges)
        self.resynthesis = resynthesis
        self.ridge_validation = ridge_validation
        self.ridge: float | None = None  # penalty chosen at the last fit_task
        self.w_rand: torch.Tensor | None = None  # [H, M] float32
        self.gram: torch.Tensor | None = None  # G [M, M] float64
        self.targets: torch.Tensor | None = None  # Q [M, C] float64, column = class id
        self.w_out: torch.Tensor | None = None  # W_o [M, C] float64
        self._seen: list[int] = []
        self.num_tasks = 0
        self.class_stats: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}  # c -> (n, sum, second moment)
        self.anchor_stats: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}  # the same, of anchor rows
        self._synthetic = False  # True once old classes' G and Q were re-synthesised by compensate()

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

    def _choose_ridge(self, projected: torch.Tensor, onehot: torch.Tensor,
                      old: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        n = projected.shape[0]
        cut = int(0.8 * n)
        if cut < 1 or cut >= n:
            raise ValueError(f"RanPAC needs at least 2 training rows per task to choose the ridge, got {n}.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 1 + self.num_tasks))
        fit, val = order[:cut], order[cut:]
        # One eigendecomposition serves every candidate: (P^T P + l I)^-1 P^T Y = P^T (P P^T + l I)^-1 Y, so
        # with fewer rows than features the n x n kernel is decomposed instead of the M x M Gram.
        p_fit, y_fit = projected[fit], onehot[fit]
        if old is not None:  # old classes' (re-synthesised) statistics stay in the system being validated
            values, vectors = torch.linalg.eigh(old[0] + p_fit.T @ p_fit)
            cross, rhs = projected[val] @ vectors, vectors.T @ (old[1] + p_fit.T @ y_fit)
        elif cut < self.projection_dim:
            values, vectors = torch.linalg.eigh(p_fit @ p_fit.T)
            cross, rhs = projected[val] @ p_fit.T @ vectors, vectors.T @ y_fit
        else:
            values, vectors = torch.linalg.eigh(p_fit.T @ p_fit)
            cross, rhs = projected[val] @ vectors, vectors.T @ (p_fit.T @ y_fit)
        values = values.clamp_min(0)
        errors = [torch.mean((cross @ (rhs / (values + ridge)[:, None]) - onehot[val]) ** 2).item()
                  for ridge in self.ridges]
        return self.ridges[min(range(len(errors)), key=errors.__getitem__)]

    def fit_task(self, features: torch.Tensor, labels: torch.Tensor, solve: bool = True,
                 anchor: torch.Tensor | None = None) -> float | None:
        """Accumulate one task's statistics, re-choose the ridge and re-solve the head; return the ridge.

        ``solve=False`` only accumulates (for a caller that feeds several tasks before predicting). ``anchor``: the
        same rows through the pre-trained backbone, whose class moments ``compensate(anchored=True)`` maps."""
        features, labels = _as_inputs(features, labels)
        anchor = _check_anchor(anchor, features)
        projected = self.project(features)
        num_columns = max(int(labels.max()) + 1, 0 if self.targets is None else self.targets.shape[1])
        onehot = F.one_hot(labels, num_columns).double()
        if self.gram is None:
            self.gram = torch.zeros(self.projection_dim, self.projection_dim, dtype=torch.float64)
            self.targets = torch.zeros(self.projection_dim, 0, dtype=torch.float64)
        if self.targets.shape[1] < num_columns:
            grow = torch.zeros(self.projection_dim, num_columns - self.targets.shape[1], dtype=torch.float64)
            self.targets = torch.cat([self.targets, grow], dim=1)
        if solve:
            with_old = self._synthetic or (self.ridge_validation == "all" and self.num_tasks > 0)
            old = (self.gram, self.targets) if with_old else None
            self.ridge = self._choose_ridge(projected, onehot, old)
        self.gram += projected.T @ projected
        self.targets += projected.T @ onehot
        for stats, rows_of in ((self.class_stats, features), (self.anchor_stats, anchor)):
            for c in torch.unique(labels).tolist() if rows_of is not None else []:
                rows = rows_of[labels == c].double()
                n, total, second = stats.get(c, (0.0, 0.0, 0.0))
                stats[c] = (n + rows.shape[0], total + rows.sum(0), second + (rows.T @ rows).float())
        self._seen += [c for c in torch.unique(labels).tolist() if c not in self._seen]
        self.num_tasks += 1
        if not solve:
            return None
        self.w_out = self._ridge_solve(self.gram, self.targets, self.ridge)
        return self.ridge

    def _moments(self, anchored: bool) -> dict[int, tuple[float, torch.Tensor, torch.Tensor]]:
        """Per-class (count, sum, second moment): of the features, or (``anchored``) of the anchor rows."""
        if anchored:
            _require_anchors(self.anchor_stats, self._seen)
            return self.anchor_stats
        return self.class_stats

    def means(self, anchored: bool = False) -> dict[int, torch.Tensor]:
        """Mean raw feature of every seen class, by class id (``anchored``: its mean anchor row)."""
        return {c: total / n for c, (n, total, _) in self._moments(anchored).items()}

    def compensate(self, drift: DriftMap, samples: int = 256, anchored: bool = False) -> None:
        """Rebuild G and Q of every stored class from its moments carried through ``drift``; re-solve W_o.
        ``anchored``: the moments are the anchor rows' and ``drift`` maps pre-trained to current features."""
        if self.w_out is None:
            return
        moments = self._moments(anchored)
        generator = torch.Generator().manual_seed(self.seed + 7919 * (self.num_tasks + 1))
        delta = self.resynthesis == "delta" and not anchored
        gram, targets = (self.gram.clone(), self.targets.clone()) if delta else \
            (torch.zeros_like(self.gram), torch.zeros_like(self.targets))
        for c, (n, total, second) in list(moments.items()):
            mean = total / n
            cov = second.double() / n - torch.outer(mean, mean)
            new_mean, new_cov = drift.points(mean[None], c)[0], drift.covariance(cov)
            source = cov if delta else new_cov  # delta: draws of the stored moments, then moved by the map
            values, vectors = torch.linalg.eigh((source + source.T) / 2)
            noise = torch.randn(samples, mean.shape[0], generator=generator, dtype=torch.float64)
            noise = noise @ (vectors * values.clamp_min(0).sqrt()).T
            projected = torch.relu((drift.points(mean + noise, c) if delta else new_mean + noise).float() @ self.w_rand)
            share, column = (projected.T @ projected).double(), projected.sum(0).double()
            if delta:  # minus the same draws before the map: zero where nothing moves
                before = torch.relu((mean + noise).float() @ self.w_rand)
                share, column = share - (before.T @ before).double(), column - before.sum(0).double()
            gram += (n / samples) * share
            targets[:, c] += (n / samples) * column
            self.class_stats[c] = (n, n * new_mean, (n * (new_cov + torch.outer(new_mean, new_mean))).float())
        self.gram, self.targets = gram, targets
        self._synthetic = True
        self.w_out = self._ridge_solve(self.gram, self.targets, self.ridge)

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


class FusedHost:
    """Late fusion: one host on the pre-trained backbone's features, one on the adapted backbone's; a class's
    score is the sum of the two hosts' scores.

    Inputs are ``[pre-trained || adapted]`` rows, split after the first ``split`` columns (default: half of the
    first rows' width, as when both backbones share an architecture). The pre-trained half
    never drifts, so only the adapted host is compensated (:meth:`drift_view` tells the caller which columns to
    fit the drift on). Unlike concatenation before one host, each host keeps its own statistics and (RanPAC) its
    own ridge, so a weak half cannot dilute a strong one's geometry.
    """

    def __init__(self, pretrained, adapted, split: int | None = None) -> None:
        self.pretrained, self.adapted = pretrained, adapted
        self.split = None if split is None else int(split)

    @property
    def seen_classes(self) -> list[int]:
        return self.adapted.seen_classes

    def _halves(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, _ = _as_inputs(features)
        if self.split is None:
            if features.shape[1] % 2:
                raise ValueError(f"FusedHost got {features.shape[1]} columns, which do not split into two equal "
                                 "halves: pass split=<size of the pre-trained features>.")
            self.split = features.shape[1] // 2
        if features.shape[1] <= self.split:
            raise ValueError(f"FusedHost needs [pre-trained || adapted] rows wider than {self.split} columns, got "
                             f"{features.shape[1]}.")
        return features[:, : self.split], features[:, self.split:]

    def drift_view(self, features: torch.Tensor) -> torch.Tensor:
        """The columns that drift (the adapted half)."""
        return self._halves(features)[1]

    def fit_task(self, features: torch.Tensor, labels: torch.Tensor, anchor: torch.Tensor | None = None,
                 **kwargs):
        """Fit both hosts; ``anchor`` (the same rows through the pre-trained backbone) reaches the adapted host as
        its :meth:`drift_view` columns."""
        pretrained, adapted = self._halves(features)
        self.pretrained.fit_task(pretrained, labels, **kwargs)
        anchor = None if anchor is None else self.drift_view(anchor)
        return self.adapted.fit_task(adapted, labels, anchor=anchor, **kwargs)

    def means(self, anchored: bool = False) -> dict[int, torch.Tensor]:
        """The adapted host's class means (what SDC's kernel is centred on)."""
        return self.adapted.means(anchored)

    def compensate(self, drift: DriftMap, *args, **kwargs) -> None:
        """Carry the adapted host's statistics through ``drift`` (fitted on :meth:`drift_view` columns)."""
        self.adapted.compensate(drift, *args, **kwargs)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        pretrained, adapted = self._halves(features)
        if self.pretrained.seen_classes != self.adapted.seen_classes:
            raise RuntimeError("FusedHost's two hosts saw different classes; fit them through fit_task only.")
        return self.pretrained.scores(pretrained).double() + self.adapted.scores(adapted).double()

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.seen_classes, dtype=torch.long)[self.scores(features).argmax(dim=1)]
