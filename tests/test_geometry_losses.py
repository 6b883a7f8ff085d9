"""The geometry baselines, ``cka`` and ``gram``: slow references, invariances, gradients, routing, two ranks.

Both read the full hidden states (every student dim, every teacher unit) and sum d x d statistics over
positions, so two gloo ranks must give one process's loss and gradient on the concatenated batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from flexkd.config import ConfigError, key_docs, load_config, method_name, uses_selection
from flexkd.data import collate
from flexkd.losses import FEATURE_LOSSES
from flexkd.plan import ModelDims, make_plan

from .fixtures import on_gloo_ranks
from .tiny import random_examples, tiny_bert_classifier

NAMES = ["cka", "gram"]


@pytest.fixture
def hidden():
    """(hs (2, 7, 6), ht (2, 7, 9), mask (2, 7)) in float64, with padding and teacher offsets."""
    g = torch.Generator().manual_seed(21)
    hs = torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    ht = torch.randn(2, 7, 9, generator=g, dtype=torch.float64) * 2 + torch.linspace(-30, 30, 9)
    ht = ht + 0.5 * torch.cat([hs, hs[..., :3]], dim=-1)  # some shared structure: the loss is neither 0 nor 1
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 6:] = False
    return hs, ht, mask


# ---------------------------------------------------------------------------------------------------------
# Slow references: python lists and loops, math module only, through the (N, N) matrices the code avoids.


def _rows(h, mask):
    return [h[b, i].tolist() for b in range(h.shape[0]) for i in range(h.shape[1]) if mask[b, i]]


def _centred(rows):
    n, d = len(rows), len(rows[0])
    mean = [sum(r[j] for r in rows) / n for j in range(d)]
    return [[r[j] - mean[j] for j in range(d)] for r in rows]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _gram(rows):
    return [[_dot(a, b) for b in rows] for a in rows]


def naive_cka_loss(s_rows, t_rows):
    """1 - <K, L>_F / (||K||_F ||L||_F), K and L the (N, N) Gram matrices of the centred rows."""
    k, m = _gram(_centred(s_rows)), _gram(_centred(t_rows))
    n = len(k)
    kl = sum(k[i][j] * m[i][j] for i in range(n) for j in range(n))
    kk = sum(k[i][j] ** 2 for i in range(n) for j in range(n))
    mm = sum(m[i][j] ** 2 for i in range(n) for j in range(n))
    return 1 - kl / math.sqrt((kk + 1e-8) * (mm + 1e-8))


def naive_cka_hsic(s_rows, t_rows):
    """The same through HSIC with the centring matrix H = I - 11^T / n on uncentred Gram matrices."""
    n = len(s_rows)
    h = [[(1.0 if i == j else 0.0) - 1.0 / n for j in range(n)] for i in range(n)]

    def mul(a, b):
        return [[sum(a[i][r] * b[r][j] for r in range(n)) for j in range(n)] for i in range(n)]

    kc, lc = mul(mul(h, _gram(s_rows)), h), mul(mul(h, _gram(t_rows)), h)

    def hsic(a, b):
        return sum(a[i][j] * b[j][i] for i in range(n) for j in range(n))

    return 1 - hsic(kc, lc) / math.sqrt(hsic(kc, kc) * hsic(lc, lc))


def naive_gram_loss(s_rows, t_rows):
    """Mean over all (i, j) of (cos(x_i, x_j) - cos(y_i, y_j))^2, rows centred over the positions."""

    def cosines(rows):
        unit = [[v / math.sqrt(_dot(r, r) + 1e-8) for v in r] for r in _centred(rows)]
        return _gram(unit)

    a, b = cosines(s_rows), cosines(t_rows)
    n = len(a)
    return sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


REFERENCES = {"cka": naive_cka_loss, "gram": naive_gram_loss}


@pytest.mark.parametrize("name", NAMES)
def test_equals_the_loop_reference_over_masked_positions(name, hidden):
    hs, ht, mask = hidden
    got = FEATURE_LOSSES[name](hs, ht, mask, None).item()
    want = REFERENCES[name](_rows(hs, mask), _rows(ht, mask))
    assert 0.01 < want < 0.99  # neither degenerate case
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_cka_agrees_with_the_hsic_formula(hidden):
    hs, ht, mask = hidden
    got = FEATURE_LOSSES["cka"](hs, ht, mask, None).item()
    assert got == pytest.approx(naive_cka_hsic(_rows(hs, mask), _rows(ht, mask)), rel=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_float32_inputs_give_a_float32_loss_close_to_float64(name, hidden):
    hs, ht, mask = hidden
    ref = FEATURE_LOSSES[name](hs, ht, mask, None)
    got = FEATURE_LOSSES[name](hs.float(), ht.float(), mask, None)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Properties


def _orthonormal_columns(rows, cols, seed):
    q, _ = torch.linalg.qr(
        torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q  # (rows, cols), q^T q = I


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_the_student_is_the_teacher_rotated_scaled_and_shifted(name, hidden):
    _, ht, mask = hidden
    q = _orthonormal_columns(12, 9, 1).T  # (9, 12): an isometric embedding of the teacher's space
    student = 3.7 * ht @ q + torch.linspace(-5, 5, 12, dtype=torch.float64)
    assert FEATURE_LOSSES[name](student, ht, mask, None).item() == pytest.approx(0.0, abs=1e-10)
    # ... and not zero for a student that is not (a rotation of a different teacher).
    other = torch.randn(ht.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert FEATURE_LOSSES[name](other @ q, ht, mask, None).item() > 0.05


# gram's eps sits on each position's squared norm (about 6 here), so its invariance holds to ~eps / 6 / scale^2.
@pytest.mark.parametrize("name,scale", [("cka", 1e-3), ("cka", 1e3), ("gram", 3.0), ("gram", 0.3)])
def test_invariant_to_rotation_and_isotropic_scaling_of_the_student(name, scale, hidden):
    hs, ht, mask = hidden
    rot = _orthonormal_columns(6, 6, 2)
    a = FEATURE_LOSSES[name](hs, ht, mask, None).item()
    b = FEATURE_LOSSES[name](scale * hs @ rot + 4.0, ht, mask, None).item()
    assert b == pytest.approx(a, rel=1e-7)
    # Not invariant to an anisotropic scaling: the geometry changes (so the test above can fail).
    c = FEATURE_LOSSES[name](hs * torch.tensor([10.0, 1, 1, 1, 1, 0.1], dtype=torch.float64), ht, mask, None)
    assert abs(c.item() - a) > 1e-3


def test_gram_tells_apart_what_cka_does_not():
    """CKA weighs positions by their norm: a student that copies two outlier positions of the teacher (norm
    100, as massive-activation tokens have) and nothing else has CKA near 1, while the angles between the
    other 38 positions, each pair of which counts alike in gram, are wrong."""
    g = torch.Generator().manual_seed(9)
    teacher = torch.randn(1, 40, 5, generator=g, dtype=torch.float64)
    student = torch.randn(1, 40, 5, generator=g, dtype=torch.float64)
    outlier = torch.randn(5, generator=g, dtype=torch.float64) * 100
    outliers = torch.stack([outlier, -outlier])  # opposite: the mean, and so the centring, stays small
    teacher[0, :2], student[0, :2] = outliers, outliers
    mask = torch.ones(1, 40, dtype=torch.bool)
    assert FEATURE_LOSSES["cka"](student, teacher, mask, None).item() < 1e-2
    assert FEATURE_LOSSES["gram"](student, teacher, mask, None).item() > 0.1
    # Copy the rest too and both are 0: the gap above is the 38 positions.
    assert FEATURE_LOSSES["gram"](teacher, teacher, mask, None).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_positions_outside_the_mask_are_ignored_and_get_no_gradient(name, hidden):
    hs, ht, mask = hidden
    hs2, ht2 = hs.clone(), ht.clone()
    hs2[~mask] = 1e4
    ht2[~mask] = -1e4
    hs2.requires_grad_(True)
    ht2.requires_grad_(True)
    loss = FEATURE_LOSSES[name](hs2, ht2, mask, None)
    assert loss.item() == pytest.approx(FEATURE_LOSSES[name](hs, ht, mask, None).item(), rel=1e-9)
    loss.backward()
    assert ht2.grad is None  # the teacher is detached
    assert hs2.grad[mask].abs().sum() > 0 and hs2.grad[~mask].abs().sum() == 0


@pytest.mark.parametrize("name", NAMES)
def test_units_are_ignored_every_student_dim_is_pulled(name, hidden):
    hs, ht, mask = hidden
    hs = hs.clone().requires_grad_(True)
    a = FEATURE_LOSSES[name](hs, ht, mask, torch.tensor([0, 1]))
    a.backward()
    assert a.item() == pytest.approx(FEATURE_LOSSES[name](hs, ht, mask, None).item(), rel=1e-12)
    assert (hs.grad[mask].abs().sum(0) > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name, hidden):
    hs, ht, mask = hidden
    hs = hs[:, :4, :3].clone().requires_grad_(True)  # tiny: 7 positions x 3 dims
    ht, mask = ht[:, :4, :5], mask[:, :4].clone()
    mask[1, 3] = False
    assert torch.autograd.gradcheck(lambda x: FEATURE_LOSSES[name](x, ht, mask, None), (hs,))


@pytest.mark.parametrize("name,expected", [("cka", 1.0), ("gram", 0.0)])
def test_constant_features_and_empty_masks_give_finite_losses_and_gradients(name, expected, hidden):
    hs, ht, mask = hidden
    const = torch.full_like(hs, 7.0).requires_grad_(True)
    loss = FEATURE_LOSSES[name](const, ht, mask, None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(const.grad).all()
    if name == "cka":
        assert loss.item() == pytest.approx(1.0)
    empty = hs.clone().requires_grad_(True)
    loss = FEATURE_LOSSES[name](empty, ht, torch.zeros_like(mask), None)
    loss.backward()
    assert loss.item() == expected and torch.equal(empty.grad, torch.zeros_like(hs))


# ---------------------------------------------------------------------------------------------------------
# Routing: accepted names, no selection, no scoring, the full teacher state.


@pytest.mark.parametrize("name", NAMES)
def test_config_accepts_them_without_selection(name):
    cfg = load_config("demo", [f"feature.loss={name}", "selection.k=999"])
    assert not uses_selection(cfg) and method_name(cfg) == f"{name}+kd"
    assert name in key_docs()["feature.loss"]
    plan = make_plan(cfg, ModelDims(32, 2, "bert"), ModelDims(16, 2, "bert"), 100)
    assert not plan.selects_units and "feat" in plan.terms  # selection.k=999 is not range-checked
    with pytest.raises(ConfigError):  # ... as it is for Flex-KD, which selects
        make_plan(
            load_config("demo", ["selection.k=999"]), ModelDims(32, 2, "bert"), ModelDims(16, 2, "bert"), 100
        )
    with pytest.raises(ConfigError, match="signals.units"):
        load_config("demo", [f"feature.loss={name}", "signals.units=selected"])


@pytest.mark.parametrize("name", NAMES)
def test_the_objective_runs_them_on_full_hidden_states(name):
    from flexkd.objective import Objective

    teacher, student = tiny_bert_classifier(hidden=32, seed=0), tiny_bert_classifier(hidden=16, seed=1)
    batch = collate(random_examples(4, "classification", seed=5), pad_id=0)
    cfg = load_config("demo", [f"feature.loss={name}", "task.weight=0", "kd.weight=0"])
    objective = Objective(cfg, teacher, [(-1, -1)], [None], None, vocab=97)
    terms = objective(student, batch)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        hs = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        ht = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    want = REFERENCES[name](_rows(hs.hidden_states[-1], mask), _rows(ht.hidden_states[-1], mask))
    assert set(terms) == {"task", "feat"}
    assert terms["feat"].item() == pytest.approx(want, rel=1e-6)
    objective.total(terms).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ---------------------------------------------------------------------------------------------------------
# Two gloo ranks against one process on the concatenated batch


WORLD = 2
SPLITS = {
    "even": ([0, 1, 2], [3, 4, 5]),
    "uneven": ([0], [1, 2, 3, 4, 5]),
    "rank1_empty": ([0, 1, 2], [3, 4, 5]),
}


def rank_batch(case):
    """(x (6, 5, 4), teacher hidden (6, 5, 10), mask (6, 5)), float32."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, 4, generator=g)
    ht = torch.randn(6, 5, 10, generator=g) + torch.linspace(-50, 50, 10)  # offsets: centring precision
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[:, 0] = True
    if case == "rank1_empty":
        mask[3:] = False
    return x, ht, mask


