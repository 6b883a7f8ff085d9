"""A real `mlflow server` killed in the middle of a sweep and started again: the sweep waits for it, every
planned trial is recorded, the parent run ends FINISHED and the best student is registered."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from flexkd import artifacts
from tuning import registry, tracking

from .fixtures import mlflow_server
from .test_cluster import free_ports, wait_for
from .test_sweep import write_sweep

OUTAGE_S = 25


def start_server(store: Path, port: int) -> subprocess.Popen:
    server = mlflow_server(store, port, dict(os.environ))
    wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=3).ok, 180, "the MLflow server")
    return server


def kill_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


@pytest.mark.slow
def test_a_sweep_survives_the_tracking_server_going_down_and_coming_back(disk, tmp_path):
    store = tmp_path / "server"
    store.mkdir()
    (port,) = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    path = write_sweep(
        tmp_path / "outage.yaml",
        base="demo",
        overrides=[
            f"teacher.path={disk['teacher_cls']}",
            "train.steps=60",
            "train.eval_every=20",
            "train.log_every=5",
            "eval.max_examples=64",
            "data.max_train_examples=300",
            "scoring.num_examples=32",
        ],
        space={"optim.lr": {"loguniform": [1.0e-4, 3.0e-3]}},
        trials=3,
        concurrency=1,
        seed=2,
        scheduler={"name": "none"},
        tracking={"experiment": "test-outage", "register_as": "outage-student", "register_top": 1},
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": uri, tracking.WAIT_ENV: "300"}
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "tuning.cli", "sweep", str(path)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        pointer = tmp_path / "flexkd-runs" / "sweeps" / "outage.latest.json"

        def first_trial_logging():
            state = json.loads(pointer.read_text())
            runs = tracking.children(uri, state["parent_id"], state["experiment_id"])
            return any(r.info.status == "RUNNING" and r.data.metrics for r in runs)

        wait_for(first_trial_logging, 400, "a trial logging metrics")
        kill_server(server)  # mid-trial: its next metrics, its artifacts and the next trial's run wait
        time.sleep(OUTAGE_S)
        assert driver.poll() is None, log.read_text()[-3000:]  # still waiting, not dead
        server = start_server(store, port)
        assert driver.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        kill_server(server)
        server = start_server(store, port)  # read what was recorded
    try:
        text = log.read_text()
        assert "unreachable" in text and "answers again" in text, text[-3000:]  # the user was told
        assert "Traceback" not in text, text[-3000:]
        state = json.loads(pointer.read_text())
        c = tracking.client(uri, wait=False)
        parent = c.get_run(state["parent_id"])
        assert parent.info.status == "FINISHED"
        runs = tracking.children(uri, state["parent_id"], state["experiment_id"])
        assert len(runs) == 3 and len({r.data.tags[tracking.TRIAL_TAG] for r in runs}) == 3
        assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
        assert all(r.data.tags[tracking.OUTCOME_TAG] == "completed" for r in runs)
        # The trial that was logging through the outage has its whole history: every logged step, in order.
        for r in runs:
            steps = [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")]
            assert steps == list(range(5, 61, 5)), (r.info.run_name, steps)
        best = parent.data.tags["flexkd.best_run_id"]
        version = c.get_model_version_by_alias("outage-student", registry.CHAMPION)
        assert version.run_id == best
    finally:
        kill_server(server)


LOST_CREATES = {"runs", "experiments", "registered-models", "model-versions", "logged-models"}


class _LosesFirstCreateAnswer(http.server.BaseHTTPRequestHandler):
    """Forwards every request to the real server; the first create of an experiment, a run, a registered
    model and a model version reaches the store, and then its connection drops before the answer: what a
    server killed between storing and answering does. The first artifact upload is answered 503, as by a
    server going down mid-upload."""

    upstream = ""
    dropped: dict[str, str] = {}

    def do_GET(self):
        self.forward()

    def do_POST(self):
        self.forward()

    def do_PATCH(self):
        self.forward()

    def do_DELETE(self):
        self.forward()

    def do_PUT(self):  # artifact uploads
        self.forward()

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = requests.request(
            self.command,
            self.upstream + self.path,
            data=body,
            headers={k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")},
            timeout=60,
        )
        kind = self.path.rsplit("/", 2)[-2] if self.path.endswith("/create") else ""
        if self.command == "POST" and self.path.endswith("/logged-models"):  # MLflow 3's create has no verb
            kind = "logged-models"
        if self.command == "PUT" and "/mlflow-artifacts/" in self.path and "upload" not in self.dropped:
            self.dropped["upload"] = self.path  # the first file of the student's upload: "not now"
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind in LOST_CREATES and kind not in self.dropped:
            self.dropped[kind] = answer.text
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, *args):
        pass


def test_what_a_lost_create_answer_made_is_made_once(disk, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # every failure reaches flexkd's own retries
    store = tmp_path / "server"
    store.mkdir()
    port, proxy_port = free_ports(2)
    server = start_server(store, port)
    _LosesFirstCreateAnswer.upstream = f"http://127.0.0.1:{port}"
    _LosesFirstCreateAnswer.dropped = {}
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", proxy_port), _LosesFirstCreateAnswer)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{proxy_port}"
        experiment = tracking.ensure_experiment(uri, "lost-answer")
        parent = tracking.start_parent(uri, experiment, "lost", {"a": 1}, {}, {})
        child = tracking.start_child(uri, experiment, parent, "t0", "trial 0", {"optim.lr": 1e-3})
        registry.ensure_registered_model(uri, "lost-student")
        direct = f"http://127.0.0.1:{port}"
        trial = tmp_path / "trial"  # a finished trial's folder, as a sweep ends it
        trial.mkdir()
        (trial / artifacts.STUDENT).symlink_to(disk["student_cls"])
        tracking.finish_child(
            uri, child, trial, {"step": 0}, student="classification", examples=["a dull plot"]
        )
        model_uri = tracking.client(direct).get_run(child).data.tags[tracking.STUDENT_URI_TAG]
        version = registry.register_student(uri, "lost-student", model_uri, tags={"a": "1"})
        # The store did make an experiment, a run, a registered model, a logged model and a version whose
        # answers never came.
        assert set(_LosesFirstCreateAnswer.dropped) == LOST_CREATES | {"upload"}
        assert tracking.client(direct).get_experiment_by_name("lost-answer").experiment_id == experiment
        live = tracking.client(direct).search_runs([experiment])
        assert sorted(r.info.run_id for r in live) == sorted([parent, child])  # one parent, one child
        assert tracking.children(direct, parent, experiment)[0].data.params == {"optim.lr": "0.001"}
        assert [m.name for m in tracking.client(direct).search_registered_models()] == ["lost-student"]
        models = tracking.client(direct).search_logged_models(experiment_ids=[experiment])
        # No PENDING twin of the lost create, no FAILED copy of the cut upload: one model, READY, linked once.
        assert [(m.model_id, m.status.name) for m in models] == [
            (model_uri.removeprefix("models:/"), "READY")
        ]
        assert [o.model_id for o in tracking.client(direct).get_run(child).outputs.model_outputs] == [
            models[0].model_id
        ]
        kept = tracking.client(direct).search_model_versions("name='lost-student'")
        assert [(v.version, v.run_id, v.tags) for v in kept] == [(version.version, child, {"a": "1"})]
        assert tracking.CREATE_TAG not in models[0].tags and tracking.CREATE_TAG not in live[0].data.tags
        listed = json.loads(
            tracking.client(direct).get_logged_model(models[0].model_id).tags["mlflow.modelVersions"]
        )
        assert [e["version"] for e in listed] == [int(version.version)]  # the UI's link to its one version
    finally:
        proxy.shutdown()
        kill_server(server)
