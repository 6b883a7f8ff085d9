"""A real multi-objective sweep (local Ray, Optuna's multi-objective TPE, a real SQLite MLflow store): the
front flexkd reports is the brute-force non-dominated set of the child runs' metrics; front runs are tagged,
registered with their objective values and aliased pareto-<k>; each front member's config reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flexkd.config import ConfigError
from tuning import registry, tracking
from tuning.space import load_sweep

from .test_sweep import write_sweep

GOALS = [("val/loss", "min"), ("perf/student_params", "min")]


def non_dominated(points: dict[str, list[float]]) -> set[str]:
    """The obvious O(n^2) filter: keep a point unless another is >= on every objective and > on one."""
    keep = set()
    for a, pa in points.items():
        beaten = False
        for b, pb in points.items():
            if a == b:
                continue
            at_least = (pb[0] <= pa[0]) and (pb[1] <= pa[1])
            strictly = (pb[0] < pa[0]) or (pb[1] < pa[1])
            if at_least and strictly:
                beaten = True
        if not beaten:
            keep.add(a)
    return keep


def test_multi_objective_sweep_reports_registers_and_reruns_its_front(
    ray_cluster, disk, tmp_path, monkeypatch
):
    from tuning.cli import main
    from tuning.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    shapes = [(8, 1), (16, 1), (8, 2), (16, 2), (16, 2)]
    path = write_sweep(
        tmp_path / "front.yaml",
        base="demo",
        overrides=[
            f"teacher.path={disk['teacher_cls']}",
            "train.steps=40",
            "train.eval_every=10",
            "train.log_every=10",
            "optim.warmup_steps=0",
            "eval.max_examples=64",
            "data.max_train_examples=300",
            "scoring.num_examples=32",
        ],
        space={
            "student.arch.hidden_size": {"choice": [8, 16]},
            "student.arch.num_hidden_layers": {"choice": [1, 2]},
            "optim.lr": {"choice": [0.003, 0.0003]},
        },
        start_points=[
            {"student.arch.hidden_size": h, "student.arch.num_hidden_layers": n, "optim.lr": lr}
            for (h, n), lr in zip(shapes, [0.003, 0.003, 0.003, 0.003, 0.0003])
        ],
        objectives=[{"metric": m, "mode": mode} for m, mode in GOALS],
        sampler="tpe",
        trials=5,
        concurrency=1,
        seed=0,
        scheduler={"name": "none"},
        resources={"cpus_per_trial": 1},
        tracking={"experiment": "test-front", "register_as": "front-student", "register_top": 1},
    )
    spec, raw = load_sweep(str(path))
    assert spec.multi and spec.objective.metric == "val/loss"
    summary = run_sweep(spec, raw, quiet=True)
    uri = tracking.tracking_uri()
    c = tracking.client(uri)
    runs = tracking.children(uri, summary["parent_run_id"], summary["experiment_id"])
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:  # every objective (and the rest of the footprint) on every child
        for key in (
            "val/accuracy",
            "perf/student_params",
            "perf/student_mb",
            "perf/latency_ms",
            "perf/throughput",
        ):
            assert key in r.data.metrics, (r.info.run_name, sorted(r.data.metrics))
    params = {int(r.data.tags[tracking.NUMBER_TAG]): r.data.metrics["perf/student_params"] for r in runs}
    assert params[0] < params[1] < params[3] and params[0] < params[2] < params[3]  # width and depth cost

    # --- the front is the brute-force non-dominated set, in order of the first objective ------------------
    points = {r.info.run_id: [r.data.metrics[m] for m, _ in GOALS] for r in runs}
    expected = non_dominated(points)
    front = summary["front"]
    assert {r["run_id"] for r in front} == expected
    assert [r["pareto"] for r in front] == list(range(1, len(front) + 1))
    losses = [points[r["run_id"]][0] for r in front]
    assert losses == sorted(losses) and len(front) >= 2, points  # a trade-off: more parameters, lower loss
    assert [r["run_id"] for r in summary["leaderboard"][: len(front)]] == [r["run_id"] for r in front]
    for r in runs:
        on = r.info.run_id in expected
        assert r.data.tags["flexkd.pareto_front"] == str(on).lower()
        assert ("flexkd.pareto_rank" in r.data.tags) == on

    # --- registered: one version per front member, objective values as tags, aliases ---------------------
    reg = summary["registered"]
    assert len(reg["versions"]) == len(front) and reg["pareto_aliases"] == [
        f"pareto-{k}" for k in range(1, len(front) + 1)
    ]
    for k, row in enumerate(front, 1):
        mv = c.get_model_version_by_alias("front-student", f"pareto-{k}")
        assert mv.run_id == row["run_id"]
        assert float(mv.tags["val/loss"]) == pytest.approx(points[row["run_id"]][0], rel=1e-5)
        assert float(mv.tags["perf/student_params"]) == points[row["run_id"]][1]
        assert mv.tags["pareto_rank"] == str(k)
    champion = c.get_model_version_by_alias("front-student", registry.CHAMPION)
    assert champion.run_id == front[0]["run_id"]  # the best first objective within the front
    parent = c.get_run(summary["parent_run_id"])
    files = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert "pareto.csv" in files
    plots = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/pareto.html", "plots/pareto.png"} <= plots
    assert "Pareto front" in parent.data.tags[tracking.NOTE_TAG]

    # --- each front member's config reruns -------------------------------------------------------------
    assert len(summary["files"]["front"]) == len(front)
    for where, row in zip(summary["files"]["front"], front):
        assert main(["train", where, "train.steps=2", "eval.max_examples=8", "--quiet"]) == 0
        run = c.get_run(row["run_id"])
        config = yaml.safe_load(Path(where).read_text())
        assert str(config["student"]["arch"]["hidden_size"]) == run.data.params["student.arch.hidden_size"]
        saved = json.loads(
            (tmp_path / "flexkd-runs" / config["run"]["name"] / "student" / "config.json").read_text()
        )
        assert str(saved["num_hidden_layers"]) == run.data.params["student.arch.num_hidden_layers"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"scheduler": {"name": "asha"}}, "with 2 objectives use scheduler.name=none"),
        (
            {
                "objectives": [
                    {"metric": "val/accuracy", "mode": "max"},
                    {"metric": "perf/size", "mode": "min"},
                ]
            },
            "objectives[1].metric",
        ),
        (
            {
                "objectives": [
                    {"metric": "val/accuracy", "mode": "max"},
                    {"metric": "val/accuracy", "mode": "min"},
                ]
            },
            "appears twice",
        ),
        ({"objective": {"metric": "val/accuracy", "mode": "max"}}, "not both"),
        ({"sampler": "random"}, "sampler:"),
    ],
)
def test_bad_multi_objective_sweeps_fail_before_ray(tmp_path, fields, message):
    base = {
        "base": "demo",
        "space": {"optim.lr": {"choice": [0.001, 0.002]}},
        "objectives": [{"metric": m, "mode": mode} for m, mode in GOALS],
        "scheduler": {"name": "none"},
    }
    path = write_sweep(tmp_path / "bad.yaml", **{**base, **fields})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(str(path))
