"""Students as MLflow models (transformers flavor) on a real SQLite store: logged on a trial's run, registered,
loaded back by pyfunc, transformers and ``load_student``, and served by a real ``mlflow models serve``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils
from transformers import pipeline

from flexkd import demo
from flexkd.models import config_from_arch, model_class
from tuning import registry, tracking
from tuning.registry import register_student
from tuning.student_model import load_student, log_student

VENV_BIN = Path(sys.executable).parent
ARCH = {
    "classification": {"model_type": "bert", "num_attention_heads": 2, "max_position_embeddings": 128},
    "instruction": {
        "model_type": "llama",
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    },
}
TEXTS = ["the plot was good but the acting was not very dull", "the music felt bland"]
PROMPTS = [
    "### Instruction:\nwhich aspects were praised ?\n\n### Input:\nthe plot was good\n\n### Response:\n",
    "### Instruction:\nwhich aspects were praised ?\n\n### Input:\nthe cast was bad\n\n### Response:\n",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Student folders as flexkd saves them (config from an arch, labels from the demo), hidden 32, 2 layers."""
    root = tmp_path_factory.mktemp("students")
    out = {}
    for task, arch in ARCH.items():
        tok = demo.build_tokenizer(task)
        arch = {**arch, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}
        conf = config_from_arch(arch, tok, task, demo.LABELS)
        torch.manual_seed(0)
        model_class(task).from_config(conf).save_pretrained(root / task)
        tok.save_pretrained(root / task)
        out[task] = root / task
    return out


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_store(uri)
    return uri, tracking.ensure_experiment(uri, "students")


