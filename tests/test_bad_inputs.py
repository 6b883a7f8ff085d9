"""Bad inputs, run as a user runs them: `flexkd ...` in a fresh process, in a folder holding only the inputs.

Each must end with exit code 2 and one line on stderr naming the key or the file (and the line of a data
file), no traceback, and nothing written: no ./flexkd-runs, no mlflow.db. The checks run before torch, Ray
or MLflow is imported, so each case takes a fraction of a second (printed with -s, never asserted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexkd.config import read_config_dict


def jsonl(rows: list[dict], bad_line: int = 0) -> str:
    lines = [json.dumps(r) for r in rows]
    if bad_line:
        lines[bad_line - 1] = '{"text": "cut off", "label": '
    return "".join(line + "\n" for line in lines)


def reviews(n: int = 600, labels=(0, 1)) -> list[dict]:
    return [{"text": f"review number {i} was good", "label": labels[i % len(labels)]} for i in range(n)]


def with_row(row: dict, at: int = 10) -> str:
    rows = reviews()
    return jsonl(rows[:at] + [row] + rows[at:])


# A local JSON-lines file as the whole data set (no named validation/test splits).
ONE_FILE = ["data.val_split=", "data.test_split=", "data.val_size=20"]
MODEL_CONFIG = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
CLASSIFIER = json.dumps({**MODEL_CONFIG, "num_labels": 2, "architectures": ["BertForSequenceClassification"]})
CAUSAL_LM = json.dumps({**MODEL_CONFIG, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def sweep_file(**fields) -> str:
    return json.dumps({"base": "demo", **fields})  # JSON is YAML


# (id, input files {relative path: text}, argv, fragments the one error line must contain)
CASES = [
    # --- numbers that cannot train --------------------------------------------------------------------
    ("steps inf", {}, ["train", "demo", "train.steps=inf"], ["train.steps:"]),
    ("steps nan", {}, ["train", "demo", "train.steps=nan"], ["train.steps:"]),
    ("steps 0", {}, ["train", "demo", "train.steps=0"], ["train.steps:"]),
    ("steps -1", {}, ["train", "demo", "train.steps=-1"], ["train.steps:"]),
    ("lr nan", {}, ["train", "demo", "optim.lr=nan"], ["optim.lr:"]),
    ("lr 0", {}, ["train", "demo", "optim.lr=0"], ["optim.lr:", "> 0"]),
    ("lr -1", {}, ["train", "demo", "optim.lr=-1"], ["optim.lr:"]),
    ("lr inf", {}, ["train", "demo", "optim.lr=inf"], ["optim.lr:"]),
    ("teacher lr 0", {}, ["teacher", "demo", "teacher.lr=0"], ["teacher.lr:"]),
    ("kd weight inf", {}, ["train", "demo", "kd.weight=inf"], ["kd.weight:"]),
    ("feature weight .inf", {}, ["train", "demo", "feature.weight=.inf"], ["feature.weight:"]),
    ("task weight nan", {}, ["train", "demo", "task.weight=nan"], ["task.weight:"]),
    ("temperature nan", {}, ["train", "demo", "kd.temperature=nan"], ["kd.temperature:"]),
    ("max_gb inf", {}, ["train", "demo", "signals.max_gb=inf"], ["signals.max_gb:"]),
    # --- data files ---------------------------------------------------------------------------------
    *[
        (
            f"bad JSON line {n}",
            {"d.jsonl": jsonl(reviews(), bad_line=n)},
            ["train", "demo", "data.source=d.jsonl", *ONE_FILE],
            [f"d.jsonl:{n}:", "not valid JSON"],
        )
        for n in (1, 5, 500)
    ],
    (
        "JSON line not an object",
        {"d.jsonl": jsonl(reviews()) + "[1, 2]\n"},
        ["train", "demo", "data.source=d.jsonl", *ONE_FILE],
        ["d.jsonl:601:", "expected a JSON object"],
    ),
    (
        "missing column",
        {"d.jsonl": jsonl([{"review": "x", "label": 0}] * 50)},
        ["train", "demo", "data.source=d.jsonl", *ONE_FILE],
        ["data.columns.text:", "'text'", "d.jsonl"],
    ),
    (
        "row without a label",
        {"d.jsonl": with_row({"text": "no label here"})},
        ["train", "demo", "data.source=d.jsonl", *ONE_FILE],
        ["data.columns.label:", "d.jsonl:11:"],
    ),
    (
        "validation label not in train",
        {"f/train.jsonl": jsonl(reviews()), "f/validation.jsonl": jsonl([{"text": "v", "label": 7}])},
        ["train", "demo", "data.source=f", "data.val_split=validation", "data.test_split="],
        ["data.columns.label:", "validation.jsonl:1:", "label 7"],
    ),
    (
        "test label not in train",
        {
            "f/train.jsonl": jsonl(reviews(labels=("pos", "neg"))),
            "f/test.jsonl": jsonl(reviews(30, labels=("pos", "meh"))),
        },
        ["train", "demo", "data.source=f", "data.val_split=", "data.test_split=test"],
        ["data.columns.label:", "test.jsonl:2:", "'meh'"],
    ),
    (
        "negative label",
        {"d.jsonl": with_row({"text": "n", "label": -1})},
        ["train", "demo", "data.source=d.jsonl", *ONE_FILE],
        ["data.columns.label:", "d.jsonl:11:", "negative"],
    ),
    (
        "mixed string and int labels",
        {"d.jsonl": with_row({"text": "n", "label": "pos"})},
        ["train", "demo", "data.source=d.jsonl", *ONE_FILE],
        ["data.columns.label:", "d.jsonl:1)", "d.jsonl:11)"],
    ),
    (
        "labels unlike the teacher's",
        {"d.jsonl": jsonl(reviews(labels=(0, 1, 2))), "teacher/config.json": CLASSIFIER},
        ["train", "demo", "data.source=d.jsonl", "teacher.path=teacher", *ONE_FILE],
        ["teacher.path:", "2 labels", "the data has 3"],
    ),
    # --- config files -------------------------------------------------------------------------------
    (
        "extends cycle",
        {"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"},
        ["train", "a.yaml"],
        ["a.yaml", "b.yaml", "cycle"],
    ),
    (
        "extends a missing file, relative to the including file",
        {"sub/child.yaml": "extends: base.yaml\n", "base.yaml": "extends: demo\n"},
        ["train", "sub/child.yaml"],
        ["base.yaml: no such config file", "sub"],
    ),
    (
        "extends not a string",
        {"a.yaml": "extends: [demo]\n"},
        ["train", "a.yaml"],
        ["a.yaml: extends:"],
    ),
    # --- architectures ------------------------------------------------------------------------------
    (
        "student heads do not divide hidden",
        {},
        ["train", "demo", "student.arch.num_attention_heads=3"],
        ["student.arch.num_attention_heads:", "32"],
    ),
    (
        "teacher heads do not divide hidden",
        {},
        ["teacher", "demo", "teacher.arch.num_attention_heads=5"],
        ["teacher.arch.num_attention_heads:", "64"],
    ),
    (
        "kv heads do not divide heads",
        {},
        ["train", "demo-instruct", "student.arch.num_key_value_heads=3"],
        ["student.arch.num_key_value_heads:"],
    ),
    # --- generation-only settings -------------------------------------------------------------------
    (
        "response length leaves no prompt",
        {},
        ["train", "demo-instruct", "data.max_response_length=63"],
        ["data.max_response_length:"],
    ),
    (
        "response tokens on classification",
        {},
        ["train", "demo", "feature.loss=projector", "feature.tokens=response"],
        ["feature.tokens:"],
    ),
    # --- output paths -------------------------------------------------------------------------------
    ("run name ../../x", {}, ["train", "demo", "run.name=../../x"], ["run.name:"]),
    ("run name a/b", {}, ["train", "demo", "run.name=a/b"], ["run.name:"]),
    ("run name absolute", {}, ["train", "demo", "run.name=/tmp/x"], ["run.name:"]),
    ("run name ..", {}, ["train", "demo", "run.name=.."], ["run.name:"]),
    (
        "output folder under a file",
        {"out": "a file\n"},
        ["train", "demo", "run.output_dir=out/run"],
        ["run.output_dir:", "is a file"],
    ),
    (
        "read-only output folder",
        {"ro/.keep": ""},
        ["train", "demo", "run.output_dir=ro/run"],
        ["run.output_dir:", "not writable"],
    ),
    # --- sweep files --------------------------------------------------------------------------------
    ("sweep file is a list", {"s.yaml": "- base: demo\n"}, ["sweep", "s.yaml"], ["s.yaml:"]),
    (
        "bundle not a mapping",
        {"s.yaml": sweep_file(space={"method": {"bundles": {"sft": "none", "kd": {"kd.loss": "fkl"}}}})},
        ["sweep", "s.yaml"],
        ["space.method.bundles.sft:"],
    ),
    ("sweep name ../x", {"s.yaml": sweep_file(name="../x")}, ["sweep", "s.yaml"], ["name:", "'../x'"]),
    ("sweep name a/b", {"s.yaml": sweep_file()}, ["sweep", "s.yaml", "name=a/b"], ["name:"]),
    (
        "concurrency over the CPUs",
        {"s.yaml": sweep_file(concurrency=100000)},
        ["sweep", "s.yaml"],
        ["concurrency:"],
    ),
    (
        "cpus_per_trial over the CPUs",
        {"s.yaml": sweep_file(resources={"cpus_per_trial": 100000})},
        ["sweep", "s.yaml"],
        ["resources.cpus_per_trial:"],
    ),
    (
        "workers over the CPUs",
        {"s.yaml": sweep_file(overrides=["scaling.num_workers=1", "scaling.cpus_per_worker=100000"])},
        ["sweep", "s.yaml"],
        ["scaling.num_workers:"],
    ),
    (
        "space value over the CPUs",
        {
            "s.yaml": sweep_file(
                space={"scaling.cpus_per_worker": {"choice": [1, 100000]}},
                overrides=["scaling.num_workers=1"],
            )
        },
        ["sweep", "s.yaml"],
        ["space.scaling.cpus_per_worker:", "scaling.num_workers:"],
    ),
    (
        "sweep with a bad data file",
        {"s.yaml": sweep_file(overrides=["data.source=d.jsonl", *ONE_FILE]), "d.jsonl": jsonl(reviews(), 5)},
        ["sweep", "s.yaml"],
        ["d.jsonl:5:"],
    ),
    (
        "sweep base relative to the sweep file",
        {
            "sub/s.yaml": json.dumps({"base": "run.yaml"}),
            "sub/run.yaml": "extends: demo\ntrain: {steps: 0}\n",
        },
        ["sweep", "sub/s.yaml", "--dry-run"],
        ["train.steps:"],
    ),
    # --- eval ---------------------------------------------------------------------------------------
    ("eval missing model", {}, ["eval", "demo", "--model", "nosuch"], ["--model:", "nosuch"]),
    (
        "eval folder without config.json",
        {"m/weights.bin": ""},
        ["eval", "demo", "--model", "m"],
        ["--model:", "no config.json"],
    ),
    (
        "eval classifier on generation",
        {"m/config.json": CLASSIFIER},
        ["eval", "demo-instruct", "--model", "m"],
        ["--model:", "BertForSequenceClassification"],
    ),
    (
        "eval causal LM on classification",
        {"m/config.json": CAUSAL_LM},
        ["eval", "demo", "--model", "m"],
        ["--model:", "LlamaForCausalLM"],
    ),
    (
        "eval classifier with other labels",
        {"m/config.json": CLASSIFIER, "d.jsonl": jsonl(reviews(labels=(0, 1, 2)))},
        ["eval", "demo", "--model", "m", "data.source=d.jsonl", *ONE_FILE],
        ["--model:", "2 labels"],
    ),
]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_in_one_line_before_anything_is_written(case, tmp_path):
    name, inputs, argv, fragments = case
    for rel, text in inputs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    if name == "read-only output folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").chmod(0o555)
    before = files_under(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,  # a case that passes the checks would train: fail it instead of waiting
    )
    elapsed = time.perf_counter() - start
    print(f"{name}: exit {proc.returncode} in {elapsed:.2f}s: {proc.stderr.strip()}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("flexkd: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if name == "read-only output folder":
        (tmp_path / "ro").chmod(0o755)
    assert files_under(tmp_path) == before  # no flexkd-runs/, no mlflow.db, nothing half-written


def test_checks_import_no_torch_ray_or_mlflow():
    code = (
        "import sys, flexkd.config, flexkd.checks, flexkd.data, tuning.space, tuning.cli; "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_extends_is_relative_to_the_including_file(tmp_path, monkeypatch):
    (tmp_path / "presets" / "more").mkdir(parents=True)
    (tmp_path / "presets" / "base.yaml").write_text(
        "extends: demo\nrun: {name: from-base}\ntrain: {steps: 7}\n"
    )
    (tmp_path / "presets" / "more" / "child.yaml").write_text("extends: ../base.yaml\nrun: {name: child}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "base.yaml").write_text("train: {steps: 99}\n")  # a same-named file in the working directory
    monkeypatch.chdir(elsewhere)
    data = read_config_dict(str(tmp_path / "presets" / "more" / "child.yaml"))
    assert data["run"]["name"] == "child" and data["train"]["steps"] == 7
    assert data["data"]["source"] == "demo"  # the preset at the root of the chain


def test_heads_of_a_fresh_student_follow_its_hidden_size():
    """Without num_attention_heads, the teacher's head width is kept and heads divide the hidden size."""
    from flexkd.checks import arch_heads

    teacher = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16}
    assert arch_heads({"hidden_size": 32}, teacher, "student.arch") == {
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    assert arch_heads({"hidden_size": 40}, teacher, "student.arch")["num_attention_heads"] == 2
    assert arch_heads({"hidden_size": 256}, {}, "teacher.arch") == {"num_attention_heads": 4}  # width 64
    assert arch_heads({"hidden_size": 32, "num_attention_heads": 8}, teacher, "s")["head_dim"] == 4
    assert arch_heads({}, teacher, "student.arch") == {}  # hidden size and heads both the teacher's
