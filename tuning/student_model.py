"""A trained student as an MLflow model, which the registry, ``mlflow.pyfunc``, ``mlflow models serve`` and the
UI's Models tab understand (a raw Hugging Face folder of run artifacts they do not).

The student is logged with MLflow's transformers flavor, as a pipeline ("text-classification" for the
classification task, "text-generation" for the generation tasks), on the trial's run, named ``student``:

- it is a *logged model* (MLflow 3): its files live under the experiment's ``models/<model_id>/artifacts``, not
  among the run's artifacts; the run lists it among its outputs, and it carries the run's params (and the run's
  metrics at ``step``), so the Models tab shows which trial it is;
- signature: input one string column (``text`` in the example; a list of strings works too), output ``label``
  (a name from the config's ``id2label``) and ``score`` for a classifier, the generated text without the prompt
  for a causal LM; its generation settings are params with defaults (``GENERATION_PARAMS``) that a ``predict``
  call or a serving request's ``params`` may override;
- the input example is the texts given; MLflow runs it through the model once while logging (a check that
  serving will work) and keeps it as the serving example.

MLflow 3.17 resolves ``models:/`` and ``runs:/`` URIs through the process-global tracking/registry URI, whatever
store a client or ``download_artifacts(tracking_uri=...)`` names; so does the SQLite registry when it registers a
``models:/<model_id>`` source. This module resolves against the ``uri`` it is given, and points the global URI
at it only for the calls that need it (``store_uri``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STUDENT = "student"  # the logged model's name (tracking.STUDENT_ARTIFACT)
PIPELINE_TASKS = {"classification": "text-classification"}  # every other flexkd task generates
# name, MLflow param type, default. Greedy and prompt-free by default: what flexkd's own evaluation generates.
GENERATION_PARAMS = [
    ("max_new_tokens", "long", 64),
    ("do_sample", "boolean", False),
    ("return_full_text", "boolean", False),
]
REQUIREMENTS = ("mlflow", "torch", "transformers")


def pipeline_task(task: str) -> str:
    """The transformers pipeline of a flexkd task (flexkd.data: classification, instruction, summarization)."""
    return PIPELINE_TASKS.get(task, "text-generation")


def pip_requirements() -> list[str]:
    """Pinned to this environment. Given explicitly: MLflow would otherwise work out the transformers flavor's
    defaults, which in 3.17 import torchvision (an error where it is not installed) and infer the rest by
    loading the model again in a subprocess."""
    from importlib.metadata import version

    # A local label ("2.13.0+cpu") names a wheel on PyTorch's own index, which a serving env cannot install
    # from PyPI; the plain version installs the build that fits the serving machine.
    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in REQUIREMENTS]


def signature(task: str):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # Unnamed: a named column ("text") would refuse a plain list of strings, and {"inputs": [...]} with it.
    inputs = Schema([ColSpec("string")])
    if pipeline_task(task) == "text-classification":
        return ModelSignature(inputs, Schema([ColSpec("string", "label"), ColSpec("double", "score")]))
    params = ParamSchema([ParamSpec(name, kind, default) for name, kind, default in GENERATION_PARAMS])
    return ModelSignature(inputs, Schema([ColSpec("string")]), params)


@contextlib.contextmanager
def store_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking URI at ``uri`` for a block, then restore it exactly.

    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI``, and setting the URI back to "unset" deletes
    the variable, even when the variable was what had set it: both are saved and put back. Not thread-safe
    (the URI is global); a trial driver logs from one thread.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, before_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


# ---------------------------------------------------------------------------------------------------------
# Logging and registering


def log_student(
    uri: str, run_id: str, folder: str | Path, task: str, example_texts: list[str], *, step: int = 0
) -> str:
    """Log the student folder (``save_pretrained`` of the task's model class, with its tokenizer) as the MLflow
    model ``student`` of run ``run_id`` in the store ``uri``; returns its URI, ``models:/<model_id>``, the
    source to register (``registry.register_student``).

    example_texts: 2-3 inputs, the model's input example. step: the run's metrics at this step are linked to
    the model (the Models tab shows them); pass the final step, after logging the final metrics.

    No fluent run is started (its exit would set the run FINISHED): the run stays RUNNING for the caller to
    end, and other runs of this process, active or not, are left alone.
    """
    import logging

    import mlflow
    import pandas as pd
    from huggingface_hub import ModelCard
    from mlflow.entities import LoggedModelOutput, Metric

    # "Failed to resolve installed pip version" per logged model (a uv-made venv has no pip): not the user's
    # business, the requirements are pinned below.
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
    from transformers import AutoTokenizer, pipeline

    from flexkd.models import model_class

    from . import tracking

    c = tracking.client(uri)
    run = c.get_run(run_id)
    model = model_class(task).from_pretrained(str(folder))
    pipe = pipeline(pipeline_task(task), model=model, tokenizer=AutoTokenizer.from_pretrained(str(folder)))
    # Created here rather than by log_model, which would file it under the process's active experiment (the
    # default one, "0"), not the run's.
    made = uuid.uuid4().hex
    logged = c.create_logged_model(
        run.info.experiment_id,
        name=STUDENT,
        source_run_id=run_id,
        params=dict(run.data.params),
        tags={"flexkd.task": task, tracking.CREATE_TAG: made},
    )
    # A resent create (its answer lost) made a twin that would wait PENDING in the Models tab for ever.
    for twin in c.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"tags.`{tracking.CREATE_TAG}` = '{made}'"
    ):
        if twin.model_id != logged.model_id:
            c.delete_logged_model(twin.model_id)
    c.delete_logged_model_tag(logged.model_id, tracking.CREATE_TAG)
    card = ModelCard(  # given, so that MLflow does not try the folder's path as a Hub repo for card and license
        f"---\nlibrary_name: transformers\ntags: [flexkd]\n---\n# flexkd student\n\nTask {task}, run {run_id}.\n"
    )

    def upload():
        # No run_id: log_model would link the run to the model (its outputs, its metrics at `step`) on every
        # try, and a try cut mid-upload would leave the run listing the model twice; linked once below. In a
        # thread of its own, where no fluent run is active, since log_model falls back to the caller's.
        with store_uri(uri), ThreadPoolExecutor(1) as pool:  # log_model writes through the global store
            return pool.submit(
                mlflow.transformers.log_model,
                pipe,
                name=STUDENT,
                model_id=logged.model_id,
                task=pipeline_task(task),
                signature=signature(task),
                input_example=pd.DataFrame({"text": list(example_texts)}) if example_texts else None,
                pip_requirements=pip_requirements(),
                model_card=card,
            ).result()

    # An upload cut by an outage is tried again into the same logged model (log_model marks it FAILED, then
    # READY once a try goes through), so no FAILED or PENDING copy is left in the Models tab.
    info = tracking.retrying(upload, "uploading the student model", uri)
    c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    linked = [
        Metric(m.key, m.value, m.timestamp, m.step, logged.model_id, m.dataset_name, m.dataset_digest, run_id)
        for key in c.get_run(run_id).data.metrics
        for m in c.get_metric_history(run_id, key)
        if m.step == step and m.model_id is None
    ]
    if linked:  # the run's metrics at `step` are the model's in the Models tab
        c.log_batch(run_id, metrics=linked)
    return info.model_uri


# ---------------------------------------------------------------------------------------------------------
# Loading


def model_location(model_uri: str, uri: str) -> str:
    """Where the files of a student model are: ``models:/NAME@alias``, ``models:/NAME/VERSION``,
    ``models:/<model_id>`` or ``runs:/<run_id>/<name>`` (the run's newest logged model of that name), resolved
    against the store ``uri``."""
    from . import tracking

    c = tracking.client(uri)
    if model_uri.startswith("models:/"):
        ref = model_uri.removeprefix("models:/").strip("/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return c.get_model_version_download_uri(name, c.get_model_version_by_alias(name, alias).version)
        if "/" in ref:
            name, version = ref.split("/", 1)
            return c.get_model_version_download_uri(name, version)
        return c.get_logged_model(ref).artifact_location
    if model_uri.startswith("runs:/"):
        run_id, _, name = model_uri.removeprefix("runs:/").partition("/")
        found = c.search_logged_models(
            [c.get_run(run_id).info.experiment_id],
            filter_string=f"name = '{name}' AND source_run_id = '{run_id}'",
            order_by=[{"field_name": "creation_time", "ascending": False}],
            max_results=1,
        )
        if found:
            return found[0].artifact_location
    return model_uri  # run artifacts, or any artifact URI


def load_student(model_uri: str, uri: str):
    """A student logged by ``log_student`` (any URI ``model_location`` takes), resolved against the store
    ``uri`` rather than the process-global one -> (model, tokenizer), the model in eval mode."""
    import mlflow

    location = model_location(model_uri, uri)
    if Path(location).is_absolute() and Path(location).is_dir():
        local = location  # an embedded store's own folder: read in place, no copy
    else:
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=uri)
    if not Path(local, "MLmodel").exists():
        raise ValueError(
            f"{model_uri} is not an MLflow model (a raw student folder, registered before students were logged "
            f"as MLflow models?): download it with mlflow.artifacts.download_artifacts and from_pretrained the folder"
        )
    parts = mlflow.transformers.load_model(local, return_type="components")
    return parts["model"].eval(), parts["tokenizer"]
