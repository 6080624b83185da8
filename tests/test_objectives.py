"""Tests for mist_peft.objectives against slow loop references written from MIST_SPEC.md §3.3."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mist_peft.objectives import SELF_POSITIVE_LOSS, MILoss, ProjectionHead, mist_loss, supcon_loss

# ---------------------------------------------------------------- slow references (explicit loops, float64)


def _ell(z: torch.Tensor, j: int, k: int, tau: float) -> float:
    """Exact −log p_jk, softmax over i ≠ j, computed from plain Python floats."""
    n = z.shape[0]
    s = [float(z[j] @ z[i]) / tau for i in range(n)]
    others = [s[i] for i in range(n) if i != j]
    m = max(others)
    lse = m + math.log(sum(math.exp(v - m) for v in others))
    return -(s[k] - lse)


def ref_mist(z: torch.Tensor, labels: list[int], tau: float) -> float:
    b = len(labels)
    n = 2 * b
    y = labels + labels
    pair = 0.0
    for i in range(b):
        pair += _ell(z, i, i + b, tau) + _ell(z, i + b, i, tau)
    pair /= n
    sup = 0.0
    for j in range(n):
        positives = [k for k in range(n) if y[k] == y[j]]  # includes k = j
        total = 0.0
        for k in positives:
            total += -math.log(1e-8) if k == j else _ell(z, j, k, tau)
        sup += total / len(positives)
    return pair + sup / b


def ref_supcon(z: torch.Tensor, labels: list[int], tau: float) -> float:
    n = 2 * len(labels)
    y = labels + labels
    total = 0.0
    for j in range(n):
        positives = [k for k in range(n) if k != j and y[k] == y[j]]
        total += sum(_ell(z, j, k, tau) for k in positives) / len(positives)
    return total / n


def ref_authors(z: torch.Tensor, labels: list[int], tau: float) -> float:
    """The reference code's formula as the spec writes it: max-shift, +1e-8 in the denominator and in the log."""
    b = len(labels)
    n = 2 * b
    y = labels + labels
    s = [[float(z[j] @ z[k]) for k in range(n)] for j in range(n)]

    def ell(j: int, k: int) -> float:
        m = max(s[j])
        e = [math.exp((s[j][i] - m) / tau) if i != j else 0.0 for i in range(n)]
        p = e[k] / (sum(e) + 1e-8)
        return -math.log(p + 1e-8)

    pair = sum(ell(i, i + b) + ell(i + b, i) for i in range(b)) / n
    sup = 0.0
    for j in range(n):
        positives = [k for k in range(n) if y[k] == y[j]]
        sup += sum(ell(j, k) for k in positives) / len(positives)
    return pair + sup / b


def _unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


CASES = [
    ([0, 0, 1], 0),  # mixed: one class with two samples, one singleton
    ([3, 7], 1),  # B=2, all distinct
    ([5, 5, 5, 5], 2),  # B=4, all the same class
    ([0, 1, 2, 0, 1, 3], 3),  # random-ish
]


@pytest.mark.parametrize("labels,seed", CASES)
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_mist_loss_matches_loop_reference(labels: list[int], seed: int, tau: float) -> None:
    z = _unit(2 * len(labels), 5, seed)
    got = mist_loss(z, torch.tensor(labels), temperature=tau)
    assert got.shape == ()
    assert got.item() == pytest.approx(ref_mist(z, labels, tau), abs=1e-5, rel=0)
    # float32 input agrees too
    got32 = mist_loss(z.float(), torch.tensor(labels), temperature=tau)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(ref_mist(z, labels, tau), abs=1e-4, rel=0)


@pytest.mark.parametrize("labels,seed", CASES)
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_supcon_loss_matches_loop_reference(labels: list[int], seed: int, tau: float) -> None:
    z = _unit(2 * len(labels), 5, seed)
    got = supcon_loss(z, torch.tensor(labels), temperature=tau)
    assert got.item() == pytest.approx(ref_supcon(z, labels, tau), abs=1e-5, rel=0)


def test_unnormalised_input_is_used_as_given() -> None:
    # The functional losses do not normalise; the loop reference on the same raw z agrees.
    g = torch.Generator().manual_seed(11)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64) * 0.3
    labels = [1, 2, 1]
    assert mist_loss(z, torch.tensor(labels), 0.2).item() == pytest.approx(ref_mist(z, labels, 0.2), abs=1e-5)
    assert supcon_loss(z, torch.tensor(labels), 0.2).item() == pytest.approx(ref_supcon(z, labels, 0.2), abs=1e-5)


