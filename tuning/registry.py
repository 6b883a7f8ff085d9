"""The registry's half of a sweep's records: registered models, their versions and aliases.

Each registered model holds the students of one name (``tracking.register_as``, default ``flexkd-<sweep>``);
each version is one trial's logged student (``student_model.log_student``), tagged with its objective, method,
sweep and trial. Aliases: ``champion`` (the best on its objective so far: moves only when a sweep beats it),
``sweep-<run name>`` (that sweep's best) and ``pareto-<k>`` (the latest multi-objective sweep's front).

A create whose answer is lost is sent again (MLflow's HTTP layer retries POSTs): the registered model that
exists is used, and a version's copies are found by the create's id (``CREATE_TAG``) and deleted.
"""

from __future__ import annotations

import json
import re
import uuid

from tuning.student_model import load_student, store_uri
from tuning.tracking import CREATE_TAG, METHOD_TAG, STUDENT_URI_TAG, client, tracking_uri

CHAMPION = "champion"


def alias_for(text: str) -> str:
    """An MLflow alias from a sweep's run name (letters, digits, '-' and '_'; 'latest' and 'vN' are reserved)."""
    return "sweep-" + re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:200]


def better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def ensure_registered_model(uri: str, name: str, description: str | None = None) -> None:
    """The registered model ``name``, made when absent; one that exists when the create arrives (made by a
    sweep beside this one, or by this request's first copy whose answer was lost) is used."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        c.create_registered_model(name, description=description)
    except MlflowException:
        c.get_registered_model(name)  # raises the store's own error when it is still absent


def register_student(
    uri: str, name: str, model_uri: str, tags: dict[str, str] | None = None, description: str | None = None
):
    """A new version of registered model ``name`` (made if missing) from ``log_student``'s ``models:/<model_id>``,
    with ``tags`` and ``description``, made once however often the request is sent; returns the ``ModelVersion``.

    The version's source is the logged model's URI, and it names the model's id and its run: the registry links
    it to the run (the version's Source run), a tracking server accepts it (a ``models:/<id>`` source without
    ``model_id`` it refuses: "Invalid model version source"), and the logged model's ``mlflow.modelVersions``
    tag, from which the UI links the model to its versions, lists it (a server sets that tag itself; an embedded
    store does not).
    """
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    c = client(uri)
    model_id = model_uri.removeprefix("models:/")
    logged = c.get_logged_model(model_id)
    ensure_registered_model(uri, name)
    made = uuid.uuid4().hex
    with store_uri(uri):  # the SQLite registry looks a models:/<id> source up through the global store
        mv = c.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=logged.source_run_id,
            model_id=model_id,
            tags={**(tags or {}), CREATE_TAG: made},
            description=description,
        )
    # A resent create made more than one version: the one returned stays, its twins go (from the logged
    # model's list of versions too, where a server put them).
    twins = {
        str(v.version)
        for v in c.search_model_versions(f"name='{name}' and run_id='{logged.source_run_id}'")
        if v.tags.get(CREATE_TAG) == made and str(v.version) != str(mv.version)
    }
    for version in twins:
        c.delete_model_version(name, version)
    c.delete_model_version_tag(name, mv.version, CREATE_TAG)  # the version's tags: what a user compares
    before = json.loads(c.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    listed = [e for e in before if not (e.get("name") == name and str(e.get("version")) in twins)]
    if not any(e.get("name") == name and str(e.get("version")) == str(mv.version) for e in listed):
        # The server's own entries carry the version as an int.
        listed.append({"name": name, "version": int(mv.version)})
    if listed != before:
        c.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})
    return mv


def register(
    uri: str,
    name: str,
    best: list[dict],
    metric: str,
    mode: str,
    sweep_run: str,
    goals: list[tuple[str, str]] | None = None,
) -> dict:
    """Register the students of ``best`` (leaderboard rows, best first) as versions of ``name``.

    ``goals`` (several objectives, (metric, mode) each, the first = ``metric``): ``best`` is the Pareto front
    in order of the first objective; each version is tagged with every objective's value and
    ``pareto_rank``, and the aliases ``pareto-1``, ``pareto-2`` ... point at the front in that order (the
    latest multi-objective sweep registered under ``name``: aliases of a longer earlier front are removed).

    - Versions are created worst first, so the newest version ("latest" in the UI) is the sweep's best.
    - Each version carries its objective (``objective`` = the metric, the metric itself = the value), method,
      sweep and trial as tags, and says so in its description.
    - ``sweep-<sweep run name>`` points at this sweep's best, whatever it is worth.
    - ``champion`` moves only to a student that beats the current champion on the same objective (and is
      set when there is none, or when the current one was measured on another objective: then the note says so).
    - A run registered before (``--resume`` of a finished sweep) is never registered again: its version is reused.
    """
    from mlflow.exceptions import MlflowException

    c = client(uri)
    ensure_registered_model(
        uri,
        name,
        "Students distilled by flexkd. Aliases: 'champion' = the best on its objective so far (moves "
        "only when a sweep beats it); 'sweep-' + a sweep's run name = that sweep's best; 'pareto-<k>' = the "
        "k-th member of the latest multi-objective sweep's Pareto front, in order of its first objective. "
        "Version tags: objective, its value (every objective's with several), method, sweep, trial.",
    )
    existing = {v.run_id: v for v in c.search_model_versions(f"name='{name}'")}
    numbers = {}
    for rank, row in reversed(list(enumerate(best, 1))):
        if row["run_id"] in existing:
            numbers[row["run_id"]] = str(existing[row["run_id"]].version)
            continue
        run = c.get_run(row["run_id"])
        value = row[metric]
        tags = {
            "objective": metric,
            metric: f"{value:.6g}",
            "mode": mode,
            "method": row.get(METHOD_TAG, ""),
            "sweep": sweep_run,
            "trial": str(row.get("trial", "")),
            "rank_in_sweep": str(rank),
        }
        if goals:
            tags.update({m: f"{row[m]:.6g}" for m, _ in goals})
            tags["objectives"] = ", ".join(f"{md} {m}" for m, md in goals)
            tags["pareto_rank"] = str(rank)
        mv = register_student(
            uri,
            name,
            run.data.tags[STUDENT_URI_TAG],
            tags=tags,
            description=(
                f"{row.get(METHOD_TAG, '')} student, {metric} {value:.4f} (rank {rank} of sweep {sweep_run}, "
                f"trial {row.get('trial', '')})"
            ),
        )
        numbers[row["run_id"]] = str(mv.version)
    top = best[0]
    version = numbers[top["run_id"]]
    sweep_alias = alias_for(sweep_run)
    c.set_registered_model_alias(name, sweep_alias, version)
    try:
        current = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is None:
        move, note = True, f"champion -> version {version} (the first)"
    elif str(current.version) == version:
        move, note = False, f"champion stays version {version} (this sweep's best, already champion)"
    elif current.tags.get("objective") != metric or metric not in current.tags:
        move, note = (
            True,
            (
                f"champion -> version {version}; the previous champion (version {current.version}) was measured on "
                f"{current.tags.get('objective', 'an unknown objective')}, not {metric}"
            ),
        )
    elif better(top[metric], float(current.tags[metric]), mode):
        move, note = (
            True,
            (
                f"champion -> version {version} ({metric} {top[metric]:.4f} beats version {current.version}'s "
                f"{float(current.tags[metric]):.4f})"
            ),
        )
    else:
        move, note = (
            False,
            (
                f"champion stays version {current.version} ({metric} {float(current.tags[metric]):.4f}; this sweep's "
                f"best, version {version}, has {top[metric]:.4f})"
            ),
        )
    if move:
        c.set_registered_model_alias(name, CHAMPION, version)
    versions_ = [numbers[r["run_id"]] for r in best]
    pareto_aliases = []
    if goals:
        for k, number in enumerate(versions_, 1):
            c.set_registered_model_alias(name, f"pareto-{k}", number)
            pareto_aliases.append(f"pareto-{k}")
        stale = {a for v in c.search_model_versions(f"name='{name}'") for a in v.aliases}
        for alias in sorted(stale):
            if alias.startswith("pareto-") and alias not in pareto_aliases:
                c.delete_registered_model_alias(name, alias)
    return {
        "name": name,
        "versions": versions_,
        "best": version,
        "sweep_alias": sweep_alias,
        "champion_moved": move,
        "note": note,
        "pareto_aliases": pareto_aliases,
    }


def load_registered(model_uri: str, uri: str | None = None):
    """``models:/NAME@champion`` (or ``models:/NAME/3``, ``runs:/<run>/student``) -> (model, tokenizer), the
    transformers objects of a registered student.

    uri: the tracking store (default: the one the sweeps use, ``tracking_uri()``: run it from the folder the
    sweep ran in, or set ``MLFLOW_TRACKING_URI``). MLflow itself would resolve ``models:/`` through its global
    registry URI, which defaults to ``./mlflow.db``, not flexkd's store.
    """
    return load_student(model_uri, uri or tracking_uri())
