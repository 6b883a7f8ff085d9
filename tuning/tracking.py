"""MLflow records of a sweep: the store, parent and child runs, per-step metrics, the registry.

Store: ``MLFLOW_TRACKING_URI`` when set (a tracking server in production), else an embedded SQLite file at
``./flexkd-runs/mlflow.db`` (an absolute path; artifacts beside it in ``./flexkd-runs/mlartifacts``). The
store is checked before Ray starts: an unreachable server fails in seconds, and a new SQLite file gets its
schema from the driver alone (several processes creating it at once race).

Layout, per sweep: one parent run (the sweep file, the space, seed, versions, git revision; at the end the
leaderboard, ``best.yaml`` and Optuna's plots) and one child run per trial (every dotted config key as a
param, per-step metrics, ``selection.json``, the resolved config, final metrics; FAILED with the error
text, or KILLED and tagged ``flexkd.early_stopped`` when ASHA stopped it). The best students are registered
models with the alias ``champion`` on the best.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flexkd.config import ConfigError

log = logging.getLogger("flexkd")

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "flexkd.trial_id"
SWEEP_TAG = "flexkd.sweep"
EARLY_STOPPED_TAG = "flexkd.early_stopped"
STUDENT_ARTIFACT = "student"
CHAMPION = "champion"


def default_root() -> Path:
    return Path("./flexkd-runs").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default_root() / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments: beside an embedded SQLite file; a server decides its own."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


def ui_command(uri: str) -> str:
    """The exact command that opens the MLflow UI on ``uri`` (the mlflow beside this Python, if there is one)."""
    if uri.startswith("sqlite:///"):
        beside = Path(sys.executable).parent / "mlflow"
        program = str(beside) if beside.exists() else "mlflow"
        return f"{program} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser (or port-forward it; see cluster/README.md)"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_store(uri: str) -> None:
    """Fail fast, before Ray reserves anything, when the store cannot be used."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as err:
            raise ConfigError(
                f"MLFLOW_TRACKING_URI: {uri} is unreachable ({type(err).__name__}); start the server or unset the "
                f"variable to use the embedded SQLite store"
            ) from None
        if response.status_code != 200:
            raise ConfigError(f"MLFLOW_TRACKING_URI: {uri}/health answered {response.status_code}")
        # Authentication problems show on the first real call; make it now, with few retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        client(uri).search_experiments(max_results=1)  # creates a new SQLite schema here, once
    except Exception as err:  # MlflowException, sqlalchemy and requests errors all mean "cannot use it"
        raise ConfigError(f"MLFLOW_TRACKING_URI: cannot use {uri}: {str(err).splitlines()[0]}") from None


def ensure_experiment(uri: str, name: str) -> str:
    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return c.create_experiment(name, artifact_location=artifact_root(uri))