@pytest.mark.parametrize("labels,seed", CASES)
def test_mist_loss_matches_authors_formula_when_well_conditioned(labels: list[int], seed: int) -> None:
    # At tau=0.5 every probability is far above 1e-8, so the reference's eps terms are negligible.
    z = _unit(2 * len(labels), 5, seed)
    got = mist_loss(z, torch.tensor(labels), temperature=0.5).item()
    assert got == pytest.approx(ref_authors(z, labels, 0.5), abs=1e-4, rel=0)


def test_authors_formula_caps_tiny_probabilities_but_ours_does_not() -> None:
    # Two well separated classes at tau=0.01: cross-class positives do not exist, but the pair term sees
    # p tiny for orthogonal views; the reference caps ℓ near 18.4, the exact loss keeps growing.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # views swapped
    labels = [0, 1]
    exact = mist_loss(z, torch.tensor(labels), temperature=0.01).item()
    assert exact == pytest.approx(ref_mist(z, labels, 0.01), abs=1e-6)
    assert exact > ref_authors(z, labels, 0.01) + 10.0


def test_self_positive_constant_with_identical_rows() -> None:
    # All rows identical: every p_jk (k != j) = 1/(2B-1).
    b = 3
    z = F.normalize(torch.ones(2 * b, 4, dtype=torch.float64), dim=1)
    log_m = math.log(2 * b - 1)
    c = -math.log(1e-8)
    assert SELF_POSITIVE_LOSS == pytest.approx(18.420680743952367)
    # all same class: |P(j)| = 2B, 2B-1 off-diagonal positives per anchor
    same = log_m + 2 * b * ((2 * b - 1) * log_m + c) / (2 * b) / b
    assert mist_loss(z, torch.tensor([4, 4, 4]), 0.07).item() == pytest.approx(same, abs=1e-9)
    assert same == pytest.approx(1.6094379124341003 + 2 * (5 * 1.6094379124341003 + 18.420680743952367) / 6)
    # all distinct: |P(j)| = 2 (self + other view)
    distinct = log_m + 2 * b * (log_m + c) / 2 / b
    assert mist_loss(z, torch.tensor([0, 1, 2]), 0.07).item() == pytest.approx(distinct, abs=1e-9)
    assert distinct == pytest.approx(2 * 1.6094379124341003 + 18.420680743952367)
    # supcon has no constant: -log(1/5) everywhere
    assert supcon_loss(z, torch.tensor([0, 1, 2]), 0.07).item() == pytest.approx(log_m, abs=1e-9)


def test_loss_scale_matches_reference_logs() -> None:
    # Random 128-d projections of a batch of 32 (reference SimpleCIL batch) sit in the logged 12-18 band.
    z = _unit(64, 128, 5, torch.float32)
    labels = torch.arange(32) % 8
    value = MILoss()(z, labels).item()
    assert 12.0 < value < 20.0


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    assert torch.autograd.gradcheck(lambda t: mist_loss(t, labels, 0.3), (z,))
    assert torch.autograd.gradcheck(lambda t: supcon_loss(t, labels, 0.3), (z,))
    assert torch.autograd.gradcheck(lambda t: MILoss("mist", 0.1)(t, labels), (z,))
    assert torch.autograd.gradcheck(lambda t: MILoss("supcon", 0.1)(t, labels), (z,))


def test_self_constant_has_no_gradient() -> None:
    # With all-distinct labels, the sup term's only non-constant part is the pair term again:
    # mist = pair + (1/B) Σ_j (ℓ_{j,view(j)} + C)/2 = 2 * pair + C, so its gradient is twice the pair gradient.
    z = _unit(4, 3, 1).requires_grad_(True)
    labels = torch.tensor([0, 1])
    loss = mist_loss(z, labels, 0.2)
    (gm,) = torch.autograd.grad(loss, z)
    sup = supcon_loss(z, labels, 0.2)  # = pair term for all-distinct labels
    (gs,) = torch.autograd.grad(sup, z)
    assert loss.item() == pytest.approx(2 * sup.item() + SELF_POSITIVE_LOSS, abs=1e-9)
    torch.testing.assert_close(gm, 2 * gs)


