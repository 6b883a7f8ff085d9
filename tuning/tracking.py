"""MLflow records of a sweep: the store, parent and child runs, per-step metrics.

Store: ``MLFLOW_TRACKING_URI`` when set (a tracking server in production), else an embedded SQLite file at
``./flexkd-runs/mlflow.db`` (an absolute path; artifacts beside it in ``./flexkd-runs/mlartifacts``). The
store is checked before Ray starts: an unreachable server fails in seconds, and a new SQLite file gets its
schema from the driver alone (several processes creating it at once race).

Layout, per sweep: one parent run (the sweep file, the space, seed, versions, git revision; at the end the
leaderboard, ``best.yaml`` and Optuna's plots) and one child run per trial (every dotted config key as a
param, per-step metrics, ``selection.json``, the resolved config, final metrics; FAILED with the error
text, or KILLED and tagged ``flexkd.early_stopped`` when ASHA stopped it). The registered models, versions
and aliases of the best students are ``tuning.registry``'s.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from flexkd.config import ConfigError

log = logging.getLogger("flexkd")

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "flexkd.trial_id"
SWEEP_TAG = "flexkd.sweep"
EARLY_STOPPED_TAG = "flexkd.early_stopped"
OUTCOME_TAG = "flexkd.outcome"  # running | completed | stopped_early | failed: what the runs table filters on
METHOD_TAG = "flexkd.method"
NUMBER_TAG = "flexkd.trial_number"  # the search's order: Optuna's trial number
NOTE_TAG = "mlflow.note.content"  # the run's Description in the UI
STUDENT_URI_TAG = "flexkd.student_model"
CREATE_TAG = "flexkd.create_id"  # one id per create_run call: its retries find the runs it already made
STUDENT_ARTIFACT = "student"


class SweepRecordsError(Exception):
    """A sweep's trials ran (Tune's state keeps them) but its after-sweep records could not all be written."""


def default_root() -> Path:
    return Path("./flexkd-runs").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default_root() / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments: beside an embedded SQLite file; a server decides its own."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Tags every experiment flexkd creates: a model-training experiment, not a GenAI one (MLflow 3's UI)."""

TRAINING_VIEW = "workflowType=machine_learning"
"""MLflow 3's UI opens an experiment in its GenAI view (traces, sessions) unless the address asks for the
model-training view, where runs, their metrics and the registry are; every address flexkd prints asks."""


def experiment_url(base: str, experiment_id: str | None) -> str:
    """The address of ``experiment_id``'s runs in the UI served at ``base``, in the model-training view."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{TRAINING_VIEW}"
    return f"{base}/#/experiments/{experiment_id}?{TRAINING_VIEW}"


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """The exact command that opens the MLflow UI on ``uri`` (the mlflow beside this Python, if there is one),
    and the address of the experiment's runs there."""
    if uri.startswith("sqlite:///"):
        beside = Path(sys.executable).parent / "mlflow"
        program = str(beside) if beside.exists() else "mlflow"
        return (
            f"{program} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
            f"{experiment_url('http://127.0.0.1:5000', experiment_id)}"
        )
    shown = redact(uri)  # printed to terminals and job logs: never a password in a server's address
    if uri.startswith(("http://", "https://")):
        return f"open {experiment_url(shown, experiment_id)} (or port-forward it; see cluster/README.md)"
    return f"open {shown} in a browser (or port-forward it; see cluster/README.md)"


WAIT_ENV = "FLEXKD_TRACKING_WAIT_S"
"""How long one MLflow call keeps retrying through a tracking-store outage (seconds; default 600)."""


def client(uri: str, wait: bool = True):
    """An MlflowClient for ``uri``. With ``wait`` (every call but the start-up check), each of its calls
    rides out an outage of the store: see :func:`retrying`."""
    from mlflow.tracking import MlflowClient

    raw = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _Waiting(raw, uri) if wait else raw


BUSY = (429, 502, 503, 504)  # HTTP answers that mean "not now"


def transient(err: BaseException) -> bool:
    """Whether an error from the tracking store means "not now" (the server is down, restarting, overloaded,
    or an SQLite file is locked) rather than "never" (a bad request, a missing run, no permission)."""
    import requests

    if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if getattr(getattr(err, "response", None), "status_code", None) in BUSY:  # an artifact upload's answer
        return True
    text = str(err)
    return any(
        mark in text
        for mark in (
            "failed with exception",  # MLflow's wrapper of connection errors (refused, reset, no route)
            "failed with timeout exception",
            "Max retries exceeded",
            "Connection refused",
            "error code 502",
            "error code 503",
            "error code 504",
            "error code 429",
            "database is locked",
        )
    )