# ---------------------------------------------------------------------------------------------------------
# Runs


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("flexkd", "ray", "torch", "transformers", "datasets", "optuna", "mlflow"):
        try:
            out[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return (
            rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
            if rev.returncode == 0
            else "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_parent(uri: str, experiment_id: str, sweep_name: str, params: dict, files: dict[str, str]) -> str:
    """The sweep's parent run; ``files`` are text artifacts (name -> content)."""
    c = client(uri)
    run = c.create_run(
        experiment_id,
        run_name=sweep_name,
        tags={SWEEP_TAG: sweep_name, "git.revision": git_revision(), **versions()},
    )
    log_params(uri, run.info.run_id, params)
    for name, text in files.items():
        c.log_text(run.info.run_id, text, name)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [
        Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in sorted(params.items())
    ]
    c = client(uri)
    for i in range(0, len(items), 100):  # the store takes at most 100 params a call
        c.log_batch(run_id, params=items[i : i + 100])


def children(uri: str, parent_id: str, experiment_id: str) -> list:
    """The parent's child runs (not deleted), oldest first."""
    return client(uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )


def start_child(
    uri: str,
    experiment_id: str,
    parent_id: str,
    trial_id: str,
    name: str,
    params: dict,
    tags: dict | None = None,
) -> str:
    """A trial's child run. A trial that runs again (``--resume`` restarts unfinished trials) replaces its
    earlier run: one run per trial, never two."""
    c = client(uri)
    for old in c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
    ):
        c.delete_run(old.info.run_id)
    run = c.create_run(
        experiment_id, run_name=name, tags={PARENT_TAG: parent_id, TRIAL_TAG: trial_id, **(tags or {})}
    )
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def finish_child(uri: str, run_id: str, folder: str | Path, metrics: dict, log_student: bool) -> None:
    """Final metrics and artifacts (selection.json, config.yaml, metrics.json; the student when asked)."""
    from flexkd import artifacts

    c = client(uri)
    for name in (artifacts.SELECTION, artifacts.CONFIG, artifacts.METRICS, artifacts.PROJECTOR):
        path = Path(folder, name)
        if path.exists():
            c.log_artifact(run_id, str(path))
    if log_student:
        c.log_artifacts(run_id, str(Path(folder, artifacts.STUDENT)), STUDENT_ARTIFACT)
        c.set_tag(run_id, "flexkd.student_logged", "true")
    numeric = {f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    log_metrics(uri, run_id, numeric, step=int(metrics.get("step", 0)))
    c.set_terminated(run_id, "FINISHED")


def fail_child(uri: str, run_id: str, error: str, status: str = "FAILED") -> None:
    c = client(uri)
    c.set_tag(run_id, "flexkd.error", error[-4000:])
    c.log_text(run_id, error, "error.txt")
    c.set_terminated(run_id, status)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    if items:
        client(uri).log_batch(run_id, metrics=items)


class MlflowSink:
    """Recorder sink (flexkd.reporting.Sink): per-step metrics and events of one trial into its child run."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.seconds = 0.0  # time spent logging (part of a trial's overhead)

    def report(self, metrics: dict, step: int, checkpoint) -> None:
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._log(numeric, step)

    def event(self, name: str, value: Any, step: int) -> None:
        if name == "checkpoint":
            return  # a path in the trial's storage: the run folder keeps it (events.jsonl), MLflow need not
        if isinstance(value, (int, float)):
            self._log({f"event/{name}": float(value)}, step)
        else:
            client(self.uri).set_tag(self.run_id, f"flexkd.{name}", str(value))

    def _log(self, metrics: dict, step: int) -> None:
        start = time.perf_counter()
        log_metrics(self.uri, self.run_id, metrics, step)
        self.seconds += time.perf_counter() - start


def should_log_student(
    uri: str, experiment_id: str, parent_id: str, metric: str, mode: str, value: float, top: int
) -> bool:
    """Is ``value`` among the best ``top`` of the finished trials so far? A trial in the final top N always
    was when it finished, so logging students only then keeps every one the registry will need."""
    if top <= 0:
        return False
    key = f"final/{metric}"
    values = []
    for run in children(uri, parent_id, experiment_id):
        if run.info.status == "FINISHED" and key in run.data.metrics:
            values.append(run.data.metrics[key])
    better = [v for v in values if (v > value if mode == "max" else v < value)]
    return len(better) < top


# ---------------------------------------------------------------------------------------------------------
# Registry


def register(uri: str, name: str, run_ids: list[str]) -> list[str]:
    """Register the students of ``run_ids`` (best first) as versions of ``name``; alias 'champion' -> the best."""
    c = client(uri)
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(
            name, description="Students distilled by flexkd; the alias 'champion' marks the best."
        )
    versions_ = []
    for run_id in run_ids:
        mv = c.create_model_version(name, source=f"runs:/{run_id}/{STUDENT_ARTIFACT}", run_id=run_id)
        versions_.append(mv.version)
    if versions_:
        c.set_registered_model_alias(name, CHAMPION, versions_[0])
    return versions_


def load_registered(model_uri: str, task: str = "classification", uri: str | None = None):
    """``models:/NAME@champion`` (or any artifact URI of a student folder) -> (model, tokenizer).

    uri: the tracking store (default: the one the sweeps use, ``tracking_uri()``).
    """
    import mlflow
    from transformers import AutoTokenizer

    from flexkd.models import model_class

    uri = uri or tracking_uri()
    source = model_uri
    if model_uri.startswith("models:/"):
        # Resolved here against ``uri``: mlflow resolves models:/ through the global registry URI otherwise.
        ref = model_uri.removeprefix("models:/")
        c = client(uri)
        if "@" in ref:
            name, alias = ref.split("@", 1)
            source = c.get_model_version_by_alias(name, alias).source
        else:
            name, version = ref.split("/", 1)
            source = c.get_model_version(name, version).source
    folder = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri)
    return model_class(task).from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