def rank_student():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))


def run_loss(name, rows, case, group=None, wrap=None):
    x, ht, mask = rank_batch(case)
    student = rank_student()
    model = wrap(student) if wrap else student
    hs = model(x[rows])
    hs.retain_grad()
    loss = FEATURE_LOSSES[name](hs, ht[rows], mask[rows], None, group=group)
    loss.backward()
    return {"loss": loss.detach(), "hs": hs.grad, "student": [p.grad.clone() for p in student.parameters()]}


def _worker(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {
        (case, name): run_loss(name, split[rank], case, group=dist.group.WORLD, wrap=DDP)
        for case, split in SPLITS.items()
        for name in NAMES
    }
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("geometry_ranks")
    return on_gloo_ranks(_worker, WORLD, out)


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=3e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(SPLITS))
def test_two_ranks_give_the_loss_and_gradients_of_the_concatenated_batch(ranks, case, name):
    ref = run_loss(name, list(range(6)), case)
    for rank in range(WORLD):
        got = ranks[rank][case, name]
        assert close(got["loss"], ref["loss"]), (rank, got["loss"], ref["loss"])
        assert close(got["hs"] / WORLD, ref["hs"][SPLITS[case][rank]])  # the all-reduce's backward sums
        assert all(close(g, r) for g, r in zip(got["student"], ref["student"]))  # DDP divides it out
    if case != "rank1_empty":  # one rank's own batch is another function: the checks above can tell
        alone = run_loss(name, SPLITS[case][0], case)
        assert not close(alone["loss"], ref["loss"])
        assert not all(close(g, r) for g, r in zip(alone["student"], ref["student"]))
