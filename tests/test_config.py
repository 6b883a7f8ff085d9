"""Config: presets, overrides, the key vocabulary, and clear one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from flexkd.checks import preflight
from flexkd.config import (
    Config,
    ConfigError,
    dump_yaml,
    from_dict,
    key_docs,
    load_config,
    preset_names,
    to_dict,
    valid_keys,
)
from flexkd.dotted import flatten
from flexkd.layermap import resolve_layer_map


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    # The resolved YAML loads back to the same config: `flexkd train config.yaml` reruns a run.
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)


def test_the_demo_presets_pass_the_file_checks_too():
    for name in ("demo", "demo-instruct"):
        plan = preflight(load_config(name))
        assert plan.k == plan.student.hidden and plan.layer_map == [
            (plan.teacher.layers, plan.student.layers)
        ]


def test_overrides_use_the_dotted_vocabulary_and_coerce_types():
    cfg = load_config(
        "demo",
        [
            "optim.lr=1e-3",
            "selection.k=8",
            "kd.loss=jsd",
            "feature.layers=uniform:2",
            "student.arch.hidden_size=48",
            "scaling.use_gpu=true",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML reads 1e-3 as a string
    assert cfg.selection.k == 8 and cfg.kd.loss == "jsd" and cfg.feature.layers == "uniform:2"
    assert cfg.student.arch["hidden_size"] == 48 and cfg.student.arch["num_hidden_layers"] == 2
    assert cfg.scaling.use_gpu is True
    assert flatten(to_dict(cfg))["student.arch.hidden_size"] == 48


def test_every_key_has_a_docstring():
    docs = key_docs()
    assert set(docs) == set(valid_keys())
    assert all(docs.values()), [k for k, v in docs.items() if not v]


def test_layer_maps():
    assert resolve_layer_map("last", 12, 6) == [(12, 6)]
    assert resolve_layer_map("uniform:3", 12, 6) == [(4, 2), (8, 4), (12, 6)]
    assert resolve_layer_map("6:3,-1:-1", 12, 6) == [(6, 3), (12, 6)]
    assert resolve_layer_map([[0, 0], [-2, -2]], 4, 2) == [(0, 0), (3, 1)]


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: each fails with one line that names the key or the file.


def bad_inputs(disk):
    student_other = [f"student.path={disk['student_other_tok']}", "student.arch="]
    return {
        "unknown key": (
            ["selection.kk=3"],
            "selection.kk: unknown key; valid keys here are selection.strategy, selection.k",
        ),
        "unknown group": (["optimizer.lr=1"], "optimizer: unknown key"),
        "k too large": (["selection.k=1000"], "selection.k: 1000 is out of range"),
        "layer out of range": (["feature.layers=9:1"], "feature.layers: teacher layer 9 is out of range"),
        "tokenizer mismatch": (student_other, "student.path: the teacher"),
        "missing column": (
            [f"data.source={disk['reviews']}", "data.val_split=", "data.test_split="],
            "data.columns.text: column 'text' is not in",
        ),
        "unknown loss": (
            ["kd.loss=kl"],
            "kd.loss: unknown value 'kl'; choose one of fkl, rkl, skl, srkl, jsd, none",
        ),
        "unknown feature loss": (["feature.loss=cosine"], "feature.loss: unknown value 'cosine'"),
        "negative weight": (["feature.weight=-1"], "feature.weight: must be >= 0"),
        "empty dataset": (
            [f"data.source={disk['empty']}", "data.val_split=", "data.test_split="],
            "is empty (no rows)",
        ),
        "missing teacher": (
            ["teacher.path=/nonexistent/teacher", "teacher.auto_prepare=false"],
            "teacher.path: /nonexistent/teacher does not exist",
        ),
        "missing student": (["student.path=./no/such/student", "student.arch="], "student.path:"),
        "scoring set < batch": (
            ["scoring.num_examples=4", "scoring.batch_size=8"],
            "scoring.num_examples: 4 is smaller than one scoring batch",
        ),
        "tiny dataset": (
            [
                f"data.source={disk['tiny_rows']}",
                "data.val_split=",
                "data.test_split=",
                "data.val_size=1",
                "scoring.batch_size=8",
            ],
            "scoring.batch_size: the scoring set has 4 examples",
        ),
        "bad number": (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
        "bad batch split": (
            ["train.batch_size=30", "train.grad_accum=4"],
            "train.batch_size: 30 does not split",
        ),
        "relative storage": (["scaling.storage_path=runs/ray"], "scaling.storage_path:"),
        "response tokens for classification": (["feature.tokens=response"], "feature.tokens:"),
    }


@pytest.fixture(scope="module")
def demo_teacher_on_disk(disk):
    return [f"teacher.path={disk['teacher_cls']}"]


@pytest.mark.parametrize(
    "case", list(bad_inputs({k: "x" for k in ("student_other_tok", "reviews", "empty", "tiny_rows")}))
)
def test_bad_input_fails_with_one_line_naming_the_key(case, disk, demo_teacher_on_disk):
    overrides, expected = bad_inputs(disk)[case]
    with pytest.raises(ConfigError) as err:
        preflight(load_config("demo", demo_teacher_on_disk + overrides))
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_tokenizer_mismatch_in_a_generation_task_names_the_vocabulary(disk):
    with pytest.raises(ConfigError, match="needs one vocabulary"):
        preflight(
            load_config(
                "demo-instruct",
                [
                    f"teacher.path={disk['teacher_lm']}",
                    f"student.path={disk['student_other_tok']}",
                    "student.arch=",
                ],
            )
        )


def test_cli_prints_one_error_line_and_exits_2_quickly(disk):
    # Only the config module is imported before the error: no torch, no transformers, no Ray.
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.cli", "train", "demo", "selection.kk=3"],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flexkd: error: selection.kk: unknown key"), proc.stderr
    print(f"CLI config error in {elapsed:.2f}s")  # shown with -s; timing is reported, never asserted


def test_cli_unknown_preset_lists_the_presets():
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.cli", "show", "nosuch"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "nosuch: no such config file or preset; presets are" in proc.stderr
    assert "demo" in proc.stderr


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="teacher.path: empty"):
        from_dict({"teacher": {"path": ""}, "student": {"arch": {"hidden_size": 8}}})
