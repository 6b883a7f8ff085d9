"""Data and config do what they say: a folder's own split files, the run's `data:` line, a fresh student's
tokenizer, the teacher fine-tune's own keys and validation, scoring progress, `show --check` before a
teacher exists."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from flexkd.checks import check_data, preflight
from flexkd.config import ConfigError, Data, load_config
from flexkd.data import describe_splits, load_task_data, origin_line

from .fixtures import other_tokenizer, write_jsonl


def rows(kind: str, n: int) -> list[dict]:
    return [{"text": f"{kind} review {i} was good", "label": i % 2} for i in range(n)]


@pytest.fixture
def folder(tmp_path):
    """train.jsonl (40 rows), validation.jsonl (5), test.jsonl (4): each file's rows say which file they are."""
    root = tmp_path / "data"
    root.mkdir()
    write_jsonl(root / "train.jsonl", rows("train", 40))
    write_jsonl(root / "validation.jsonl", rows("val", 5))
    write_jsonl(root / "test.jsonl", rows("test", 4))
    return root


def cli(*argv, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "tuning.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------------------
# A folder's own split files


def test_a_folders_validation_and_test_files_are_its_splits(folder):
    cfg = Data(source=str(folder), val_size=10, test_size=3)  # sizes apply to carving only
    data = load_task_data(cfg)
    assert data.val == rows("val", 5) and data.test == rows("test", 4)
    assert data.train.to_list() == rows("train", 40)  # nothing carved out of train
    line = origin_line(data.origins)
    assert line == (
        "data: train <- train.jsonl (40 rows), validation <- validation.jsonl (5 rows), test <- test.jsonl (4 rows)"
    )
    # The pre-flight checks say the same before anything loads.
    full = load_config("demo", [f"data.source={folder}", "data.val_split=", "data.test_split="])
    assert origin_line(check_data(full)[3]) == line
    records = {d["context"]: d for d in describe_splits(cfg, {"validation": data.val, "test": data.test})}
    assert records["validation"]["source"] == str(folder / "validation.jsonl")
    assert records["test"]["origin"] == "test.jsonl (4 rows)"


def test_a_split_without_a_file_is_carved_and_says_so(folder):
    (folder / "test.jsonl").unlink()
    (folder / "validation.jsonl").rename(folder / "dev.jsonl")  # an alias of validation
    data = load_task_data(Data(source=str(folder), val_size=10, test_size=6))
    assert data.val == rows("val", 5)
    assert len(data.test) == 6 and all(r["text"].startswith("train ") for r in data.test)
    assert len(data.train) == 34 and not {r["text"] for r in data.train} & {r["text"] for r in data.test}
    assert origin_line(data.origins) == (
        "data: train <- train.jsonl (34 of 40 rows), validation <- dev.jsonl (5 rows), "
        "test <- carved from train.jsonl (6 rows, data.test_size)"
    )


def test_an_explicit_split_key_wins_over_the_folders_file(folder):
    data = load_task_data(Data(source=str(folder), val_split="test"))
    assert data.val == rows("test", 4)
    assert data.origins["validation"] == "test.jsonl (4 rows)"
    # A single file is the train split only: validation is carved, as before.
    single = load_task_data(Data(source=str(folder / "train.jsonl"), val_size=8))
    assert len(single.val) == 8 and all(r["text"].startswith("train ") for r in single.val)
    assert single.origins["validation"] == "carved from train.jsonl (8 rows, data.val_size)"


@pytest.mark.parametrize(
    "file, text, fragment",
    [
        ("validation.jsonl", '{"body": "x", "label": 0}\n', "data.columns.text: column 'text' is not in"),
        ("test.jsonl", '{"text": "x", "label": 7}\n', "label 7 of the test split does not occur in train"),
    ],
)
def test_the_checks_read_the_folders_validation_and_test_files(folder, file, text, fragment):
    (folder / file).write_text(text)
    cfg = load_config("demo", [f"data.source={folder}", "data.val_split=", "data.test_split="])
    with pytest.raises(ConfigError, match=fragment) as err:
        check_data(cfg)
    assert file in str(err.value)


def test_train_prints_where_each_split_came_from_and_tests_on_the_test_file(folder, tmp_path):
    # SFT of a tiny fresh student: no teacher needed, two steps, evaluated at the end.
    proc = cli(
        "train",
        "demo",
        f"data.source={folder}",
        "data.val_split=",
        "data.test_split=",
        "kd.loss=none",
        "feature.loss=none",
        "teacher.auto_prepare=false",
        "student.arch.model_type=bert",
        "student.tokenizer=demo",  # no teacher exists: the fresh student's own tokenizer
        "student.arch.hidden_size=16",
        "student.arch.num_hidden_layers=1",
        "student.arch.intermediate_size=32",
        "train.steps=2",
        "train.batch_size=8",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "flexkd: data: train <- train.jsonl (40 rows), validation <- validation.jsonl (5 rows), "
        "test <- test.jsonl (4 rows)"
    ) in proc.stderr
    metrics = json.loads(proc.stdout)
    assert (metrics["val/examples"], metrics["test/examples"]) == (5, 4)


# ---------------------------------------------------------------------------------------------------------
# A fresh student's tokenizer


def test_student_tokenizer_is_used_for_a_fresh_student_and_checked(disk, tmp_path):
    from transformers import AutoConfig

    from flexkd.models import build_student, student_tokenizer, teacher_tokenizer
    from flexkd.workbench import open_tokenizers

    other = tmp_path / "other_tok"
    other_tokenizer().save_pretrained(other)
    cfg = load_config("demo", [f"teacher.path={disk['teacher_cls']}", f"student.tokenizer={other}"])
    tok = student_tokenizer(cfg, teacher_tokenizer(cfg))
    assert len(tok) == 9  # the other tokenizer's vocabulary, not the demo's
    student = build_student(cfg, tok, ["0", "1"], AutoConfig.from_pretrained(disk["teacher_cls"]))
    assert student.config.vocab_size == 9 and student.config.hidden_size == 32
    with pytest.raises(ConfigError, match=r"^student.tokenizer: .* split text differently"):
        preflight(cfg)
    # The teacher's own tokenizer, named as a folder: passes, and is encoded once (one tokenizer object).
    same = load_config(
        "demo", [f"teacher.path={disk['teacher_cls']}", f"student.tokenizer={disk['teacher_cls']}"]
    )
    preflight(same)
    tok_t, tok_s = open_tokenizers(same)
    assert tok_s is tok_t
    with pytest.raises(ConfigError, match="student.tokenizer: a pretrained student"):
        load_config(
            "demo", [f"student.path={disk['student_cls']}", "student.arch=", f"student.tokenizer={other}"]
        )


# ---------------------------------------------------------------------------------------------------------
# The teacher fine-tune's own keys


def test_the_teacher_recipe_takes_the_teacher_keys_not_the_students():
    from flexkd.runs import teacher_recipe

    cfg = load_config(
        "demo",
        [
            "optim.warmup_steps=99",
            "optim.schedule=constant",
            "data.max_length=40",
            "train.eval_every=7",
            "teacher.warmup_steps=3",
            "teacher.schedule=linear",
            "teacher.max_length=24",
            "teacher.eval_every=50",
        ],
    )
    recipe = teacher_recipe(cfg)
    assert (recipe.optim.warmup_steps, recipe.optim.schedule) == (3, "linear")
    assert (recipe.data.max_length, recipe.train.eval_every) == (24, 50)
    assert recipe.optim.lr == cfg.teacher.lr and recipe.train.steps == cfg.teacher.steps
    # Defaults: max length follows data.max_length; the shipped demo keeps the warm-up it always had.
    demo = teacher_recipe(load_config("demo"))
    assert (demo.optim.warmup_steps, demo.optim.schedule, demo.data.max_length) == (20, "cosine", 40)


def test_flexkd_teacher_reports_validation_as_it_trains(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", rows("train", 60))
    proc = cli(
        "teacher",
        "demo",
        "data.source=d.jsonl",
        "data.val_split=",
        "data.test_split=",
        "data.val_size=16",
        "teacher.path=./teacher",
        "teacher.arch.hidden_size=16",
        "teacher.arch.num_hidden_layers=1",
        "teacher.arch.num_attention_heads=2",
        "teacher.arch.intermediate_size=32",
        "teacher.steps=4",
        "teacher.batch_size=8",
        "teacher.eval_every=2",
        "teacher.warmup_steps=1",
        "teacher.max_length=16",
        "train.log_every=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert (
        "flexkd: data: train <- d.jsonl (44 of 60 rows), validation <- carved from d.jsonl (16 rows"
        in proc.stderr
    )
    step = {int(line.split()[1].split("/")[0]): line for line in lines if line.startswith("step ")}
    assert sorted(step) == [1, 2, 3, 4]
    assert "val_acc" in step[2] and "val_acc" in step[4]
    assert "val_acc" not in step[1] and "val_acc" not in step[3]
    recipe = yaml.safe_load((tmp_path / "teacher" / "flexkd_teacher.yaml").read_text())
    assert recipe["optim"]["warmup_steps"] == 1 and recipe["data"]["max_length"] == 16
    assert recipe["train"]["eval_every"] == 2


def test_every_teacher_key_is_documented_for_show_keys():
    from flexkd.config import key_docs

    docs = key_docs()
    for key in ("warmup_steps", "schedule", "max_length", "eval_every", "steps", "lr", "batch_size"):
        assert docs[f"teacher.{key}"].strip(), key
    assert "teacher" in docs["student.tokenizer"]


# ---------------------------------------------------------------------------------------------------------
# Scoring progress


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def flexkd_log():
    logger = logging.getLogger("flexkd")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_progress_lines_come_every_few_seconds_with_an_eta(flexkd_log):
    from flexkd.scorepass import ScoringProgress

    _, handler = flexkd_log
    times = iter([0.0, 1.0, 6.0, 7.0, 12.5, 13.0])
    progress = ScoringProgress(10, every_s=5.0, clock=lambda: next(times))
    for done in (1, 2, 3, 4, 10):  # the clock reads 1, 6, 7, 12.5, 13
        progress(done)
    # At 6s after 2 batches (3s each): 8 left, eta 24s; at 12.5s after 4: eta 19s; never on the last batch.
    assert handler.lines == [
        "scoring: 2/10 batches, 6s elapsed, eta 24s",
        "scoring: 4/10 batches, 12s elapsed, eta 19s",
    ]


def test_the_scoring_pass_prints_progress_and_is_quiet_when_asked(disk, flexkd_log, monkeypatch):
    from flexkd import scorepass
    from flexkd.workbench import open_workbench

    logger, handler = flexkd_log
    monkeypatch.setattr(scorepass, "PROGRESS_EVERY_S", 0.0)  # a line after every batch
    cfg = load_config(
        "demo",
        [
            f"teacher.path={disk['teacher_cls']}",
            "data.max_train_examples=48",
            "scoring.num_examples=16",
            "scoring.batch_size=4",
        ],
    )
    bench = open_workbench(cfg, need_teacher=True)
    first = scorepass.compute_scores(bench, [2])
    assert handler.lines[0] == "scoring 16 examples on teacher layers [2]: 4 batches of 4"
    assert [line.split(",")[0] for line in handler.lines[1:4]] == [
        f"scoring: {i}/4 batches" for i in (1, 2, 3)
    ]
    assert handler.lines[4].startswith("scored 16 examples")
    handler.lines.clear()
    logger.setLevel(logging.WARNING)  # what --quiet sets
    again = scorepass.compute_scores(bench, [2])
    assert handler.lines == []
    assert again.examples == first.examples == 16


# ---------------------------------------------------------------------------------------------------------
# show --check before the teacher exists


def test_show_check_before_the_teacher_exists_says_what_it_could_not_check(folder, tmp_path):
    proc = cli(
        "show",
        "demo",
        "--check",
        f"data.source={folder}",
        "data.val_split=",
        "data.test_split=",
        "teacher.path=./not-yet",
        "teacher.arch=",
        "teacher.tokenizer=",
        "teacher.auto_prepare=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = [line for line in proc.stdout.splitlines() if line.startswith("# ")]
    assert out[0].startswith("# checks passed: data, student hidden 32 x 2 layers")
    assert out[1].startswith(
        "# data: train <- train.jsonl (40 rows), validation <- validation.jsonl (5 rows)"
    )
    pending = next(line for line in out if line.startswith("# not checked until the teacher exists:"))
    for what in ("hidden size", "selection.k", "layer map", "label count"):
        assert what in pending
    assert any("does not exist yet" in line and "flexkd teacher" in line for line in out)
    # The same config still fails where the teacher is needed: `flexkd train` names it.
    assert (
        "teacher.path"
        in cli("train", "demo", "teacher.path=./not-yet", "teacher.auto_prepare=false", cwd=tmp_path).stderr
    )


def test_show_check_checks_a_teacher_to_be_made_against_its_recipe(tmp_path):
    proc = cli(
        "show", "demo", "--check", "teacher.path=./not-yet", "teacher.auto_prepare=false", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "# checks passed: teacher hidden 64 x 4 layers" in proc.stdout
    assert (
        "make it with `flexkd teacher demo teacher.path=./not-yet teacher.auto_prepare=false`" in proc.stdout
    )
    # A recipe that cannot work is still an error.
    bad = cli(
        "show", "demo", "--check", "teacher.path=./not-yet", "teacher.arch.hidden_size=30", cwd=tmp_path
    )
    assert bad.returncode == 2 and "teacher.arch.num_attention_heads" in bad.stderr