@pytest.mark.parametrize("kind", ["mist", "supcon"])
def test_numerical_stability(kind: str) -> None:
    labels = torch.tensor([0, 0, 1, 2])
    loss_fn = MILoss(kind, temperature=0.01)
    fn = mist_loss if kind == "mist" else supcon_loss
    g = torch.Generator().manual_seed(3)
    # huge norms (normalised by MILoss; raw in the functional form)
    big = (torch.randn(8, 16, generator=g) * 1e6).requires_grad_(True)
    for value in (loss_fn(big, labels), fn(big, labels, 0.01)):
        (grad,) = torch.autograd.grad(value, big)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
    # near-identical embeddings
    near = (torch.ones(8, 16) + 1e-6 * torch.randn(8, 16, generator=g)).requires_grad_(True)
    value = loss_fn(near, labels)
    (grad,) = torch.autograd.grad(value, near)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    # orthogonal/opposite embeddings: probabilities of order exp(-200) stay finite in log space
    opp = torch.cat([torch.eye(4, 16), -torch.eye(4, 16)]).requires_grad_(True)
    value = loss_fn(opp, labels)
    (grad,) = torch.autograd.grad(value, opp)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    # exact (the authors' eps would cap each ℓ at ~18.4): matches the float64 loop reference
    ref = (ref_mist if kind == "mist" else ref_supcon)(opp.detach().double(), [0, 0, 1, 2], 0.01)
    assert ref > 60.0
    assert value.item() == pytest.approx(ref, rel=1e-5)
    # zero rows (normalised with eps) and half precision
    zero = torch.zeros(8, 16, requires_grad=True)
    value = loss_fn(zero, labels)
    (grad,) = torch.autograd.grad(value, zero)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    half = loss_fn(torch.randn(8, 16, generator=g).to(torch.bfloat16), labels)
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_miloss_normalises_and_dispatches() -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 8, generator=g, dtype=torch.float64) * 7.0
    labels = torch.tensor([2, 2, 9])
    zn = F.normalize(z, dim=1)
    assert MILoss()(z, labels).item() == pytest.approx(ref_mist(zn, [2, 2, 9], 0.07), abs=1e-5)
    assert MILoss("supcon", 0.2)(z, labels).item() == pytest.approx(ref_supcon(zn, [2, 2, 9], 0.2), abs=1e-5)
    assert "kind='supcon'" in repr(MILoss("supcon"))


def test_projection_head() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(384)
    assert isinstance(head.linear, torch.nn.Linear)
    assert head.linear.in_features == 384 and head.linear.out_features == 128 and head.linear.bias is not None
    assert sum(p.numel() for p in head.parameters()) == 384 * 128 + 128
    x = torch.randn(5, 384)
    out = head(x)
    assert out.shape == (5, 128)
    torch.testing.assert_close(out, x @ head.linear.weight.T + head.linear.bias)  # linear, unnormalised
    assert ProjectionHead(768, 64)(torch.randn(2, 768)).shape == (2, 64)
    with pytest.raises(ValueError, match="in_dim"):
        ProjectionHead(0)


def test_invalid_inputs_raise() -> None:
    z = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"kind='ntxent'.*\['mist', 'supcon'\]"):
        MILoss("ntxent")  # type: ignore[arg-type]
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            MILoss(temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            mist_loss(z, labels, temperature=bad)
    with pytest.raises(ValueError, match=r"expected shape \[4, D\].*got \(6, 4\)"):
        MILoss()(z, labels[:2])
    with pytest.raises(ValueError, match=r"expected shape \[8, D\]"):
        supcon_loss(z, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="2-D"):
        mist_loss(torch.randn(6), labels)
    with pytest.raises(ValueError, match="1-D"):
        mist_loss(z, labels.view(3, 1))
    with pytest.raises(ValueError, match="integer"):
        mist_loss(z, labels.float())


def test_ce_ablation_uses_cosine_logits_of_the_batch_classes_only() -> None:
    from mist_peft.objectives import CosineClassifier, MIObjective

    class Identity(torch.nn.Module):
        hidden_size = 4

        def forward(self, x):
            return x

    torch.manual_seed(0)
    objective = MIObjective(Identity(), loss="ce", num_classes=10, views=lambda b: {"x": torch.cat([b["x"], -b["x"]]),
                                                                                  "labels": b["labels"]})
    assert isinstance(objective.head, CosineClassifier)
    x, labels = torch.randn(3, 4), torch.tensor([7, 2, 7])
    logits = torch.nn.functional.normalize(torch.cat([x, -x]), dim=1) @ torch.nn.functional.normalize(
        objective.head.weight, dim=1).T
    expected = torch.nn.functional.cross_entropy(logits[:, [2, 7]], torch.tensor([1, 0, 1, 1, 0, 1]))
    torch.testing.assert_close(objective({"x": x, "labels": labels}), expected)