def retrying(call, what: str, uri: str, budget: float | None = None):
    """``call()``, retried with backoff (1 s doubling to 30 s) for up to ``budget`` seconds
    (``FLEXKD_TRACKING_WAIT_S``, default 600) while the store's errors are transient; one line on stderr
    when the wait starts, then every 30 s or so, and one when the store answers again. Errors that are not
    transient, and the last error once the budget is spent, are raised."""
    budget = float(os.environ.get(WAIT_ENV, 600)) if budget is None else budget
    started = time.monotonic()
    delay, said = 1.0, 0.0
    while True:
        try:
            result = call()
        except Exception as err:
            waited = time.monotonic() - started
            if not transient(err) or waited + delay > budget:
                if said:
                    print(
                        f"flexkd: tracking store {redact(uri)} still unreachable after {waited:.0f}s "
                        f"(budget {WAIT_ENV}={budget:g}); giving up on {what}",
                        file=sys.stderr,
                        flush=True,
                    )
                raise
            if not said or waited - said >= 30:
                reason = redact(str(err).splitlines()[0])[:160]
                print(
                    f"flexkd: tracking store {redact(uri)} unreachable ({reason}); {what} waits and retries "
                    f"(waited {waited:.0f}s of up to {budget:g}s)",
                    file=sys.stderr,
                    flush=True,
                )
                said = waited or 1e-9
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
            continue
        if said:
            print(
                f"flexkd: tracking store {redact(uri)} answers again after {time.monotonic() - started:.0f}s; "
                f"{what} done",
                file=sys.stderr,
                flush=True,
            )
        return result


def redact(text: str) -> str:
    from tuning.submit import redact as mask  # one owner of what counts as a credential in text

    return mask(text)


class _Waiting:
    """An MlflowClient whose every method call goes through :func:`retrying`."""

    def __init__(self, raw, uri: str):
        self._raw, self._uri = raw, uri

    def __getattr__(self, name: str):
        attr = getattr(self._raw, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            return retrying(lambda: attr(*args, **kwargs), name, self._uri)

        return call


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
        client(uri, wait=False).search_experiments(max_results=1)  # creates a new SQLite schema here, once
    except Exception as err:  # MlflowException, sqlalchemy and requests errors all mean "cannot use it"
        raise ConfigError(f"MLFLOW_TRACKING_URI: cannot use {uri}: {str(err).splitlines()[0]}") from None


def ensure_experiment(uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri), tags=EXPERIMENT_KIND)
    except MlflowException:
        # Made already: by another sweep starting beside this one, or by this request's first copy (its
        # answer lost, MLflow's HTTP layer sent it again and the store refused the name the second time).
        found = c.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


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


def git_revision() -> tuple[str, bool]:
    """(commit, dirty) of the checkout this code runs from; ``FLEXKD_GIT_COMMIT`` where there is no checkout
    (`flexkd submit` sets it: the job's working directory is an uploaded copy without ``.git``)."""
    if os.environ.get("FLEXKD_GIT_COMMIT"):
        commit = os.environ["FLEXKD_GIT_COMMIT"]
        return commit.removesuffix("+dirty"), commit.endswith("+dirty")
    here = Path(__file__).parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5, cwd=here
        )
    except (OSError, subprocess.SubprocessError):
        return "", False
    return (rev.stdout.strip(), bool(dirty.stdout.strip())) if rev.returncode == 0 else ("", False)


