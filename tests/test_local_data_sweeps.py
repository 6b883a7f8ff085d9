"""Sweeps on a user's own files: every local format, as one file and as a folder of split files, records its
datasets in MLflow and registers a champion; and every MLflow name the project imports exists."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest
import yaml

from flexkd import demo
from tuning import registry, tracking

ROOT = Path(__file__).resolve().parents[1]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """``rows`` as ``path`` in the format its suffix names (jsonl, csv or parquet), written by ``datasets``."""
    from datasets import Dataset

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        Dataset.from_list(rows).to_parquet(str(path))
    return path


def local_source(root: Path, fmt: str, layout: str) -> tuple[Path, dict[str, Path]]:
    """A demo-task source in ``fmt``: one train file (``layout='file'``) or a folder of train, validation and
    test files. Returns the source and the file each recorded context must name."""
    rows = {split: demo.make_split(split, "classification") for split in ("train", "validation", "test")}
    if layout == "file":
        path = write_rows(root / f"reviews.{fmt}", rows["train"][:300])
        return path, {"train": path, "validation": path, "test": path}
    folder = root / "reviews"
    folder.mkdir()
    files = {
        "train": write_rows(folder / f"train.{fmt}", rows["train"][:300]),
        "validation": write_rows(folder / f"validation.{fmt}", rows["validation"][:40]),
        "test": write_rows(folder / f"test.{fmt}", rows["test"][:40]),
    }
    return folder, files


@pytest.mark.parametrize(
    "fmt,layout",
    [
        ("jsonl", "file"),
        ("jsonl", "folder"),
        ("csv", "file"),
        ("csv", "folder"),
        ("parquet", "file"),
        ("parquet", "folder"),
    ],
)
def test_a_sweep_on_local_files_records_its_datasets_and_registers_a_champion(
    ray_cluster, disk, tmp_path, monkeypatch, fmt, layout
):
    from tuning.space import load_sweep
    from tuning.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    source, files = local_source(tmp_path, fmt, layout)
    path = tmp_path / "local.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": "demo",
                "overrides": [
                    f"teacher.path={disk['teacher_cls']}",
                    f"data.source={source}",
                    "data.val_split=",
                    "data.test_split=",
                    "data.val_size=40",
                    "data.test_size=40",
                    "train.steps=6",
                    "train.eval_every=6",
                    "train.log_every=3",
                    "eval.max_examples=32",
                    "scoring.num_examples=16",
                    "optim.warmup_steps=0",
                ],
                "space": {"optim.lr": {"choice": [0.003, 0.001]}},
                "start_points": [{"optim.lr": 0.003}, {"optim.lr": 0.001}],
                "trials": 2,
                "concurrency": 1,
                "scheduler": {"name": "none"},
                "tracking": {
                    "experiment": f"local-{fmt}-{layout}",
                    "register_as": "local-student",
                    "register_top": 1,
                },
            },
            sort_keys=False,
        )
    )
    spec, raw = load_sweep(str(path))
    summary = run_sweep(spec, raw, quiet=True)
    assert [r["status"] for r in summary["leaderboard"]] == ["completed", "completed"], summary["leaderboard"]

    uri = tracking.tracking_uri()
    client = tracking.client(uri)
    runs = tracking.children(uri, summary["parent_run_id"], summary["experiment_id"])
    assert len(runs) == 2
    for run in runs:
        recorded = {}
        for item in run.inputs.dataset_inputs:
            context = {t.key: t.value for t in item.tags}["mlflow.data.context"]
            recorded[context] = item.dataset
        assert set(recorded) == {"train", "validation", "test"}, run.inputs
        for context, dataset in recorded.items():
            assert dataset.source_type == "local"
            assert json.loads(dataset.source)["uri"] == str(files[context].resolve())
            assert dataset.name == f"{source.name}:{context}" and len(dataset.digest) == 36
    version = client.get_model_version_by_alias("local-student", registry.CHAMPION)
    assert version.run_id == summary["best"]["run_id"]


@pytest.mark.parametrize(
    "entry,source_type,where",
    [
        ({"source": "demo"}, "code", {"tags": {"generator": "flexkd.demo", "source": "demo"}}),
        ({"source": "s3://bucket/reviews/train.parquet"}, "s3", {"uri": "s3://bucket/reviews/train.parquet"}),
        ({"source": "gs://bucket/train.jsonl"}, "gs", {"uri": "gs://bucket/train.jsonl"}),
        ({"source": "https://example.org/train.csv"}, "http", {"url": "https://example.org/train.csv"}),
        ({"source": "stanfordnlp/imdb", "kind": "hub"}, "hugging_face", {"path": "stanfordnlp/imdb"}),
    ],
)
def test_every_kind_of_source_is_recorded_with_mlflows_public_dataset_sources(
    tmp_path, entry, source_type, where
):
    """The branches of ``log_datasets`` the local sweeps above do not take, on a real SQLite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run = client.create_run(client.create_experiment("datasets"))
    row = {"context": "train", "name": "x:train", "rows": 3, "digest": "ab" * 32, **entry}
    tracking.log_datasets(uri, run.info.run_id, [row])
    (item,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert item.dataset.source_type == source_type
    recorded = json.loads(item.dataset.source)
    assert {k: recorded[k] for k in where} == where
    assert {t.key: t.value for t in item.tags} == {"mlflow.data.context": "train", "flexkd.rows": "3"}


# ---------------------------------------------------------------------------------------------------------
# Every MLflow name the project uses exists in the installed MLflow


def mlflow_names() -> set[tuple[str, str | None, str]]:
    """(module, name or None, file:line) of every ``import mlflow...`` and ``from mlflow... import name`` in
    the project's Python files, read with ``ast`` (imports inside functions included: they are the lazy ones
    that only fail when their branch runs)."""
    found = set()
    for folder in ("flexkd", "tuning", "cluster", "benchmarks"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                where = f"{file.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
                    found.update((node.module, alias.name, where) for alias in node.names)
                elif isinstance(node, ast.Import):
                    found.update(
                        (a.name, None, where) for a in node.names if a.name.split(".")[0] == "mlflow"
                    )
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    chain = dotted(
                        node
                    )  # mlflow.artifacts.download_artifacts(...): a name used, not imported
                    if chain and chain[0] == "mlflow" and len(chain) > 1:
                        found.add((".".join(chain[:-1]), chain[-1], where))
    return found


def dotted(node: ast.AST) -> list[str] | None:
    """["mlflow", "pyfunc", "load_model"] for the expression ``mlflow.pyfunc.load_model``; None otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def resolve(dotted_name: str):
    """The module or object ``dotted_name`` names: imported where it is a module, else an attribute of one."""
    try:
        return importlib.import_module(dotted_name)
    except ImportError:
        if "." not in dotted_name:
            raise
        head, _, last = dotted_name.rpartition(".")
        return getattr(resolve(head), last)


def test_every_mlflow_name_the_project_imports_exists():
    names = mlflow_names()
    assert len({m for m, _, _ in names}) >= 10, names  # the walk found the project's imports
    missing = []
    for module, name, where in sorted(names, key=lambda n: n[2]):
        try:
            imported = resolve(module)
        except (ImportError, AttributeError) as err:
            missing.append(f"{where}: {module}: {err}")
            continue
        if name is not None and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")  # `from mlflow import pyfunc`: a submodule
            except ImportError:
                missing.append(f"{where}: {module} has no {name}")
    assert not missing, "\n".join(missing)
