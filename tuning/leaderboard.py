"""After a sweep's trials: reconcile MLflow statuses with what Tune did, then the leaderboard, ``best.yaml``,
Optuna's plots, the registered best students, and the summary printed at the end of `flexkd sweep`.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from flexkd import artifacts
from tuning import tracking
from tuning.space import SweepSpec

if TYPE_CHECKING:
    from tuning.sweep import SweepContext


def _stopped(record: str) -> set[str]:
    path = Path(record)
    return (
        {json.loads(line)["trial_id"] for line in path.read_text().splitlines()} if path.exists() else set()
    )


def finish(context: SweepContext, grid, stopped_record: str, home: Path, quiet: bool = False) -> dict:
    """Everything after the trials; ``home`` is the local folder that gets ``<sweep>-leaderboard.csv`` and
    ``<sweep>-best.yaml``. Returns the summary (leaderboard rows, best trial, registered versions, files)."""
    spec, uri = context.spec, context.uri
    c = tracking.client(uri)
    stopped = _stopped(stopped_record)
    errors = {r.metrics.get("trial_id") if r.metrics else None: r.error for r in grid if r.error}
    metric_key = f"final/{spec.objective.metric}"
    known = {Path(r.path).name.removeprefix("trial-") for r in grid}
    rows = []
    for run in tracking.children(uri, context.parent_id, context.experiment_id):
        trial_id = run.data.tags.get(tracking.TRIAL_TAG)
        if trial_id not in known:
            # Started by a driver that died before Tune saved its state: Tune ran that trial again under a
            # new id, so this half-written run goes (one run per trial in MLflow, never two).
            c.delete_run(run.info.run_id)
            continue
        status = run.info.status
        if trial_id in stopped and status != "FINISHED":
            # ASHA ended the trial's process; whatever that process managed to record on its way out (an
            # error from its Train run being torn down, say) is a consequence, not a failure.
            c.set_tag(run.info.run_id, tracking.EARLY_STOPPED_TAG, "true")
            if "flexkd.error" in run.data.tags:
                c.delete_tag(run.info.run_id, "flexkd.error")
            c.set_terminated(run.info.run_id, "KILLED")
            status = "KILLED"
        elif status == "RUNNING":
            # The trial's process ended without closing its run and nobody stopped it: it died.
            error = str(errors.get(trial_id) or "the trial ended without finishing")
            tracking.fail_child(uri, run.info.run_id, error)
            status = "FAILED"
        run = c.get_run(run.info.run_id)
        rows.append(
            {
                "trial_id": trial_id,
                "run_id": run.info.run_id,
                "status": status,
                "early_stopped": status == "KILLED",
                spec.objective.metric: run.data.metrics.get(
                    metric_key, run.data.metrics.get(spec.objective.metric)
                ),
                **{k.removeprefix("sweep."): v for k, v in run.data.params.items() if k.startswith("sweep.")},
            }
        )
    sign = -1 if spec.objective.mode == "max" else 1
    finished = [r for r in rows if r["status"] == "FINISHED" and r[spec.objective.metric] is not None]
    finished.sort(key=lambda r: sign * r[spec.objective.metric])
    rows.sort(key=lambda r: (r["status"] != "FINISHED", sign * (r[spec.objective.metric] or 0)))
    files = {"leaderboard.csv": _csv(rows)}
    summary = {
        "leaderboard": rows,
        "parent_run_id": context.parent_id,
        "experiment_id": context.experiment_id,
    }
    if finished:
        best = finished[0]
        best_cfg = _best_config(c, best["run_id"], spec.name)
        files["best.yaml"] = best_cfg
        summary["best"] = best
        tracking.log_metrics(
            uri, context.parent_id, {f"best/{spec.objective.metric}": best[spec.objective.metric]}, 0
        )
        c.set_tag(context.parent_id, "flexkd.best_run_id", best["run_id"])
    for name, text in files.items():
        c.log_text(context.parent_id, text, name)
    _log_plots(c, context, rows)
    logged = [
        r["run_id"]
        for r in finished
        if c.get_run(r["run_id"]).data.tags.get("flexkd.student_logged") == "true"
    ]
    top = logged[: spec.tracking.register_top]
    if top:
        name = spec.tracking.register_as or f"flexkd-{spec.name}"
        summary["registered"] = {"name": name, "versions": tracking.register(uri, name, top)}
    c.set_terminated(context.parent_id, "FINISHED")
    out = home / f"{spec.name}-leaderboard.csv"
    out.write_text(files["leaderboard.csv"])
    if "best.yaml" in files:
        (home / f"{spec.name}-best.yaml").write_text(files["best.yaml"])
    summary["files"] = {"leaderboard": str(out), "best": str(home / f"{spec.name}-best.yaml")}
    if not quiet:
        print_summary(summary, spec, uri)
    return summary


def _best_config(c, run_id: str, sweep_name: str) -> str:
    """The best trial's resolved config, made rerunnable: its own name and the default output folder."""
    import mlflow

    folder = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifacts.CONFIG, tracking_uri=c.tracking_uri
    )
    data = yaml.safe_load(Path(folder).read_text())
    data["run"]["name"] = f"{sweep_name}-best"
    data["run"]["output_dir"] = ""
    return (
        f"# The best trial of sweep {sweep_name} (MLflow run {run_id}). Rerun: flexkd train <this file>\n"
        + yaml.safe_dump(data, sort_keys=False)
    )


