"""Sweeps: a real Ray Tune + Optuna sweep on local Ray, ASHA, a real SQLite MLflow store, the registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flexkd import demo
from flexkd.config import ConfigError, load_config
from tuning import reaper, registry, tracking
from tuning.space import DefineByRun, describe, load_sweep, parse_space, trial_overrides


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------
# The sweep file, without Ray


def test_shipped_sweeps_validate_and_dry_run(capsys):
    from tuning.cli import main

    for name in ("quickstart", "comparison", "frontier"):
        spec, _ = load_sweep(name)
        assert spec.trials >= 3 and parse_space(spec.space)
        assert main(["sweep", name, "--dry-run"]) == 0
    spec, _ = load_sweep("frontier-imdb")  # its files are the benchmark assets: the static checks only
    assert spec.multi and [g.metric for g in spec.goals] == ["val/accuracy", "perf/latency_ms"]
    out = capsys.readouterr().out
    assert "feature.weight: loguniform [0.3, 10.0]  when {'method': ['flexkd']}" in out
    assert "2 at a time" in out


def test_comparison_preset_covers_every_feature_loss():
    """The paper's comparison preset runs every baseline the library has: a feature loss added to
    FEATURE_LOSSES without a bundle there would never be compared."""
    from flexkd.losses import FEATURE_LOSSES

    spec, _ = load_sweep("comparison")
    (method,) = [p for p in parse_space(spec.space) if p.name == "method"]
    losses = {bundle["feature.loss"] for bundle in method.args.values()}
    assert losses == (set(FEATURE_LOSSES) - {"mse_std"}) | {"none"}


def test_space_covers_the_mission_dimensions():
    spec, _ = load_sweep("quickstart")
    keys = {k for p in parse_space(spec.space) for k in ([p.name] if p.kind != "bundles" else [])}
    for key in (
        "feature.layers",
        "selection.k",
        "selection.strategy",
        "feature.weight",
        "kd.weight",
        "kd.temperature",
        "kd.loss",
        "scoring.batch_size",
        "scoring.method",
        "optim.lr",
        "train.steps",
    ):
        assert key in keys, key


@pytest.mark.parametrize(
    "space,expected",
    [
        ({"kd.wieght": {"uniform": [0, 1]}}, "space.kd.wieght: 'kd.wieght' is not a run-config key"),
        (
            {"kd.loss": {"choice": ["fkl", "kl"]}},
            "space.kd.loss: {'kd.loss': 'kl'}: kd.loss: unknown value 'kl'",
        ),
        ({"feature.weight": {"loguniform": [0, 1]}}, "space.feature.weight.loguniform: bad bounds"),
        (
            {"selection.k": {"choice": [8]}, "x": {"choice": [1], "when": {"y": [1]}}},
            "space.x.when: 'y' is not a parameter",
        ),
        (
            {"m": {"bundles": {"a": {"feature.layers": "99:1"}}}},
            "space.m: {'feature.layers': '99:1'}: feature.layers: teacher layer 99",
        ),
        (
            {"selection.k": {"choice": [16, 4096]}},
            "space.selection.k: {'selection.k': 4096}: selection.k: 4096 is out of range",
        ),
    ],
)
def test_bad_spaces_fail_before_ray(tmp_path, disk, space, expected):
    from tuning.space import check_space_files

    path = write_sweep(
        tmp_path / "s.yaml", base="demo", space=space, overrides=[f"teacher.path={disk['teacher_cls']}"]
    )
    with pytest.raises(ConfigError) as err:
        spec, _ = load_sweep(str(path))
        check_space_files(spec)  # the file-level checks: run by `flexkd sweep` (and --dry-run) before Ray
    assert expected in str(err.value)


def test_define_by_run_samples_conditional_parameters_only_when_they_apply():
    import optuna

    spec, _ = load_sweep("quickstart")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = DefineByRun(spec.params)
    for _ in range(30):
        trial = study.ask()
        space(trial)
        method = trial.params["method"]
        assert ("feature.weight" in trial.params) == (method == "flexkd")
        assert ("kd.weight" in trial.params) == (method in ("logit_kd", "flexkd"))
        over = trial_overrides(spec, trial.params)
        assert over["feature.loss"] == ("pearson" if method == "flexkd" else "none")
        study.tell(trial, 0.5)


def test_sweep_overrides_split_between_the_sweep_and_the_runs():
    spec, _ = load_sweep("quickstart", ["trials=3", "scheduler.name=none", "train.log_every=5"])
    assert spec.trials == 3 and spec.scheduler.name == "none" and spec.overrides[-1] == "train.log_every=5"
    assert "3 trials" in describe(spec)


def test_an_unreachable_tracking_server_fails_fast(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: http://127.0.0.1:9 is unreachable"):
        tracking.check_store(tracking.tracking_uri())
    print(f"failed in {time.perf_counter() - start:.2f}s")


def test_experiments_open_in_the_ui_training_view(tmp_path):
    """MLflow 3's UI shows an experiment as a GenAI one (traces, sessions; no runs table) unless the address
    asks for the model-training view: the experiment carries its kind, and every printed address asks."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_store(uri)
    eid = tracking.ensure_experiment(uri, "students")
    assert tracking.ensure_experiment(uri, "students") == eid
    tags = tracking.client(uri).get_experiment(eid).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"

    line = tracking.ui_command(uri, eid)
    assert f"ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" in line
    assert line.endswith(f"open http://127.0.0.1:5000/#/experiments/{eid}?workflowType=machine_learning")
    served = tracking.ui_command("http://mlflow.internal:5000/", "7")
    assert served.startswith(
        "open http://mlflow.internal:5000/#/experiments/7?workflowType=machine_learning "
    )
    with_password = tracking.ui_command("https://alice:s3cret@mlflow.internal:5000", "7")
    assert (
        "s3cret" not in with_password
        and "https://alice:***@mlflow.internal:5000/#/experiments/7" in with_password
    )