def global_store(monkeypatch, uri: str) -> None:
    """MLflow's process-global store -> ``uri`` for this test only (the variable, and the module globals that
    a call to ``mlflow.set_tracking_uri`` elsewhere in the session would leave ahead of it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)


def expected_labels(folder: Path, texts: list[str]) -> tuple[list[str], list[float]]:
    """The original folder's predictions: id2label of the argmax, and its softmax probability."""
    model, tok = (
        model_class("classification").from_pretrained(folder).eval(),
        demo.build_tokenizer("classification"),
    )
    with torch.no_grad():
        probs = model(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    best = probs.max(-1)
    return [model.config.id2label[int(i)] for i in best.indices], best.values.tolist()


def same_logits(model, folder: Path, task: str, texts: list[str]) -> bool:
    original = model_class(task).from_pretrained(folder).eval()
    batch = demo.build_tokenizer(task)(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return torch.allclose(model(**batch).logits, original(**batch).logits)


# ---------------------------------------------------------------------------------------------------------
# Classification and generation


def test_a_classifier_is_logged_registered_and_loaded_back(folders, store, monkeypatch):
    uri, experiment = store
    c = tracking.client(uri)
    run_id = tracking.start_child(uri, experiment, "parent", "t0", "trial-0", {"optim.lr": 0.001})
    c.log_metric(run_id, "val/accuracy", 0.5, step=10)
    c.log_metric(run_id, "val/accuracy", 0.75, step=20)

    model_uri = log_student(uri, run_id, folders["classification"], "classification", TEXTS, step=20)

    assert model_uri.startswith("models:/m-")
    assert c.get_run(run_id).info.status == "RUNNING"  # the caller ends it, not the logging
    logged = c.get_logged_model(model_uri.removeprefix("models:/"))
    assert (logged.experiment_id, logged.source_run_id, logged.name) == (experiment, run_id, "student")
    assert logged.params["optim.lr"] == "0.001"  # the Models tab shows which trial it is
    assert [o.model_id for o in c.get_run(run_id).outputs.model_outputs] == [logged.model_id]
    # The Models tab's metrics: the run's at the final step, not its history.
    assert [(m.key, m.value, m.step) for m in logged.metrics] == [("val/accuracy", 0.75, 20)]

    mv = register_student(uri, "student-cls", model_uri, tags={"objective": "val/accuracy"})
    c.set_registered_model_alias("student-cls", registry.CHAMPION, mv.version)
    assert (mv.run_id, mv.source) == (run_id, model_uri)
    assert json.loads(c.get_logged_model(logged.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "student-cls", "version": int(mv.version)}
    ]

    global_store(monkeypatch, uri)
    served = mlflow.pyfunc.load_model("models:/student-cls@champion")
    schema = served.metadata.signature.to_dict()
    assert json.loads(schema["inputs"]) == [{"type": "string", "required": True}]  # any one column, or a list
    assert [c["name"] for c in json.loads(schema["outputs"])] == ["label", "score"]
    labels, scores = expected_labels(folders["classification"], TEXTS)
    for data in (pd.DataFrame({"text": TEXTS}), TEXTS):
        out = served.predict(data)
        assert out["label"].tolist() == labels and set(labels) <= set(demo.LABELS)
        assert out["score"].tolist() == pytest.approx(scores, abs=1e-5)
    assert mlflow.transformers.load_model("models:/student-cls@champion").task == "text-classification"

    model, tok = load_student("models:/student-cls@champion", uri)
    assert (
        model.config.id2label == {0: "negative", 1: "positive"}
        and tok("good")["input_ids"][0] == tok.cls_token_id
    )
    assert same_logits(model, folders["classification"], "classification", TEXTS)


def test_a_causal_lm_generates_like_the_original_folder(folders, store, monkeypatch):
    uri, experiment = store
    c = tracking.client(uri)
    run_id = c.create_run(experiment).info.run_id

    model_uri = log_student(uri, run_id, folders["instruction"], "instruction", PROMPTS)
    mv = register_student(uri, "student-lm", model_uri)
    assert c.get_run(run_id).info.status == "RUNNING"

    global_store(monkeypatch, uri)
    served = mlflow.pyfunc.load_model(f"models:/student-lm/{mv.version}")
    defaults = {p.name: p.default for p in served.metadata.get_params_schema().params}
    assert defaults == {"max_new_tokens": 64, "do_sample": False, "return_full_text": False}
    reference = pipeline(
        "text-generation",
        model=model_class("instruction").from_pretrained(folders["instruction"]),
        tokenizer=demo.build_tokenizer("instruction"),
    )
    out = served.predict(pd.DataFrame({"text": PROMPTS}), params={"max_new_tokens": 6})
    want = [
        r[0]["generated_text"]
        for r in reference(PROMPTS, max_new_tokens=6, do_sample=False, return_full_text=False)
    ]
    assert out == want and all(isinstance(text, str) for text in out)
    # The defaults apply when a request names no params: greedy, the completion only.
    full = served.predict(PROMPTS)
    assert full == [
        r[0]["generated_text"]
        for r in reference(PROMPTS, max_new_tokens=64, do_sample=False, return_full_text=False)
    ]

    for ref in (f"models:/student-lm/{mv.version}", f"runs:/{run_id}/student", model_uri):
        model, _ = load_student(ref, uri)
        assert same_logits(model, folders["instruction"], "instruction", PROMPTS)


def test_logging_leaves_the_process_mlflow_state_alone(folders, store, tmp_path):
    """A process with its own global store and an active fluent run: log_student and load_student use the
    store they are given, and leave the global URI, its variable and the active run as they were."""
    uri, experiment = store
    run_id = tracking.client(uri).create_run(experiment).info.run_id
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    tracking.check_store(elsewhere)
    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        mlflow.set_tracking_uri(elsewhere)
        with mlflow.start_run() as active:
            model_uri = log_student(uri, run_id, folders["classification"], "classification", TEXTS[:1])
            assert mlflow.get_tracking_uri() == elsewhere and os.environ["MLFLOW_TRACKING_URI"] == elsewhere
            assert mlflow.active_run().info.run_id == active.info.run_id
            mv = register_student(uri, "student", model_uri)
            model, _ = load_student(f"models:/student/{mv.version}", uri)
            assert same_logits(model, folders["classification"], "classification", TEXTS)
        assert mlflow.MlflowClient(elsewhere).search_logged_models(["0"]) == []  # nothing landed there
        assert tracking.client(uri).get_run(run_id).info.status == "RUNNING"
    finally:
        mlflow.set_tracking_uri(None)
        if before_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


# ---------------------------------------------------------------------------------------------------------
# Serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_labels(folders, store, tmp_path):
    """`mlflow models serve` of the champion (20-30 s on 2 CPUs, most of it the server's start)."""
    uri, experiment = store
    run_id = tracking.client(uri).create_run(experiment).info.run_id
    model_uri = log_student(uri, run_id, folders["classification"], "classification", TEXTS)
    mv = register_student(uri, "student-srv", model_uri)
    tracking.client(uri).set_registered_model_alias("student-srv", registry.CHAMPION, mv.version)
    labels, _ = expected_labels(folders["classification"], TEXTS)

    port = free_port()
    # The server execs `uvicorn` by name: the venv's bin goes first on its PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/student-srv@champion"]
            + ["--env-manager", "local", "-p", str(port), "--host", "127.0.0.1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the CLI and the uvicorn it starts end together
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no answer in 90 s:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        split = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}
        for body in (split, {"inputs": TEXTS}):
            answer = requests.post(f"{url}/invocations", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
            assert [p["label"] for p in answer.json()["predictions"]] == labels
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_the_champion_moves_only_to_a_better_student(folders, store):
    """Three sweeps register into one model: the champion follows the objective, not the newest sweep; a
    resumed sweep registers nothing twice; the newest version is a sweep's best."""
    uri, exp = store
    c = tracking.client(uri)

    def rows(*values):
        out = []
        for v in values:
            run_id = c.create_run(exp).info.run_id
            model_uri = log_student(uri, run_id, folders["classification"], "classification", TEXTS)
            c.set_tag(run_id, tracking.STUDENT_URI_TAG, model_uri)
            out.append({"run_id": run_id, "val/accuracy": v, tracking.METHOD_TAG: "flexkd+kd", "trial": 0})
        return out

    def champion():
        return c.get_model_version_by_alias("m", registry.CHAMPION)

    first = rows(0.80, 0.75)
    a = registry.register(uri, "m", first, "val/accuracy", "max", "a-1")
    assert a["champion_moved"] and champion().run_id == first[0]["run_id"]
    assert champion().tags["val/accuracy"] == "0.8" and champion().tags["method"] == "flexkd+kd"
    assert c.get_model_version_by_alias("m", "sweep-a-1").run_id == first[0]["run_id"]
    latest = max(c.search_model_versions("name='m'"), key=lambda v: int(v.version))
    assert latest.run_id == first[0]["run_id"]  # registered worst first: "latest" is the best
    worse = rows(0.70)
    b = registry.register(uri, "m", worse, "val/accuracy", "max", "b-1")
    assert not b["champion_moved"] and "stays version" in b["note"]
    assert champion().run_id == first[0]["run_id"]
    assert c.get_model_version_by_alias("m", "sweep-b-1").run_id == worse[0]["run_id"]
    count = len(c.search_model_versions("name='m'"))
    again = registry.register(uri, "m", worse, "val/accuracy", "max", "b-1")  # a resumed sweep
    assert len(c.search_model_versions("name='m'")) == count and again["versions"] == b["versions"]
    best = rows(0.90)
    registry.register(uri, "m", best, "val/accuracy", "max", "c-1")
    assert champion().run_id == best[0]["run_id"]
    model, _ = registry.load_registered("models:/m@champion", uri=uri)  # the transformers objects
    assert model.config.id2label[0] == demo.LABELS[0]
