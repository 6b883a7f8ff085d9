"""The seams every mode shares: the objective's composition, the metrics, pinned losses, one run folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from flexkd.config import load_config
from flexkd.data import IGNORE, collate
from flexkd.evaluation import evaluate, macro_f1, rouge_l
from flexkd.losses import KD_LOSSES, feature_pearson, task_loss
from flexkd.objective import Objective

from .tiny import random_examples, tiny_bert_classifier, tiny_llama


def test_the_package_facade_works_every_time():
    import flexkd
    import flexkd.train  # noqa: F401  (the loop module; importing it must not change the facade)

    for _ in range(2):
        assert flexkd.FEATURE_LOSSES["pearson"] is feature_pearson
        assert flexkd.load_config("demo").data.task == "classification"
        assert callable(flexkd.train.train)
    with pytest.raises(AttributeError):
        flexkd.no_such_name  # noqa: B018


# ---------------------------------------------------------------------------------------------------------
# The objective with an asymmetric layer map


@pytest.mark.parametrize("task", ["classification", "instruction"])
def test_objective_aligns_the_teacher_layer_with_the_student_layer_it_is_mapped_to(task):
    """Teacher entry 1 with student entry 2 (and teacher 3 with student 1): swapping any pair changes the loss."""
    build = tiny_bert_classifier if task == "classification" else tiny_llama
    teacher = build(hidden=32, layers=3, seed=0)
    student = build(hidden=16, layers=2, seed=1)
    preset = "demo" if task == "classification" else "demo-instruct"
    cfg = load_config(
        preset, ["task.weight=0.7", "kd.weight=0.4", "feature.weight=2.5", "kd.temperature=2.0"]
    )
    layer_map = [(1, 2), (3, 1)]
    units = [torch.tensor([0, 3, 5, 7, 11, 13, 17, 19, 23, 29, 30, 31, 2, 4, 6, 8]).sort().values] * 2
    examples = random_examples(6, task, seed=3)
    batch = collate(examples, pad_id=0)
    objective = Objective(cfg, teacher, layer_map, units, None, vocab=97)
    terms = objective(student, batch)

    # The reference, written out by hand from FLEXKD.md section 3.
    s_out = student(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    t_out = teacher(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    loss_mask = batch["labels"] != IGNORE
    feat = [
        feature_pearson(s_out.hidden_states[s], t_out.hidden_states[t], mask, units[i])
        for i, (t, s) in enumerate(layer_map)
    ]
    expected = {
        "task": task_loss(s_out.logits, batch["labels"]),
        "kd": KD_LOSSES["fkl"](s_out.logits, t_out.logits, loss_mask, 2.0, 0.1),
        "feat": torch.stack(feat).mean(),
    }
    assert set(terms) == {"task", "kd", "feat"}
    for name in expected:
        torch.testing.assert_close(terms[name], expected[name].float(), rtol=1e-6, atol=1e-7)
    total = 0.7 * expected["task"] + 0.4 * expected["kd"] + 2.5 * expected["feat"]
    torch.testing.assert_close(objective.total(terms), total.float(), rtol=1e-6, atol=1e-7)

    # Read the map the wrong way round (student index as the teacher's): a different number, far outside the
    # tolerance the right reading meets (random tiny models correlate weakly either way, so the gap is small).
    swapped = torch.stack(
        [
            feature_pearson(s_out.hidden_states[t % 3], t_out.hidden_states[s], mask, units[i])
            for i, (t, s) in enumerate(layer_map)
        ]
    ).mean()
    assert abs(float(swapped) - float(terms["feat"])) > 100 * (1e-7 + 1e-6 * abs(float(swapped)))


def test_the_output_layer_runs_on_the_loss_positions_only_and_gives_the_full_logits_gradients():
    """head_on_rows: a causal LM's logits come out (N, V) for the N response positions, and the objective's
    terms and every parameter's gradient equal those computed from the whole (B, T, V) logits."""
    from flexkd.losses import head_on_rows

    teacher, student = tiny_llama(hidden=32, layers=3, seed=0), tiny_llama(hidden=16, layers=2, seed=1)
    cfg = load_config("demo-instruct", ["kd.weight=0.4", "feature.weight=2.5", "kd.temperature=2.0"])
    units = [torch.arange(0, 32, 2)]
    batch = collate(random_examples(6, "instruction", seed=5), pad_id=0)
    loss_mask = batch["labels"] != IGNORE
    with head_on_rows(student, loss_mask):
        rows = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert rows.shape == (int(loss_mask.sum()), student.config.vocab_size)
    assert student.get_output_embeddings()._forward_pre_hooks == {}  # the hook is gone afterwards

    objective = Objective(cfg, teacher, [(-1, -1)], units, None, vocab=97)
    student.zero_grad()
    terms = objective(student, batch)
    objective.total(terms).backward()
    fast = {n: p.grad.clone() for n, p in student.named_parameters()}

    # The slow way: every position's logits, then the loss positions picked out of them.
    student.zero_grad()
    s_out = student(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    t_out = teacher(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    expected = {
        "task": task_loss(s_out.logits, batch["labels"]),
        "kd": KD_LOSSES["fkl"](s_out.logits, t_out.logits.detach(), loss_mask, 2.0, 0.1),
        "feat": feature_pearson(
            s_out.hidden_states[-1], t_out.hidden_states[-1], batch["attention_mask"].bool(), units[0]
        ),
    }
    for name in expected:
        torch.testing.assert_close(terms[name], expected[name].float(), rtol=1e-6, atol=1e-7)
    (expected["task"] + 0.4 * expected["kd"] + 2.5 * expected["feat"]).backward()
    for name, param in student.named_parameters():
        torch.testing.assert_close(fast[name], param.grad, rtol=1e-6, atol=1e-9, msg=name)


# ---------------------------------------------------------------------------------------------------------
# Metrics against reference implementations


class FixedClassifier(torch.nn.Module):
    """Predicts a fixed class per example, keyed by the example's first token id."""

    def __init__(self, predictions: dict[int, int], classes: int):
        super().__init__()
        self.predictions = predictions
        self.config = type("Config", (), {"num_labels": classes})()

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(input_ids.shape[0], self.config.num_labels)
        for row, first in enumerate(input_ids[:, 0].tolist()):
            logits[row, self.predictions[first]] = 1.0
        return type("Out", (), {"logits": logits})()


def test_accuracy_and_macro_f1_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(0)
    classes = 4
    truth = [rng.randrange(classes) for _ in range(50)]
    truth[:3] = [0, 1, 2]  # class 3 may be missing from the truth; predictions below use it
    predicted = [t if rng.random() < 0.6 else rng.randrange(classes) for t in truth]
    examples = [{"input_ids": [i + 1, 5, 6], "labels": t} for i, t in enumerate(truth)]
    model = FixedClassifier({i + 1: p for i, p in enumerate(predicted)}, classes)
    cfg = load_config("demo", ["eval.batch_size=7"])
    tok = type("Tok", (), {"pad_token_id": 0})()
    metrics = evaluate(model, examples, [{}] * len(examples), cfg, tok, torch.device("cpu"), "val")
    assert metrics["val/accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert metrics["val/macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-12)
    # A class absent from both truth and predictions is left out of the mean, as scikit-learn does.
    confusion = torch.zeros(5, 5)
    for t, p in zip(truth, predicted):
        confusion[t, p] += 1
    assert macro_f1(confusion) == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-12)


def test_expected_calibration_error_equals_a_loop_over_examples():
    from flexkd.evaluation import ECE_BINS, calibration_sums, expected_calibration_error

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 3, generator=gen) * 3
    labels = torch.randint(0, 3, (300,), generator=gen)
    # Slow reference: each example into its bin by a loop over the bin edges, then the weighted gaps.
    bins = [[] for _ in range(ECE_BINS)]
    for row, label in zip(logits.double().softmax(-1).tolist(), labels.tolist()):
        conf = max(row)
        b = next(i for i in range(ECE_BINS) if conf <= (i + 1) / ECE_BINS)
        bins[b].append((conf, float(row.index(conf) == label)))
    expected = sum(
        len(b) / 300 * abs(sum(c for c, _ in b) / len(b) - sum(h for _, h in b) / len(b)) for b in bins if b
    )
    halves = calibration_sums(logits[:120], labels[:120]) + calibration_sums(logits[120:], labels[120:])
    assert expected_calibration_error(halves) == pytest.approx(expected, abs=1e-12)
    # A model whose confidence equals its accuracy in every bin scores 0; a confidently wrong one near 1.
    sure_wrong = torch.tensor([[10.0, -10.0]] * 8)
    assert expected_calibration_error(calibration_sums(sure_wrong, torch.ones(8, dtype=torch.long))) > 0.99
    right_half = torch.zeros(8, 2)  # confidence 0.5 everywhere, half of them right
    half = torch.tensor([0, 1] * 4)
    assert expected_calibration_error(calibration_sums(right_half, half)) == pytest.approx(0.0, abs=1e-12)


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _rouge_l_reference(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) by dynamic programming, with rouge-score's tokenisation (lower case, [a-z0-9]+)."""
    import re

    def tokens(text):
        return re.findall(r"[a-z0-9]+", text.lower())

    p, r = tokens(prediction), tokens(reference)
    lcs = _lcs(p, r)
    if not p or not r or lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize(
    "prediction,reference",
    [
        ("the cat sat on the mat", "the cat is on the mat"),
        ("Police killed the gunman", "The gunman was shot dead by police."),
        ("a b c d e f", "f e d c b a"),
        ("exact same answer", "Exact same answer!"),
        ("nothing shared", "completely different words"),
        ("", "an empty prediction"),
    ],
)
def test_rouge_l_equals_the_longest_common_subsequence_definition(prediction, reference):
    assert rouge_l(prediction, reference) == pytest.approx(
        _rouge_l_reference(prediction, reference), abs=1e-12
    )