# ---------------------------------------------------------------------------------------------------------
# A real sweep


def test_sweep_with_asha_and_train_workers_records_everything(ray_cluster, disk, tmp_path, monkeypatch):
    """3 trials, each a TorchTrainer with a real worker group taking 2 of the cluster's 4 CPUs (+1 for the
    trial): a trial stopped by ASHA that left its workers' resources reserved would block the next one."""
    import mlflow

    from tuning.space import load_sweep
    from tuning.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    path = write_sweep(
        tmp_path / "asha.yaml",
        base="demo",
        overrides=[
            f"teacher.path={disk['teacher_cls']}",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=2",
            "train.steps=30",
            "train.eval_every=10",
            "train.log_every=10",
            "optim.warmup_steps=0",
            "eval.max_examples=100",
            "data.max_train_examples=400",
            "scoring.num_examples=32",
        ],
        space={
            "method": {
                "bundles": {
                    "sft": {"feature.loss": "none", "kd.loss": "none"},
                    "flexkd": {"feature.loss": "pearson"},
                }
            },
            "selection.k": {"choice": [8, 16], "when": {"method": ["flexkd"]}},
            "optim.lr": {"choice": [0.003, 1.0e-7]},
        },
        objective={"metric": "val/loss", "mode": "min"},
        # A good trial first, then a hopeless one: ASHA must stop the second at its first evaluation.
        start_points=[{"method": "sft", "optim.lr": 0.003}, {"method": "sft", "optim.lr": 1.0e-7}],
        trials=3,
        concurrency=1,
        seed=3,
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        resources={"cpus_per_trial": 1},
        tracking={"experiment": "test-asha", "register_as": "test-student", "register_top": 2},
    )
    spec, raw = load_sweep(str(path))
    summary = run_sweep(spec, raw, quiet=True)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'flexkd-runs' / 'mlflow.db'}"
    client = tracking.client(uri)

    # --- every planned trial ran, ASHA stopped at least one -----------------------------------------------
    rows = summary["leaderboard"]
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3
    stopped = [r for r in rows if r["early_stopped"]]
    assert stopped, rows
    assert {r["status"] for r in rows} <= {"completed", "stopped_early"}

    # --- the parent run ------------------------------------------------------------------------------------
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.seed"] == "3" and parent.data.params["sweep.trials"] == "3"
    assert parent.data.tags["version.ray"].startswith("2.")
    kind = client.get_experiment(summary["experiment_id"]).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the UI's model-training view, not its GenAI one
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40  # MLflow's own name: the Source column
    assert parent.data.tags["mlflow.source.name"] == f"flexkd sweep {spec.name}"
    note = parent.data.tags[tracking.NOTE_TAG]  # the Description: the leaderboard's summary
    assert "3 trials" in note and f"{summary['best'][spec.objective.metric]:.4f}" in note
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "space.txt", "leaderboard.csv", "best.yaml"} <= files
    plot_files = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    for name in ("optimization_history", "intermediate_values", "parallel_coordinate"):
        assert f"plots/{name}.png" in plot_files, plot_files
    assert {"plots/search.html", "plots/trials.csv"} <= plot_files

    # --- one child per trial, named for its method and trial number -------------------------------------
    runs = tracking.children(uri, parent.info.run_id, summary["experiment_id"])
    assert len(runs) == 3
    numbers = [int(r.data.tags[tracking.NUMBER_TAG]) for r in runs]
    assert numbers == [0, 1, 2]  # oldest first = the search's order (one trial at a time)
    for run, number in zip(runs, numbers):
        method = run.data.tags[tracking.METHOD_TAG]
        assert method in ("sft", "flexkd+kd") and run.info.run_name == f"{method}-{number:03d}"
        assert run.data.params["train.steps"] == "30"
        assert ("feature.weight" in run.data.params) == (method == "flexkd+kd")  # only what applies
        assert all(not k.startswith(("final/", "event/")) for k in run.data.metrics), run.data.metrics
        assert "val/examples" not in run.data.metrics and run.data.tags["flexkd.val.examples"] == "100"
        assert run.data.tags["flexkd.teacher_source"] in ("cached", "none")
        contexts = {
            t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"
        }
        assert {"train", "validation"} <= contexts, run.inputs  # MLflow's Datasets tab
        history = client.get_metric_history(run.info.run_id, "train/loss")
        steps = [m.step for m in history]
        assert steps == sorted(set(steps)) and steps[0] == 10
        assert run.info.status == "FINISHED"
        if run.data.tags[tracking.OUTCOME_TAG] == "stopped_early":
            assert run.data.tags[tracking.EARLY_STOPPED_TAG] == "true"
            assert "Stopped early by ASHA at step" in run.data.tags[tracking.NOTE_TAG]
            # It ended when it was stopped, not when the sweep ended: within seconds of its last metric.
            last = max(
                m.timestamp
                for key in run.data.metrics
                for m in client.get_metric_history(run.info.run_id, key)
            )
            assert 0 <= run.info.end_time - last < 5000, (run.info.end_time, last)
            continue
        assert run.data.tags[tracking.OUTCOME_TAG] == "completed" and steps[-1] == 30
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "metrics.json"} <= names
        assert ("selection.json" in names) == (run.data.params.get("feature.loss") == "pearson")

    # --- the plots were drawn from the search: trial order, stopped trials present --------------------------
    table = (
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=parent.info.run_id, artifact_path="plots/trials.csv", tracking_uri=uri
            )
        )
        .read_text()
        .splitlines()
    )
    drawn = [line.split(",")[:3] for line in table[1:]]
    by_id = {r.data.tags[tracking.TRIAL_TAG]: r for r in runs}
    assert [int(n) for n, _, _ in drawn] == [0, 1, 2]
    for n, trial_id, state in drawn:
        assert by_id[trial_id].data.tags[tracking.NUMBER_TAG] == n
        expected = {"completed": "finished", "stopped_early": "stopped"}[
            by_id[trial_id].data.tags[tracking.OUTCOME_TAG]
        ]
        assert state == expected

    # --- best.yaml reruns; the registry's champion is the best student, an MLflow model that predicts ------
    best = summary["best"]
    best_yaml = Path(summary["files"]["best"])
    cfg = load_config(str(best_yaml))
    assert cfg.run.name == f"{spec.name}-best"
    assert client.get_run(best["run_id"]).data.params["optim.lr"] == f"{cfg.optim.lr:.4g}"
    version = client.get_model_version_by_alias("test-student", registry.CHAMPION)
    assert version.run_id == best["run_id"] and version.tags["objective"] == "val/loss"
    assert float(version.tags["val/loss"]) == pytest.approx(best["val/loss"], rel=1e-5)
    versions = client.search_model_versions("name='test-student'")
    newest = max(versions, key=lambda v: int(v.version))
    assert newest.run_id == best["run_id"]  # "latest" is the best, not the runner-up
    model, tok = registry.load_registered("models:/test-student@champion", uri=uri)
    inputs = tok(["the plot was not very dull"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, len(demo.LABELS)) and torch.isfinite(logits).all()
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", uri
    )  # what a user sets; then plain mlflow resolves the alias too
    served = mlflow.pyfunc.load_model("models:/test-student@champion")
    predicted = served.predict(["the plot was not very dull", "a fine film"])
    labels = list(predicted["label"]) if hasattr(predicted, "columns") else [p["label"] for p in predicted]
    assert len(labels) == 2 and set(labels) <= set(demo.LABELS), predicted

    # --- resume of a finished sweep: nothing runs, nothing is registered twice --------------------------------
    before = sorted((v.version, v.run_id) for v in client.search_model_versions("name='test-student'"))
    again = run_sweep(spec, raw, resume=True, quiet=True)
    after = sorted((v.version, v.run_id) for v in client.search_model_versions("name='test-student'"))
    assert after == before and again["registered"]["versions"] == summary["registered"]["versions"]
    assert client.get_model_version_by_alias("test-student", registry.CHAMPION).version == version.version
    assert len(tracking.children(uri, parent.info.run_id, summary["experiment_id"])) == 3