def source_tags(command: str) -> dict[str, str]:
    """MLflow's own source tags (the UI's Source column and tab): the command, the user, the git commit."""
    import getpass

    commit, dirty = git_revision()
    tags = {
        "mlflow.source.name": command,
        "mlflow.source.type": "JOB"
        if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS")
        else "LOCAL",
        "mlflow.user": os.environ.get("USER") or getpass.getuser(),
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["flexkd.git_dirty"] = str(dirty).lower()
    return tags


def start_parent(
    uri: str, experiment_id: str, sweep_name: str, params: dict, files: dict[str, str], tags: dict
) -> str:
    """The sweep's parent run; ``files`` are text artifacts (name -> content)."""
    c = client(uri)
    run = create_run(uri, experiment_id, sweep_name, {SWEEP_TAG: sweep_name, **tags, **versions()})
    log_params(uri, run.info.run_id, params)
    for name, text in files.items():
        c.log_text(run.info.run_id, text, name)
    return run.info.run_id


def create_run(uri: str, experiment_id: str, name: str, tags: dict):
    """One new run, however often the request is sent. A create whose answer is lost (the server stored the
    run, then went down or the connection dropped) is sent again, by MLflow's HTTP layer (it retries POSTs)
    and by :func:`retrying`, and each copy that reached the store is a run: a sweep would show a trial twice,
    one copy RUNNING for ever. Every copy carries this call's id; the run the call returned stays, the others
    are deleted (the id too, once they are)."""
    c = client(uri)
    made = uuid.uuid4().hex
    run = c.create_run(experiment_id, run_name=name, tags={**tags, CREATE_TAG: made})
    for twin in c.search_runs([experiment_id], filter_string=f"tags.`{CREATE_TAG}` = '{made}'"):
        if twin.info.run_id != run.info.run_id:
            c.delete_run(twin.info.run_id)
    c.delete_tag(run.info.run_id, CREATE_TAG)  # its work done: not one more line in the run's tags
    return run


def shown(value: Any) -> str:
    """A param as the runs table shows it: floats to 4 significant digits (the config artifact keeps them whole)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, shown(v)) for k, v in sorted(params.items())]
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
    run = create_run(
        uri,
        experiment_id,
        name,
        {PARENT_TAG: parent_id, TRIAL_TAG: trial_id, OUTCOME_TAG: "running", **(tags or {})},
    )
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def one_off_tags(metrics: dict) -> dict[str, str]:
    """Facts measured once (set-up and trial timings, split sizes) as tags: a one-point chart shows nothing."""
    return {
        f"flexkd.{k.replace('/', '.')}": shown(float(v))
        for k, v in metrics.items()
        if isinstance(v, (int, float))
        and (k.startswith("perf/setup") or k.startswith("perf/trial/") or k in ("perf/loop_s",))
    }


def finish_child(
    uri: str, run_id: str, folder: str | Path, metrics: dict, student: str = "", examples: list[str] = ()
) -> None:
    """Artifacts (selection.json, config.yaml, metrics.json; the student as an MLflow model when ``student``
    names its task, with ``examples`` as its input example) and the one-off timings as tags; the run's metrics are its per-step history, whose last
    values are the final ones (MLflow shows the value at the highest step), so nothing is logged twice."""
    from flexkd import artifacts

    c = client(uri)
    for name in (artifacts.SELECTION, artifacts.CONFIG, artifacts.METRICS, artifacts.PROJECTOR):
        path = Path(folder, name)
        if path.exists():
            c.log_artifact(run_id, str(path))
    step = int(metrics.get("step", 0))
    summary = ", ".join(
        f"{k} {v:.4g}"
        for k, v in sorted(metrics.items())
        if k.startswith(("val/", "test/")) and not k.endswith("/examples") and isinstance(v, (int, float))
    )
    tags = {
        **one_off_tags(metrics),
        OUTCOME_TAG: "completed",
        NOTE_TAG: f"Completed {step} steps: {summary}.",
    }
    if student:
        from tuning.student_model import log_student

        # Each of its store calls rides out an outage, and its upload is retried into the one logged model.
        model_uri = log_student(
            uri,
            run_id,
            Path(folder, artifacts.STUDENT),
            student,
            list(examples),
            step=int(metrics.get("step", 0)),
        )
        tags.update({"flexkd.student_logged": "true", STUDENT_URI_TAG: model_uri})
    set_tags(uri, run_id, tags)
    c.set_terminated(run_id, "FINISHED")


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    if tags:
        client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def fail_child(uri: str, run_id: str, error: str, status: str = "FAILED") -> None:
    c = client(uri)
    if c.get_run(run_id).data.tags.get(OUTCOME_TAG) == "stopped_early":
        return  # the scheduler stopped it; what its process recorded on the way out is a consequence
    set_tags(uri, run_id, {"flexkd.error": error[-4000:], OUTCOME_TAG: "failed"})
    c.log_text(run_id, error, "error.txt")
    c.set_terminated(run_id, status)


def stop_child(
    cut: str, uri: str, run_id: str, end_ms: int, step: int | None, metric: str, value: float | None
) -> None:
    """A trial the scheduler stopped: it ends when it was stopped (not when the sweep ends) and says why, in
    a tag the runs table can show and filter on (``tags.flexkd.outcome = 'stopped_early'``). Its status is
    FINISHED: stopping a weak trial is the search working, not a failure, and KILLED draws a red cross."""
    c = client(uri)
    run = c.get_run(run_id)
    at = f" at step {step}" if step is not None else ""
    last = f" ({metric} {value:.4g} at its last evaluation)" if isinstance(value, float) else ""
    tags = {
        OUTCOME_TAG: "stopped_early",
        EARLY_STOPPED_TAG: "true",
        NOTE_TAG: f"Stopped early by ASHA{at}{last}: outside the best {cut} of the trials measured at that step.",
    }
    set_tags(uri, run_id, tags)
    if "flexkd.error" in run.data.tags:
        c.delete_tag(run_id, "flexkd.error")
    c.set_terminated(run_id, "FINISHED", end_time=max(end_ms, run.info.start_time))


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    if items:
        client(uri).log_batch(run_id, metrics=items)


def dataset_source(entry: dict):
    """MLflow's public source object for one split of ``describe_splits``: the demo generator (code), a Hub
    dataset (hugging_face), or whatever MLflow's source registry resolves a path or URI to (a local file or
    folder, s3://, gs://, https://...)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    where = str(entry["source"])
    kind = entry.get("kind") or ("demo" if where.startswith("demo") else "local")
    if kind == "demo":
        return CodeDatasetSource(tags={"generator": "flexkd.demo", "source": where})
    if kind == "hub":
        return HuggingFaceDatasetSource(path=where, config_name=entry.get("subset") or None)
    if "://" not in where:
        where = str(Path(where).resolve())
    with warnings.catch_warnings():
        # MLflow registers its local source for two schemes ('' and file) and warns that both match a path.
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(where)


def log_datasets(uri: str, run_id: str, datasets: list[dict]) -> None:
    """The run's splits in MLflow's Datasets tab: name, where they came from, rows and a content digest.

    ``datasets``: [{"context": "train" | "validation" | "test", "name", "kind", "source", "rows", "digest"}],
    from the loop's ``datasets`` event (``flexkd.data.describe_splits``).
    """
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for d in datasets:
        dataset = MetaDataset(dataset_source(d), name=d["name"], digest=d["digest"][:36])
        tags = [InputTag("mlflow.data.context", d["context"]), InputTag("flexkd.rows", str(d["rows"]))]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
    if inputs:
        client(uri).log_inputs(run_id, datasets=inputs)


class MlflowSink:
    """Recorder sink (flexkd.reporting.Sink): per-step metrics and events of one trial into its child run.

    What changes step by step is a metric (a chart); what is measured once is a tag: events (``teacher_loads``,
    ``scored_s``...), split sizes (``val/examples``), the datasets (MLflow's inputs).
    """

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.seconds = 0.0  # time spent logging (part of a trial's overhead)
        self.tagged: set[str] = set()
        self.examples: list[str] = []

    def report(self, metrics: dict, step: int, checkpoint) -> None:
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        once = {k: numeric.pop(k) for k in list(numeric) if k.endswith("/examples")}
        fresh = {f"flexkd.{k.replace('/', '.')}": shown(v) for k, v in once.items() if k not in self.tagged}
        self.tagged.update(once)
        start = time.perf_counter()
        set_tags(self.uri, self.run_id, fresh)
        log_metrics(self.uri, self.run_id, numeric, step)
        self.seconds += time.perf_counter() - start

    def event(self, name: str, value: Any, step: int) -> None:
        if name == "checkpoint":
            return  # a path in the trial's storage: the run folder keeps it (events.jsonl), MLflow need not
        if name == "datasets":
            log_datasets(self.uri, self.run_id, value)
            return
        if name == "examples":
            self.examples = list(value)  # the input example of the student's MLflow model
            return
        if name == "signal_shards":  # the full lists stay in events.jsonl; the tag says how many
            value = ", ".join(
                f"rank {r} read {len(read)} of {value['shards']}"
                for r, read in enumerate(value["read_by_rank"])
            )
        text = (
            shown(float(value))
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else str(value)
        )
        set_tags(self.uri, self.run_id, {f"flexkd.{name}": text})


def completed(run) -> bool:
    """Did this child run train to its last step? (Stopped-early runs are FINISHED too, but not completed.)"""
    return run.info.status == "FINISHED" and run.data.tags.get(OUTCOME_TAG, "completed") == "completed"


def should_log_student(
    uri: str, experiment_id: str, parent_id: str, goals: list[tuple[str, str]], values: list[float], top: int
) -> bool:
    """Could this trial's student be registered at the end? ``goals``: (metric, mode) per objective.

    One objective: is ``values[0]`` among the best ``top`` of the completed trials so far? A trial in the
    final top N always was when it finished. Several: does no completed trial so far dominate it? A trial
    dominated now stays dominated, so every final Pareto-optimal trial passes this when it finishes."""
    from tuning.pareto import dominates

    if top <= 0:
        return False
    metrics = [m for m, _ in goals]
    others = [
        [run.data.metrics[m] for m in metrics]
        for run in children(uri, parent_id, experiment_id)
        if completed(run) and all(m in run.data.metrics for m in metrics)
    ]
    if len(goals) > 1:
        return not any(dominates(o, values, [mode for _, mode in goals]) for o in others)
    mode = goals[0][1]
    better = [o[0] for o in others if (o[0] > values[0] if mode == "max" else o[0] < values[0])]
    return len(better) < top
