"""The feature losses are functions of the global batch: 2 gloo ranks against one process on the whole batch.

With a process group, ``pearson``, ``mse_std`` and ``projector`` sum their statistics over the ranks (with
autograd), so the loss of N ranks' micro-batches is one process's loss on their concatenation, and DDP's
averaged gradient is that loss's gradient. With gradient accumulation each accumulation step is one such
global micro-batch and the optimiser step's loss is the mean over the steps (documented in flexkd.losses and
the README's Ray Train section). One spawn runs every two-rank case; the tests below compare its results.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from flexkd.config import load_config
from flexkd.data import collate, micro_batches
from flexkd.losses import FEATURE_LOSSES, co_moments, pearson_correlations

from .fixtures import on_gloo_ranks
from .tiny import random_examples, tiny_bert_classifier

WORLD = 2
NAMES = ["pearson", "mse_std", "projector"]
UNITS = torch.tensor([1, 3, 4, 6, 9])  # k = 5 < d_S = 8; d_T = 10
# Rows of a global batch of 6 sequences on each rank: even, uneven, and one rank whose rows are all masked.
SPLITS = {
    "even": ([0, 1, 2], [3, 4, 5]),
    "uneven": ([0], [1, 2, 3, 4, 5]),
    "rank1_empty": ([0, 1, 2], [3, 4, 5]),
}
OBJECTIVE_ARGS = ["task.weight=0", "kd.weight=0", "feature.weight=1.0"]  # the feature term alone


# ---------------------------------------------------------------------------------------------------------
# Data and models, built the same way in the parent and in each rank.


def batch(case: str, rows: int = 6):
    """(x (B, 5, 4) inputs, teacher hidden (B, 5, 10), mask (B, 5)) of the global batch, float32."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 5, 4, generator=g)
    # Big offsets on some units: precision of the centred sums is part of the test.
    ht = torch.randn(rows, 5, 10, generator=g) + torch.linspace(-50, 50, 10)
    mask = torch.rand(rows, 5, generator=g) > 0.3
    mask[:, 0] = True
    if case == "rank1_empty":
        mask[3:] = False
    return x, ht, mask


def models():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    projector = torch.nn.Linear(8, 10)
    return student, projector