# ---------------------------------------------------------------------------------------------------------
# Pinned losses: 4 steps of the demo on tiny seeded models

# Recorded on torch 2.13.0 (CPU) from this test's own run; a change in any loss, the objective, the data
# order or the optimiser moves them. Update only for a change that is meant to change the numbers.
PINNED_KEYS = ("train/loss", "train/loss_task", "train/loss_kd", "train/loss_feat")
PINNED_LOSSES = {
    1: {
        "train/loss": 0.758232713,
        "train/loss_task": 0.692602634,
        "train/loss_kd": 6.48965943e-06,
        "train/loss_feat": 0.0656235665,
    },
    2: {
        "train/loss": 0.762221992,
        "train/loss_task": 0.694650412,
        "train/loss_kd": 3.23067798e-06,
        "train/loss_feat": 0.0675683767,
    },
    3: {
        "train/loss": 0.756104469,
        "train/loss_task": 0.691258609,
        "train/loss_kd": 1.34133443e-05,
        "train/loss_feat": 0.0648324564,
    },
    4: {
        "train/loss": 0.755492687,
        "train/loss_task": 0.693622589,
        "train/loss_kd": 1.31973111e-05,
        "train/loss_feat": 0.0618569404,
    },
}


def test_four_steps_give_the_pinned_losses(disk, tmp_path):
    from flexkd.train import train

    cfg = load_config(
        "demo",
        [
            f"teacher.path={disk['teacher_cls']}",
            f"run.output_dir={tmp_path / 'run'}",
            "train.steps=4",
            "train.log_every=1",
            "train.eval_every=0",
            "train.batch_size=8",
            "eval.max_examples=8",
            "scoring.num_examples=16",
            "data.max_train_examples=64",
        ],
    )
    seen = {}
    train(cfg, lambda m, s, c=None: seen.setdefault(s, m))
    got = {s: {k: m[k] for k in PINNED_KEYS} for s, m in seen.items()}
    assert sorted(got) == [1, 2, 3, 4]
    for step, losses in PINNED_LOSSES.items():
        # abs 1e-8: the KD term is a KL of ~6e-6 between near-equal float32 distributions, whose last digits
        # move with the machine's BLAS threading (3.7e-9 between two machines, at the same revision).
        assert got[step] == pytest.approx(losses, rel=1e-5, abs=1e-8), (step, json.dumps(got))


