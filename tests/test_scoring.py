"""The scorer against a slow reference: per-example autograd loops in float64, for every method and several
scoring batch sizes; and selection on a constructed teacher whose output reads only known units."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from flexkd.config import SCORING_METHODS, SELECTION_STRATEGIES
from flexkd.data import IGNORE, collate
from flexkd.models import freeze
from flexkd.scoring import SCORERS, ScoreSet, score_units
from flexkd.selection import SELECTORS, select, top_k

from .tiny import random_examples, tiny_bert_classifier, tiny_llama


def test_dicts_match_the_names_config_accepts():
    assert tuple(SCORERS) == SCORING_METHODS
    assert tuple(SELECTORS) == SELECTION_STRATEGIES


def reference_scores(model, examples, batch_size, layers, method, classification):
    """Per-unit scores by brute force: each example alone (no padding), autograd of its own summed loss,
    scaled by the batch's 1/N, then explicit loops over examples, positions and units."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)  # the reference gets its graph the ordinary way, not through the scorer's hook
    totals = {layer: None for layer in layers}
    tokens = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if classification:
            n_batch = len(chunk)
        else:
            n_batch = sum(1 for e in chunk for y in e["labels"] if y != IGNORE)
        per_example = []
        for e in chunk:
            ids = torch.tensor([e["input_ids"]])
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            if classification:
                loss = F.cross_entropy(out.logits, torch.tensor([e["labels"]]), reduction="sum")
            else:
                loss = F.cross_entropy(
                    out.logits[0], torch.tensor(e["labels"]), ignore_index=IGNORE, reduction="sum"
                )
            hs = [out.hidden_states[layer] for layer in layers]
            grads = torch.autograd.grad(loss, hs)
            per_example.append([(g[0] / n_batch, h[0].detach()) for g, h in zip(grads, hs)])
            tokens += len(e["input_ids"])
        for li, layer in enumerate(layers):
            dim = per_example[0][li][0].shape[-1]
            batch_score = []
            for j in range(dim):
                if method == "grad":
                    acc = 0.0
                    for ex in per_example:
                        g = ex[li][0]
                        for p in range(g.shape[0]):
                            acc += g[p, j].item()
                    batch_score.append(abs(acc))
                else:
                    acc = 0.0
                    for ex in per_example:
                        g, h = ex[li]
                        for p in range(g.shape[0]):
                            gv, hv = g[p, j].item(), h[p, j].item()
                            acc += {"grad_token": abs(gv), "taylor": abs(gv * hv), "fisher": gv * gv}[method]
                    batch_score.append(acc)
            batch_score = torch.tensor(batch_score, dtype=torch.float64)
            totals[layer] = batch_score if totals[layer] is None else totals[layer] + batch_score
    return {layer: t / tokens for layer, t in totals.items()}


def batched(examples, batch_size):
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id=0)


