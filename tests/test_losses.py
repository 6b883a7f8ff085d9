"""Every loss against a slow, obviously-correct reference, plus its properties."""

from __future__ import annotations

import math

import pytest
import torch

from flexkd.config import FEATURE_LOSS_NAMES, KD_LOSS_NAMES
from flexkd.data import IGNORE
from flexkd.losses import FEATURE_LOSSES, KD_LOSSES, pearson_correlations, task_loss


def test_loss_dicts_match_the_names_config_accepts():
    assert tuple(KD_LOSSES) == KD_LOSS_NAMES
    assert tuple(FEATURE_LOSSES) == FEATURE_LOSS_NAMES


# ---------------------------------------------------------------------------------------------------------
# Naive references: python loops over rows and classes, math module only.


def _softmax(row, tau):
    m = max(row)
    e = [math.exp((x - m) / tau) for x in row]
    z = sum(e)
    return [x / z for x in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def naive_kd(kind, s_rows, t_rows, tau, a):
    vals = []
    for s_row, t_row in zip(s_rows, t_rows):
        ps, pt = _softmax(s_row, tau), _softmax(t_row, tau)
        if kind == "fkl":
            v = _kl(pt, ps)
        elif kind == "rkl":
            v = _kl(ps, pt)
        elif kind == "skl":
            v = _kl(pt, [a * x + (1 - a) * y for x, y in zip(pt, ps)])
        elif kind == "srkl":
            v = _kl(ps, [a * y + (1 - a) * x for x, y in zip(pt, ps)])
        elif kind == "jsd":
            m = [(x + y) / 2 for x, y in zip(pt, ps)]
            v = 0.5 * _kl(pt, m) + 0.5 * _kl(ps, m)
        vals.append(v)
    return sum(vals) / len(vals) * tau**2


def naive_pearson_loss(s_rows, t_rows):
    n, k = len(s_rows), len(s_rows[0])
    total = 0.0
    for i in range(k):
        xs = [r[i] for r in s_rows]
        ys = [r[i] for r in t_rows]
        mx, my = sum(xs) / n, sum(ys) / n
        cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        vx = sum((x - mx) ** 2 for x in xs)
        vy = sum((y - my) ** 2 for y in ys)
        total += 1 - cov / math.sqrt(vx * vy)
    return total / k


def _masked_rows(x, mask):
    return [x[b, t].tolist() for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(3, 5, generator=g) > 0.3
    return s, t, mask


@pytest.mark.parametrize("kind", ["fkl", "rkl", "skl", "srkl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_kd_equals_naive_reference(kind, tau, logits):
    s, t, mask = logits
    got = KD_LOSSES[kind](s, t, mask, temperature=tau, skew=0.1)
    want = naive_kd(kind, _masked_rows(s, mask), _masked_rows(t, mask), tau, 0.1)
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "skl", "srkl", "jsd"])
def test_kd_is_zero_for_identical_logits_and_positive_otherwise(kind, logits):
    s, t, mask = logits
    assert KD_LOSSES[kind](t.clone(), t, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert KD_LOSSES[kind](s, t, mask).item() > 1e-3


@pytest.mark.parametrize("kind", ["fkl", "rkl", "skl", "srkl", "jsd"])
def test_kd_ignores_masked_positions_and_classification_shapes(kind, logits):
    s, t, mask = logits
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e3 * torch.randn_like(s2[~mask])  # garbage where the mask is off
    t2[~mask] = -1e3
    assert KD_LOSSES[kind](s2, t2, mask).item() == pytest.approx(KD_LOSSES[kind](s, t, mask).item(), rel=1e-6)
    # Classification: (B, C) logits with a (B,) mask.
    flat_mask = torch.ones(4, dtype=torch.bool)
    got = KD_LOSSES[kind](s[0, :4], t[0, :4], flat_mask)
    assert got.item() == pytest.approx(
        naive_kd(kind, s[0, :4].tolist(), t[0, :4].tolist(), 1.0, 0.1), rel=1e-5
    )


@pytest.mark.parametrize("kind", ["fkl", "rkl", "skl", "srkl", "jsd"])
def test_kd_gradient_reaches_the_student_only(kind, logits):
    s, t, mask = logits
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    KD_LOSSES[kind](s, t, mask).backward()
    assert t.grad is None
    assert s.grad.abs().sum() > 0
    assert s.grad[~mask].abs().sum() == 0


def test_kd_none_is_zero(logits):
    s, t, mask = logits
    assert KD_LOSSES["none"](s, t, mask).item() == 0.0


def test_task_loss_equals_naive_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, IGNORE, 3, 0], [IGNORE, IGNORE, 5, 2]])
    terms = []
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t])
            if y != IGNORE:
                row = logits[b, t].tolist()
                terms.append(-math.log(_softmax(row, 1.0)[y]))
    assert task_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    cls = logits[:, 0, :]
    y = torch.tensor([2, 4])
    want = (-math.log(_softmax(cls[0].tolist(), 1)[2]) - math.log(_softmax(cls[1].tolist(), 1)[4])) / 2
    assert task_loss(cls, y).item() == pytest.approx(want, rel=1e-6)