def _csv(rows: list[dict]) -> str:
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _log_plots(c, context: SweepContext, rows: list[dict]) -> None:
    """Optuna's importance, history and parallel-coordinate plots (matplotlib PNGs) on the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as plots

    spec = context.spec
    study = optuna.create_study(direction="maximize" if spec.objective.mode == "max" else "minimize")
    dists = _distributions(spec)
    for row in rows:
        value = row[spec.objective.metric]
        if row["status"] != "FINISHED" or value is None:
            continue
        params = {}
        for name, dist in dists.items():
            if name in row and row[name] not in (None, ""):
                raw = row[name]
                params[name] = (
                    raw if isinstance(dist, optuna.distributions.CategoricalDistribution) else float(raw)
                )
                if isinstance(dist, optuna.distributions.IntDistribution):
                    params[name] = int(float(raw))
                if isinstance(dist, optuna.distributions.CategoricalDistribution):
                    params[name] = next((ch for ch in dist.choices if str(ch) == str(raw)), raw)
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params}, value=value)
        )
    notes = []
    for name, draw in (
        ("param_importances.png", plots.plot_param_importances),
        ("optimization_history.png", plots.plot_optimization_history),
        ("parallel_coordinate.png", plots.plot_parallel_coordinate),
    ):
        try:
            # optuna's matplotlib plots are 'experimental', and small studies warn: not the user's business
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(10, 6)
            figure.tight_layout()
            c.log_figure(context.parent_id, figure, f"plots/{name}")
            matplotlib.pyplot.close(figure)
        except Exception as err:  # optuna refuses some plots (e.g. importances of fewer than 2 trials)
            notes.append(f"{name}: not drawn ({type(err).__name__}: {err})")
    if notes:
        c.log_text(context.parent_id, "\n".join(notes) + "\n", "plots/NOTES.txt")


def _distributions(spec: SweepSpec) -> dict:
    import optuna.distributions as d

    out = {}
    for p in spec.params:
        if p.kind in ("choice", "bundles"):
            out[p.name] = d.CategoricalDistribution(list(p.args))
        elif p.kind == "int":
            out[p.name] = d.IntDistribution(p.args[0], p.args[1], step=int(p.step or 1), log=p.log)
        else:
            out[p.name] = d.FloatDistribution(p.args[0], p.args[1], log=p.kind == "loguniform" or p.log)
    return out


def print_summary(summary: dict, spec: SweepSpec, uri: str) -> None:
    """The leaderboard (best first), where the best config went, the registered champion, the UI command."""
    metric = spec.objective.metric
    names = [p.name for p in spec.params]
    table = [["#", "trial", "status", metric, "parameters"]]
    for i, r in enumerate(summary["leaderboard"], 1):
        status = "stopped early" if r["early_stopped"] else r["status"].lower()
        value = r[metric]
        params = " ".join(f"{n}={_short(r[n])}" for n in names if r.get(n) not in (None, ""))
        table.append(
            [str(i), r["trial_id"], status, f"{value:.4f}" if isinstance(value, float) else "-", params]
        )
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    print()
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    print()
    if "best" in summary:
        best = summary["best"]
        print(f"best trial: {best['trial_id']} ({metric} {best[metric]:.4f}), MLflow run {best['run_id']}")
        print(f"best config: {summary['files']['best']}  (rerun: flexkd train {summary['files']['best']})")
    if "registered" in summary:
        reg = summary["registered"]
        versions = ", ".join(str(v) for v in reg["versions"])
        print(f"registered: models:/{reg['name']}@{tracking.CHAMPION} (versions {versions})")
    print(f"MLflow UI: {tracking.ui_command(uri)}")


def _short(value) -> str:
    text = str(value)
    try:
        number = float(text)
        return f"{number:.3g}" if "." in text or "e" in text else text
    except ValueError:
        return text[:24]