# ---------------------------------------------------------------------------------------------------------
# One run folder, whatever runs it


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _metric_names(root: Path) -> set[str]:
    return {k for line in (root / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}


def test_a_local_run_and_a_two_worker_ray_run_write_the_same_folder(ray_cluster, disk, tmp_path):
    from flexkd.runs import distil
    from tuning.ray_train import fit

    common = [
        f"teacher.path={disk['teacher_cls']}",
        f"scaling.storage_path={tmp_path / 'ray'}",
        "train.steps=8",
        "train.log_every=2",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "eval.max_examples=32",
        "scoring.num_examples=32",
        "data.max_train_examples=128",
    ]
    local = load_config("demo", [*common, f"run.output_dir={tmp_path / 'local'}"])
    ray = load_config("demo", [*common, f"run.output_dir={tmp_path / 'ray_run'}", "scaling.num_workers=2"])
    distil(local, quiet=True)
    fit(ray, quiet=True)
    a, b = Path(local.run.output_dir), Path(ray.run.output_dir)
    assert _tree(a) == _tree(b) and "checkpoints/latest/trainer_state.pt" in _tree(a)
    assert _metric_names(a) == _metric_names(b) and "val/accuracy" in _metric_names(a)

    def events(root):
        return [json.loads(line)["event"] for line in (root / "events.jsonl").read_text().splitlines()]

    # The same events, plus the Ray run's own name (what --resume continues).
    facts = ["scored_s", "datasets", "examples", "teacher_source", "teacher_loads"]
    assert events(a) == [*facts, "checkpoint", "checkpoint"]
    assert events(b) == ["ray_run", *facts, "checkpoint", "checkpoint"]