def test_task_loss_with_no_labelled_position_is_zero_and_differentiable():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = task_loss(logits, torch.full((1, 3), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


# ---------------------------------------------------------------------------------------------------------
# Feature losses


@pytest.fixture
def hidden():
    g = torch.Generator().manual_seed(2)
    hs = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    ht = torch.randn(2, 6, 12, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False  # padding
    mask[1, 5:] = False
    units = torch.tensor([0, 2, 3, 5, 7, 8, 10])  # k = 7 < d_S = 8
    return hs, ht, mask, units


def test_pearson_equals_naive_reference(hidden):
    hs, ht, mask, units = hidden
    got = FEATURE_LOSSES["pearson"](hs, ht, mask, units)
    s_rows = [r[:7] for r in _masked_rows(hs, mask)]
    t_rows = [[r[j] for j in units.tolist()] for r in _masked_rows(ht, mask)]
    assert got.item() == pytest.approx(naive_pearson_loss(s_rows, t_rows), rel=1e-5)


def test_pearson_is_zero_when_the_student_copies_the_selected_units(hidden):
    hs, ht, mask, units = hidden
    copy = hs.clone()
    copy[..., :7] = ht[..., units]
    assert FEATURE_LOSSES["pearson"](copy, ht, mask, units).item() == pytest.approx(0.0, abs=1e-6)
    assert FEATURE_LOSSES["pearson"](-copy, ht, mask, units).item() == pytest.approx(
        2.0, abs=1e-6
    )  # the maximum


def test_pearson_is_invariant_to_positive_affine_change_per_student_dim(hidden):
    hs, ht, mask, units = hidden
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(8, generator=g, dtype=torch.float64) * 5 + 0.1
    shift = torch.randn(8, generator=g, dtype=torch.float64) * 10
    a = FEATURE_LOSSES["pearson"](hs, ht, mask, units)
    b = FEATURE_LOSSES["pearson"](hs * scale + shift, ht, mask, units)
    assert b.item() == pytest.approx(a.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["pearson", "mse_std", "projector"])
def test_feature_losses_ignore_masked_positions(name, hidden):
    hs, ht, mask, units = hidden
    proj = torch.nn.Linear(8, 12).double()
    hs2, ht2 = hs.clone(), ht.clone()
    hs2[~mask] = 1e4
    ht2[~mask] = -1e4
    a = FEATURE_LOSSES[name](hs, ht, mask, units, proj)
    b = FEATURE_LOSSES[name](hs2, ht2, mask, units, proj)
    assert b.item() == pytest.approx(a.item(), rel=1e-6)


def test_mse_std_is_twice_one_minus_mean_pearson(hidden):
    hs, ht, mask, units = hidden
    mse = FEATURE_LOSSES["mse_std"](hs, ht, mask, units)
    pearson = FEATURE_LOSSES["pearson"](hs, ht, mask, units)
    assert mse.item() == pytest.approx(2 * pearson.item(), rel=1e-5)
    copy = hs.clone()
    copy[..., :7] = 3 * ht[..., units] - 1
    assert FEATURE_LOSSES["mse_std"](copy, ht, mask, units).item() == pytest.approx(0.0, abs=1e-6)


def test_projector_equals_naive_reference_and_is_zero_at_identity(hidden):
    hs, ht, mask, units = hidden
    proj = torch.nn.Linear(8, 12).double()
    got = FEATURE_LOSSES["projector"](hs, ht, mask, units, proj).item()
    W, bias = proj.weight.tolist(), proj.bias.tolist()
    total, count = 0.0, 0
    for s_row, t_row in zip(_masked_rows(hs, mask), _masked_rows(ht, mask)):
        for j in range(12):
            pred = sum(W[j][i] * s_row[i] for i in range(8)) + bias[j]
            total += (pred - t_row[j]) ** 2
            count += 1
    assert got == pytest.approx(total / count, rel=1e-5)
    ident = torch.nn.Linear(12, 12, bias=False).double()
    with torch.no_grad():
        ident.weight.copy_(torch.eye(12))
    assert FEATURE_LOSSES["projector"](ht, ht, mask, None, ident).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("name", ["pearson", "mse_std", "projector"])
def test_feature_gradients_reach_student_and_projector_never_teacher(name, hidden):
    hs, ht, mask, units = hidden
    hs = hs.clone().requires_grad_(True)
    ht = ht.clone().requires_grad_(True)
    proj = torch.nn.Linear(8, 12).double()
    FEATURE_LOSSES[name](hs, ht, mask, units, proj).backward()
    assert ht.grad is None
    assert hs.grad.abs().sum() > 0
    assert hs.grad[~mask].abs().sum() == 0
    if name == "projector":
        assert proj.weight.grad.abs().sum() > 0
    else:
        assert proj.weight.grad is None
        assert hs.grad[..., 7:].abs().sum() == 0  # only the k aligned student dims are pulled


def test_pearson_correlations_of_constant_columns_are_zero_not_nan():
    s = torch.ones(5, 2)
    t = torch.randn(5, 2)
    assert torch.equal(pearson_correlations(s, t), torch.zeros(2))


@pytest.mark.parametrize("name", ["pearson", "mse_std"])
def test_a_constant_feature_column_gives_finite_gradients(name, hidden):
    """A student dim that is constant over the batch (it happens with real checkpoints) must not NaN the step."""
    hs, ht, mask, units = hidden
    hs = hs.clone()
    hs[..., 3] = 7.0  # constant student dim
    ht = ht.clone()
    ht[..., units[5]] = -2.0  # constant teacher unit
    hs.requires_grad_(True)
    loss = FEATURE_LOSSES[name](hs, ht, mask, units)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hs.grad).all()


def test_feature_positions_per_tokens_setting():
    """all: the attention mask; response: the loss positions; head: position 0 of a classifier (the only
    position its head reads), a generation task's loss positions."""
    from flexkd.objective import feature_positions

    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]])  # the last row is left-padded
    loss_positions = torch.tensor([[False, True, True, False], [False, True, False, False], [False] * 4])
    assert torch.equal(feature_positions("all", attention, torch.ones(3, dtype=torch.bool)), attention.bool())
    assert torch.equal(feature_positions("response", attention, loss_positions), loss_positions)
    assert torch.equal(feature_positions("head", attention, loss_positions), loss_positions)
    head = feature_positions("head", attention, torch.ones(3, dtype=torch.bool))
    assert head.tolist() == [[True, False, False, False], [True, False, False, False], [False] * 4]
