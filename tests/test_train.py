"""The loop end to end on tiny models: artifacts, every loss variant, generation, resume, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from flexkd import artifacts, demo
from flexkd.config import load_config
from flexkd.data import load_task_data, unseen_rows
from flexkd.models import freeze, load_teacher
from flexkd.runs import distil
from flexkd.selection import load_selection
from flexkd.train import train
from tuning.cli import main

from .fixtures import save_model

FAST = [
    "train.steps=12",
    "train.log_every=4",
    "train.eval_every=6",
    "eval.max_examples=48",
    "scoring.num_examples=32",
    "data.max_train_examples=256",
]


def demo_cfg(disk, tmp_path, *extra, preset="demo"):
    teacher = disk["teacher_cls"] if preset == "demo" else disk["teacher_lm"]
    return load_config(
        preset, [f"teacher.path={teacher}", f"run.output_dir={tmp_path / 'run'}", *FAST, *extra]
    )


def test_distil_writes_every_artifact(disk, tmp_path):
    cfg = demo_cfg(disk, tmp_path)
    metrics = distil(cfg, quiet=True)
    out = Path(cfg.run.output_dir)
    # The student is a complete Hugging Face folder.
    student = AutoModelForSequenceClassification.from_pretrained(out / artifacts.STUDENT)
    assert student.config.hidden_size == 32 and (out / artifacts.STUDENT / "tokenizer.json").exists()
    # selection.json in its documented format.
    layers, meta = load_selection(out / artifacts.SELECTION)
    assert meta["method"] == "grad" and meta["strategy"] == "gradient" and meta["scoring_batch_size"] == 8
    (sel,) = layers
    assert (sel.teacher_layer, sel.student_layer, sel.k) == (2, 2, 32)
    assert sel.indices == sorted(sel.indices) and len(set(sel.indices)) == 32
    assert len(sel.scores) == 32 and sel.token_count > 0  # teacher hidden is 32 here
    # The resolved config reruns as it is; final metrics; per-report history with increasing steps.
    assert load_config(str(out / artifacts.CONFIG)) == cfg
    final = json.loads((out / artifacts.METRICS).read_text())
    assert final == metrics and final["step"] == 12
    assert (
        0 <= final["val/accuracy"] <= 1 and 0 <= final["test/macro_f1"] <= 1 and final["val/examples"] == 48
    )
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history]
    assert steps == [4, 6, 8, 12] and all(b > a for a, b in zip(steps, steps[1:]))
    assert {"train/loss_task", "train/loss_kd", "train/loss_feat", "perf/tokens_per_s"} <= set(history[0])
    assert not (
        out / artifacts.TRAINER_STATE
    ).exists()  # the export leaves the optimizer state in checkpoints/


@pytest.mark.parametrize(
    "feature,kd",
    [
        ("pearson", "fkl"),
        ("mse_std", "rkl"),
        ("projector", "skl"),
        ("none", "jsd"),
        ("none", "none"),
        ("pearson", "srkl"),
    ],
)
def test_every_method_trains_with_finite_losses(disk, tmp_path, feature, kd):
    cfg = demo_cfg(
        disk, tmp_path, f"feature.loss={feature}", f"kd.loss={kd}", "train.steps=6", "train.eval_every=0"
    )
    metrics = distil(cfg, quiet=True)
    out = Path(cfg.run.output_dir)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (out / artifacts.PROJECTOR).exists() == (feature == "projector")
    assert (out / artifacts.SELECTION).exists() == (feature in ("pearson", "mse_std"))
    if feature == "projector":
        # The projector is not part of the student: the student folder has the plain architecture.
        state = torch.load(out / artifacts.PROJECTOR)
        assert state["0.weight"].shape == (32, 32)
        names = (
            AutoModelForSequenceClassification.from_pretrained(out / artifacts.STUDENT).state_dict().keys()
        )
        assert not any("projector" in n for n in names)


def test_instruction_task_decodes_and_scores_rouge(disk, tmp_path):
    cfg = demo_cfg(
        disk,
        tmp_path,
        "eval.max_examples=16",
        "eval.max_new_tokens=6",
        "student.arch.hidden_size=16",
        preset="demo-instruct",
    )
    metrics = distil(cfg, quiet=True)
    assert 0 <= metrics["val/rouge_l"] <= 1 and 0 <= metrics["val/exact_match"] <= 1
    assert metrics["val/examples"] == 16
    # Per-token calibration at the response positions, against a loop over the rows one at a time (no padding).
    from flexkd.data import IGNORE, encode, load_task_data
    from flexkd.evaluation import calibration_sums, expected_calibration_error
    from flexkd.models import load_pretrained, load_tokenizer

    folder = Path(cfg.run.output_dir, artifacts.STUDENT)
    data = load_task_data(cfg.data)
    tok = load_tokenizer(folder, cfg.data.task)
    model = load_pretrained(folder, cfg.data.task, data.label_names, tok).eval()
    hits, confidences, sums = [], [], 0
    for row in data.val[:16]:
        ex = encode(row, tok, cfg.data, data.label_names)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double()
        for position, label in enumerate(ex["labels"]):
            if label != IGNORE:
                probs = torch.softmax(logits[position], -1)
                confidences.append(float(probs.max()))
                hits.append(float(int(probs.argmax()) == label))
        at = torch.tensor(ex["labels"]) != IGNORE
        sums = sums + calibration_sums(logits[at], torch.tensor(ex["labels"])[at])
    assert hits
    assert metrics["val/token_accuracy"] == pytest.approx(sum(hits) / len(hits), abs=1e-9)
    assert metrics["val/confidence"] == pytest.approx(sum(confidences) / len(confidences), abs=1e-5)
    assert metrics["val/ece"] == pytest.approx(expected_calibration_error(sums), abs=1e-5)
    layers, _ = load_selection(Path(cfg.run.output_dir, artifacts.SELECTION))
    assert layers[0].k == 16  # the student's hidden size


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(disk, tmp_path):
    cfg = demo_cfg(disk, tmp_path, "train.checkpoint_every=6", "train.eval_every=0")
    kept = {}

    def report(metrics, step, checkpoint=None):
        if checkpoint:
            kept[step] = shutil.move(checkpoint, tmp_path / f"ckpt{step}")

    full = train(cfg, report)
    resumed_reports = []
    again = train(cfg, lambda m, s, c=None: resumed_reports.append(s), resume_from=str(kept[6]))
    assert resumed_reports[0] > 6  # nothing before the checkpoint is redone
    for key in ("train/loss", "val/accuracy", "val/loss"):
        assert again[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
    # The selection came from the checkpoint, not a new scoring pass.
    assert (
        load_selection(kept[6] / artifacts.SELECTION)[0] == load_selection(kept[12] / artifacts.SELECTION)[0]
    )


def test_teacher_is_frozen_and_never_changes(disk, tmp_path):
    cfg = demo_cfg(disk, tmp_path)
    teacher = load_teacher(cfg, demo.build_tokenizer("classification"), demo.LABELS)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distil(cfg, quiet=True)
    after = load_teacher(cfg, demo.build_tokenizer("classification"), demo.LABELS).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert freeze(torch.nn.Linear(2, 2)).weight.requires_grad is False


def test_teacher_and_student_with_different_ids_but_the_same_splits(disk, tmp_path):
    """Like MPNet -> BERT: one WordPiece split, ids shifted. Classification distils position by position."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = demo.vocabulary()
    shifted = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + words)}
    raw = Tokenizer(models.WordLevel(vocab=shifted, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="[UNK]", cls_token="<s>", sep_token="</s>"
    )
    teacher_dir = save_model(
        tmp_path / "shifted_teacher", "classification", hidden=32, layers=2, tokenizer=tok
    )
    cfg = load_config(
        "demo",
        [
            f"teacher.path={teacher_dir}",
            f"student.path={disk['student_cls']}",
            "student.arch=",
            f"run.output_dir={tmp_path / 'run'}",
            *FAST,
        ],
    )
    metrics = distil(cfg, quiet=True)
    assert torch.isfinite(torch.tensor(metrics["train/loss_feat"]))


def test_cli_teacher_train_score_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["teacher.steps=8", "teacher.batch_size=16", *FAST]
    assert main(["teacher", "demo", *small, "--quiet"]) == 0
    teacher_dir = tmp_path / "flexkd-runs" / "teachers" / "demo-classification"
    assert (teacher_dir / "config.json").exists() and (teacher_dir / "tokenizer.json").exists()
    assert "val/accuracy" in json.loads((teacher_dir / artifacts.METRICS).read_text())
    curve = [json.loads(line) for line in (teacher_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == sorted({r["step"] for r in curve}) and curve[-1]["step"] == 8
    assert not (teacher_dir.parent / "demo-classification.partial").exists()

    assert main(["score", "demo", *small, "run.output_dir=./scored", "scoring.method=fisher"]) == 0
    doc = json.loads((tmp_path / "scored" / "selection.json").read_text())
    assert doc["format"] == 1 and doc["method"] == "fisher"
    assert set(doc["layers"][0]) == {
        "teacher_layer",
        "student_layer",
        "method",
        "strategy",
        "k",
        "indices",
        "scores",
        "token_count",
    }
    assert not (tmp_path / "scored" / "student").exists()  # score writes selection.json only

    assert main(["train", "demo", *small, "--quiet"]) == 0
    capsys.readouterr()
    assert (
        main(
            ["eval", "demo", "--model", "flexkd-runs/demo/student", "--split", "test", "eval.max_examples=40"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["test/examples"] == 40 and 0 <= result["test/accuracy"] <= 1
    # test-unseen: the test rows whose text no training row has, under their own metric names.
    assert main(["eval", "demo", "--model", "flexkd-runs/demo/student", "--split", "test-unseen"]) == 0
    unseen = json.loads(capsys.readouterr().out)
    data = load_task_data(load_config("demo", []).data)
    assert unseen["test_unseen/examples"] == len(unseen_rows(data.test, data.train, "classification"))
    assert 0 <= unseen["test_unseen/accuracy"] <= 1


def test_a_second_run_with_the_same_scoring_settings_does_not_rescore(disk, tmp_path):
    from flexkd.scorecache import ScoreCache

    cache = ScoreCache(str(tmp_path / "cache"))
    cfg = demo_cfg(disk, tmp_path, "train.steps=4", "train.eval_every=0")
    events = []
    report = lambda m, s, c=None: events.extend(k for k in m if k.startswith("event/scor"))  # noqa: E731
    train(cfg, report, score_cache=cache)
    # Another trial: other loss weights and learning rate, same teacher and scoring settings.
    other = demo_cfg(
        disk,
        tmp_path,
        "train.steps=4",
        "train.eval_every=0",
        "kd.weight=0.3",
        "optim.lr=1e-3",
        "selection.strategy=variance",
    )
    train(other, report, score_cache=cache)
    assert events == ["event/scored_s", "event/scores_cached"]
    assert (cache.hits, cache.misses) == (1, 1)
    train(demo_cfg(disk, tmp_path, "train.steps=4", "scoring.batch_size=4"), report, score_cache=cache)
    assert events[-1] == "event/scored_s" and cache.misses == 2