def grads(module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def average_projector(projector) -> None:
    """What the loop does with the projector's gradients (it is not in DDP)."""
    from flexkd.distributed import all_reduce_sum

    for p in projector.parameters():
        if p.grad is not None:
            p.grad = all_reduce_sum(p.grad) / WORLD


def one_process(name, rows, x, ht, mask):
    """Loss, d loss / d hidden and parameter gradients on ``rows`` of the batch, in one process."""
    student, projector = models()
    hs = student(x[rows])
    hs.retain_grad()
    loss = FEATURE_LOSSES[name](hs, ht[rows], mask[rows], UNITS, projector)
    loss.backward()
    return {"loss": loss.detach(), "hs": hs.grad, "student": grads(student), "projector": grads(projector)}


def objective_batches():
    examples = random_examples(6, "classification", seed=5)
    return [collate(examples[i : i + 3], pad_id=0) for i in (0, 3)], collate(examples, pad_id=0)


def objective_models():
    return tiny_bert_classifier(hidden=32, seed=0), tiny_bert_classifier(hidden=16, seed=1)


def objective_units():
    return [torch.tensor([0, 2, 3, 5, 7, 11, 13, 17, 19, 23, 24, 26, 28, 29, 30, 31])]


# ---------------------------------------------------------------------------------------------------------
# The two ranks


def _worker(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flexkd.distributed import loss_group
    from flexkd.objective import Objective

    group = loss_group()
    assert group is not None
    results = {}
    for case, split in SPLITS.items():
        x, ht, mask = batch(case)
        rows = split[rank]
        for name in NAMES:
            student, projector = models()
            model = DDP(student)
            hs = model(x[rows])
            hs.retain_grad()
            loss = FEATURE_LOSSES[name](hs, ht[rows], mask[rows], UNITS, projector, group=group)
            loss.backward()
            average_projector(projector)
            results[case, name] = {
                "loss": loss.detach(),
                "hs": hs.grad,
                "student": grads(student),
                "projector": grads(projector),
            }

    # Gradient accumulation as the loop runs it: the rank's micro-batches, DDP synchronising on the last.
    accum = 2
    x, ht, mask = batch("even", rows=8)
    for name in NAMES:
        student, projector = models()
        model = DDP(student)
        step_loss = 0.0
        for a, micro in enumerate(micro_batches(list(range(8)), rank, WORLD, accum)):
            sync = contextlib.nullcontext() if a == accum - 1 else model.no_sync()
            with sync:
                loss = FEATURE_LOSSES[name](
                    model(x[micro]), ht[micro], mask[micro], UNITS, projector, group=group
                )
                (loss / accum).backward()
            step_loss += float(loss.detach()) / accum
        average_projector(projector)
        results["accum", name] = {
            "loss": step_loss,
            "student": grads(student),
            "projector": grads(projector),
        }

    # The objective (the loop's own call of the feature loss), on a tiny BERT pair, student in DDP.
    teacher, student = objective_models()
    cfg = load_config("demo", OBJECTIVE_ARGS)
    objective = Objective(cfg, teacher, [(-1, -1)], objective_units(), None, vocab=97, group=group)
    model = DDP(student)
    terms = objective(model, objective_batches()[0][rank])
    objective.total(terms).backward()
    results["objective"] = {"loss": terms["feat"].detach(), "student": grads(student)}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    return on_gloo_ranks(_worker, WORLD, out)


def close(a, b):
    # The losses run in float32 (``_aligned``): gradients here are 1e-2..2e-1, their rounding up to 1e-5.
    return torch.allclose(a, b, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(SPLITS))
def test_two_ranks_give_the_loss_and_gradients_of_the_concatenated_batch(ranks, case, name):
    x, ht, mask = batch(case)
    ref = one_process(name, list(range(6)), x, ht, mask)
    for rank in range(WORLD):
        got = ranks[rank][case, name]
        assert close(got["loss"], ref["loss"]), (rank, got["loss"], ref["loss"])
        # Each rank's hidden states get world x their share (the all-reduce's backward sums over ranks) ...
        assert close(got["hs"] / WORLD, ref["hs"][SPLITS[case][rank]])
        # ... which DDP's average of the parameter gradients divides out: the single-process gradient.
        for g, r in zip(got["student"], ref["student"]):
            assert close(g, r)
        if name == "projector":
            for g, r in zip(got["projector"], ref["projector"]):
                assert close(g, r)
    if case != "rank1_empty":
        # What one rank's own micro-batch would give is another function: the cases above can tell.
        alone = one_process(name, SPLITS[case][0], x, ht, mask)
        assert not close(alone["loss"], ref["loss"])
        assert not all(close(g, r) for g, r in zip(alone["student"], ref["student"]))


@pytest.mark.parametrize("name", NAMES)
def test_grad_accumulation_is_the_mean_over_steps_of_the_global_micro_batch_loss(ranks, name):
    """accum=2 on 2 ranks: step loss and gradient = mean over a of the loss of micro-batch a of every rank."""
    x, ht, mask = batch("even", rows=8)
    steps = [one_process(name, rows, x, ht, mask) for rows in ([0, 1, 2, 3], [4, 5, 6, 7])]
    mean_loss = sum(float(s["loss"]) for s in steps) / 2
    whole = one_process(name, list(range(8)), x, ht, mask)
    for rank in range(WORLD):
        got = ranks[rank]["accum", name]
        assert got["loss"] == pytest.approx(mean_loss, rel=1e-5)
        for i, g in enumerate(got["student"]):
            assert close(g, (steps[0]["student"][i] + steps[1]["student"][i]) / 2)
    if name != "projector":  # a mean of squares: equal to the whole batch's when the steps hold equal counts
        assert float(whole["loss"]) != pytest.approx(mean_loss, rel=1e-3)  # not the whole global batch's loss


def test_the_objective_on_two_ranks_is_the_objective_on_the_concatenated_batch(ranks):
    from flexkd.objective import Objective

    teacher, student = objective_models()
    cfg = load_config("demo", OBJECTIVE_ARGS)
    objective = Objective(cfg, teacher, [(-1, -1)], objective_units(), None, vocab=97)
    halves, whole = objective_batches()
    terms = objective(student, whole)
    objective.total(terms).backward()
    ref = grads(student)
    for rank in range(WORLD):
        got = ranks[rank]["objective"]
        assert close(got["loss"], terms["feat"].detach())
        assert all(close(g, r) for g, r in zip(got["student"], ref))
    assert not close(objective(student, halves[0])["feat"].detach(), terms["feat"].detach())


# ---------------------------------------------------------------------------------------------------------
# One process: the statistics against loops over positions


def loop_reference(s_rows, t_rows):
    """Per-unit (pearson, mean squared difference of standardised features) by loops, math module only."""
    n, k = len(s_rows), len(s_rows[0])
    rho, mse = [], []
    for j in range(k):
        xs, ys = [r[j] for r in s_rows], [r[j] for r in t_rows]
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((v - mx) ** 2 for v in xs)
        syy = sum((v - my) ** 2 for v in ys)
        sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
        rho.append(sxy / (math.sqrt(sxx + 1e-8) * math.sqrt(syy + 1e-8)))
        zx = [(v - mx) / math.sqrt(sxx / n + 1e-8) for v in xs]
        zy = [(v - my) / math.sqrt(syy / n + 1e-8) for v in ys]
        mse.append(sum((a - b) ** 2 for a, b in zip(zx, zy)) / n)
    return rho, mse


def test_pearson_and_mse_std_equal_loops_over_positions():
    g = torch.Generator().manual_seed(11)
    s = (
        torch.randn(23, 6, generator=g, dtype=torch.float64) * 3 + 100
    )  # a large mean: cancellation would show
    t = torch.randn(23, 6, generator=g, dtype=torch.float64) + s * 0.01
    s[:, 4] = 2.5  # a constant column: correlation 0, not NaN
    rho, mse = loop_reference(s.tolist(), t.tolist())
    assert pearson_correlations(s, t).tolist() == pytest.approx(rho, rel=1e-9, abs=1e-9)
    hs, ht = s.unsqueeze(0), t.unsqueeze(0)
    mask, units = torch.ones(1, 23, dtype=torch.bool), torch.arange(6)
    assert FEATURE_LOSSES["pearson"](hs, ht, mask, units).item() == pytest.approx(
        sum(1 - r for r in rho) / 6, rel=1e-6
    )
    assert FEATURE_LOSSES["mse_std"](hs, ht, mask, units).item() == pytest.approx(sum(mse) / 6, rel=1e-5)
    n, ss, tt, st = co_moments(s, t)
    assert n.item() == 23 and ss[4].item() == 0.0
    assert st[0].item() == pytest.approx(
        sum(
            (a - s[:, 0].mean().item()) * (b - t[:, 0].mean().item())
            for a, b in zip(s[:, 0].tolist(), t[:, 0].tolist())
        ),
        rel=1e-9,
    )


@pytest.mark.parametrize("name,expected", [("pearson", 1.0), ("mse_std", 0.0)])
def test_a_batch_without_masked_positions_gives_a_finite_loss_and_no_gradient(name, expected):
    hs = torch.randn(2, 3, 8, requires_grad=True)
    loss = FEATURE_LOSSES[name](hs, torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.bool), UNITS)
    loss.backward()
    assert loss.item() == expected and torch.equal(hs.grad, torch.zeros_like(hs))