@pytest.mark.parametrize("task", ["classification", "instruction"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_scores_equal_per_example_autograd_reference(task, batch_size):
    classification = task == "classification"
    model = freeze(tiny_bert_classifier() if classification else tiny_llama())
    examples = random_examples(13, task, seed=batch_size)
    layers = [0, 1, 2]
    got = score_units(model, batched(examples, batch_size), layers, dim=16)
    assert got.examples == 13
    for method in SCORERS:
        want = reference_scores(model, examples, batch_size, layers, method, classification)
        for layer in layers:
            ours = got.layers[layer].scores(method)
            scale = want[layer].abs().max()
            torch.testing.assert_close(ours, want[layer], rtol=1e-6, atol=1e-9 * float(scale))
            assert scale > 0


def test_grad_depends_on_batch_size_and_grad_token_does_not_up_to_normalisation():
    model = freeze(tiny_bert_classifier())
    examples = random_examples(12, "classification", seed=5)
    one = score_units(model, batched(examples, 1), [2], dim=16).layers[2]
    four = score_units(model, batched(examples, 4), [2], dim=16).layers[2]
    # grad_token: L is a batch mean, so batch size b scales every per-token gradient by 1/b.
    torch.testing.assert_close(four.scores("grad_token") * 4, one.scores("grad_token"))
    assert not torch.allclose(four.scores("grad") * 4, one.scores("grad"))


def test_partial_sums_from_shards_add_up_to_the_whole():
    model = freeze(tiny_llama())
    examples = random_examples(10, "instruction", seed=3)
    whole = score_units(model, batched(examples, 2), [1, 2], dim=16)
    first = score_units(model, batched(examples[:6], 2), [1, 2], dim=16)
    second = score_units(model, batched(examples[6:], 2), [1, 2], dim=16)
    merged = first.merge(second)
    for layer in (1, 2):
        for method in SCORERS:
            torch.testing.assert_close(merged.layers[layer].sums[method], whole.layers[layer].sums[method])
        assert merged.layers[layer].tokens == whole.layers[layer].tokens
    # flatten/unflatten is the layout an all-reduce carries.
    again = whole.unflatten(whole.flatten())
    assert isinstance(again, ScoreSet) and again.examples == whole.examples
    torch.testing.assert_close(again.layers[2].act_sq_sum, whole.layers[2].act_sq_sum)


def test_variance_moments_equal_a_direct_computation():
    model = freeze(tiny_bert_classifier())
    examples = random_examples(7, "classification", seed=9)
    got = score_units(model, batched(examples, 3), [1], dim=16).layers[1]
    rows = []
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[1][0])
    allh = torch.cat(rows)
    torch.testing.assert_close(got.variance(), allh.var(0, unbiased=False).double(), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# A teacher whose output reads only units {3, 7, 11, 20} of its last hidden state.

KNOWN = [3, 7, 11, 20]


def constructed_teacher():
    model = tiny_bert_classifier(hidden=32, labels=2, seed=4)
    with torch.no_grad():
        pool = torch.zeros(32, 32, dtype=torch.float64)
        for j in KNOWN:
            pool[j, j] = 1.0
        model.bert.pooler.dense.weight.copy_(pool)
        model.bert.pooler.dense.bias.zero_()
        cls = torch.zeros(2, 32, dtype=torch.float64)
        cls[0, KNOWN] = torch.tensor([1.5, -2.0, 1.0, 2.5], dtype=torch.float64)
        cls[1, KNOWN] = -cls[0, KNOWN]
        model.classifier.weight.copy_(cls)
    return freeze(model)


@pytest.mark.parametrize("method", list(SCORERS))
def test_gradient_selection_finds_exactly_the_units_the_output_reads(method):
    model = constructed_teacher()
    examples = random_examples(24, "classification", seed=11, labels=2)
    scores = score_units(model, batched(examples, 8), [2], dim=32)
    chosen = select(scores, [(2, 1)], "gradient", method, k=len(KNOWN), seed=0)[0]
    assert chosen.indices == KNOWN
    others = [j for j in range(32) if j not in KNOWN]
    assert scores.layers[2].scores(method)[others].abs().max() == 0  # no other unit reaches the loss
    assert chosen.scores[3] > 0 and chosen.token_count == sum(len(e["input_ids"]) for e in examples)


def test_random_and_first_selection_do_not_find_them():
    model = constructed_teacher()
    examples = random_examples(8, "classification", seed=11, labels=2)
    scores = score_units(model, batched(examples, 8), [2], dim=32)
    for strategy in ("random", "first", "variance"):
        chosen = select(scores, [(2, 1)], strategy, "grad", k=len(KNOWN), seed=0)[0]
        assert chosen.indices != KNOWN, strategy


def test_top_k_breaks_ties_towards_the_lower_index_and_returns_ascending():
    values = torch.tensor([1.0, 5.0, 3.0, 5.0, 3.0, 0.0], dtype=torch.float64)
    assert top_k(values, 3).tolist() == [1, 2, 3]
    assert top_k(values, 4).tolist() == [1, 2, 3, 4]
    assert top_k(torch.zeros(5), 2).tolist() == [0, 1]


def test_random_selection_is_seeded_per_layer():
    model = freeze(tiny_bert_classifier(hidden=32))
    examples = random_examples(4, "classification", seed=1)
    scores = score_units(model, batched(examples, 4), [1, 2], dim=32)
    a = select(scores, [(1, 1), (2, 2)], "random", "grad", 8, seed=7)
    b = select(scores, [(1, 1), (2, 2)], "random", "grad", 8, seed=7)
    c = select(scores, [(1, 1), (2, 2)], "random", "grad", 8, seed=8)
    assert [s.indices for s in a] == [s.indices for s in b]
    assert a[0].indices != a[1].indices and a[0].indices != c[0].indices
    assert all(s.indices == sorted(s.indices) and len(set(s.indices)) == 8 for s in a)