def test_a_killed_sweep_driver_resumes_with_exactly_the_planned_trials(disk, tmp_path):
    path = write_sweep(
        tmp_path / "resume.yaml",
        base="demo",
        overrides=[
            f"teacher.path={disk['teacher_cls']}",
            "train.steps=40",
            "train.eval_every=20",
            "train.log_every=10",
            "eval.max_examples=64",
            "data.max_train_examples=300",
            "scoring.num_examples=32",
        ],
        space={"optim.lr": {"loguniform": [1.0e-4, 3.0e-3]}, "kd.weight": {"uniform": [0.1, 2.0]}},
        trials=4,
        concurrency=1,
        seed=1,
        scheduler={"name": "none"},
        tracking={"experiment": "test-resume", "register_top": 1},
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tuning.cli", "sweep", str(path), "--quiet"]
    driver = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    uri = f"sqlite:///{tmp_path / 'flexkd-runs' / 'mlflow.db'}"
    driver_start = {driver.pid: reaper._stat(driver.pid)[1]}
    ours: dict[int, int] = {}  # pid -> start time of every process below the driver (Ray's included)
    half: list[str] = []  # runs in flight when the driver dies
    deadline = time.time() + 600
    finished = 0
    try:
        while time.time() < deadline and driver.poll() is None:
            ours.update(reaper.descendants(driver_start))
            pointer = tmp_path / "flexkd-runs" / "sweeps" / "resume.latest.json"
            if pointer.exists():
                state = json.loads(pointer.read_text())
                runs = tracking.children(uri, state["parent_id"], state["experiment_id"])
                finished = sum(r.info.status == "FINISHED" for r in runs)
                half = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
                if finished >= 1 and half:
                    break  # one trial done, the next one in flight: kill the driver now
            time.sleep(1)
        ours.update(reaper.descendants(driver_start))
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone: what it started must end without help
        driver.wait()
    left = reaper.alive(ours)
    gone_by = time.time() + 30
    while left and time.time() < gone_by:
        time.sleep(1)
        left = reaper.alive(left)
    names = {
        pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left if Path(f"/proc/{pid}").exists()
    }
    reaper.end(left)  # whatever the assertion says, leave nothing behind
    assert not left, f"orphans of the killed driver: {names}"
    assert len(ours) > 5  # Ray's processes were seen (gcs, raylet, agents, the trial's workers)
    assert finished >= 1, driver.stdout.read().decode()[-3000:] if driver.stdout else ""
    done = subprocess.run(
        [*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads((tmp_path / "flexkd-runs" / "sweeps" / "resume.latest.json").read_text())
    runs = tracking.children(uri, state["parent_id"], state["experiment_id"])
    trial_ids = [r.data.tags[tracking.TRIAL_TAG] for r in runs]
    assert len(trial_ids) == 4 and len(set(trial_ids)) == 4, trial_ids  # none lost, none recorded twice
    assert all(r.info.status == "FINISHED" for r in runs)
    board = (tmp_path / "flexkd-runs" / "sweeps" / "resume-leaderboard.csv").read_text().splitlines()
    assert len(board) == 1 + 4
    assert all(r.data.tags[tracking.OUTCOME_TAG] == "completed" for r in runs)
    client = tracking.client(uri)
    for run_id in half:  # the half-written run is replaced by its trial's rerun, not left beside it
        assert client.get_run(run_id).info.lifecycle_stage == "deleted"
        assert run_id not in {r.info.run_id for r in runs}


def test_a_failing_trial_is_recorded_as_failed_and_the_sweep_goes_on(
    ray_cluster, disk, tmp_path, monkeypatch
):
    from tuning.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    path = write_sweep(
        tmp_path / "fails.yaml",
        base="demo",
        overrides=[
            f"teacher.path={disk['teacher_cls']}",
            "train.steps=6",
            "train.eval_every=6",
            "train.log_every=3",
            "eval.max_examples=32",
            "data.max_train_examples=200",
            "scoring.num_examples=16",
            "optim.warmup_steps=0",
            "optim.max_grad_norm=0",
        ],
        space={"optim.lr": {"choice": [0.001, 1.0e12]}},  # 1e12: the weights blow up, the loss is not finite
        start_points=[{"optim.lr": 0.001}, {"optim.lr": 1.0e12}],
        trials=2,
        concurrency=1,
        scheduler={"name": "none"},
        tracking={"experiment": "test-fails", "register_top": 0},
    )
    spec, raw = load_sweep(str(path))
    summary = run_sweep(spec, raw, quiet=True)
    by_status = {r["status"]: r for r in summary["leaderboard"]}
    assert set(by_status) == {"completed", "failed"}
    assert summary["best"]["trial_id"] == by_status["completed"]["trial_id"]
    client = tracking.client(tracking.tracking_uri())
    failed = client.get_run(by_status["failed"]["run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags[tracking.OUTCOME_TAG] == "failed"
    assert "FloatingPointError" in failed.data.tags["flexkd.error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    assert "registered" not in summary  # register_top=0
