"""After a sweep's trials: reconcile MLflow statuses with what Tune did, then the leaderboard, ``best.yaml``,
Optuna's plots, the registered best students, and the summary printed at the end of `flexkd sweep`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from flexkd import artifacts
from flexkd.storage import Store
from tuning import plots, registry, tracking
from tuning.space import SweepSpec

if TYPE_CHECKING:
    from tuning.sweep import SweepContext


def finish(context: SweepContext, grid, stopped_record: str, files: Store, quiet: bool = False) -> dict:
    """Everything after the trials; ``files`` is where ``<sweep>-leaderboard.csv`` and ``<sweep>-best.yaml``
    go (the sweep's storage). Returns the summary (leaderboard rows, best trial, registered versions, files)."""
    from tuning.sweep import NUMBER_KEY, close_stopped, stopped_trials

    spec, uri = context.spec, context.uri
    metric = spec.objective.metric
    c = tracking.client(uri)
    stopped = stopped_trials(stopped_record)
    results = {Path(r.path).name.removeprefix("trial-"): r for r in grid}
    record_missing(context, results)
    rows, records = [], []
    for run in tracking.children(uri, context.parent_id, context.experiment_id):
        trial_id = run.data.tags.get(tracking.TRIAL_TAG)
        if trial_id not in results:
            # Started by a driver that died before Tune saved its state: Tune ran that trial again under a
            # new id, so this half-written run goes (one run per trial in MLflow, never two).
            c.delete_run(run.info.run_id)
            continue
        if trial_id in stopped:
            close_stopped(context, stopped_record, trial_id)  # idempotent; the callback did it as it happened
        elif run.info.status == "RUNNING":
            # The trial's process ended without closing its run and nobody stopped it: it died.
            result = results[trial_id]
            tracking.fail_child(
                uri, run.info.run_id, str(result.error or "the trial ended without finishing")
            )
        run = c.get_run(run.info.run_id)
        outcome = run.data.tags.get(
            tracking.OUTCOME_TAG, "completed" if run.info.status == "FINISHED" else "failed"
        )
        config = results[trial_id].config or {}
        number = int(run.data.tags.get(tracking.NUMBER_TAG, config.get(NUMBER_KEY, -1)))
        sampled = {k: v for k, v in config.items() if k != NUMBER_KEY}
        history = [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, metric)]
        value = run.data.metrics.get(metric)
        rows.append(
            {
                "trial": number,
                "trial_id": trial_id,
                "run_id": run.info.run_id,
                tracking.METHOD_TAG: run.data.tags.get(tracking.METHOD_TAG, ""),  # beside a sampled `method`
                "status": outcome,
                "early_stopped": outcome == "stopped_early",
                metric: value,
                **{g.metric: run.data.metrics.get(g.metric) for g in spec.goals[1:]},
                "steps": max((s for s, _ in history), default=0),
                "seconds": round(
                    ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000, 1
                ),
                **sampled,
            }
        )
        state = {"completed": "finished", "stopped_early": "stopped"}.get(outcome, "failed")
        records.append(plots.TrialRecord(number, trial_id, state, value, sampled, sorted(history)))
    sign = -1 if spec.objective.mode == "max" else 1
    finished = [r for r in rows if r["status"] == "completed" and r[metric] is not None]
    finished.sort(key=lambda r: sign * r[metric])
    order = {"completed": 0, "stopped_early": 1}
    rows.sort(key=lambda r: (order.get(r["status"], 2), sign * (r[metric] if r[metric] is not None else 0)))
    summary = {
        "leaderboard": rows,
        "parent_run_id": context.parent_id,
        "experiment_id": context.experiment_id,
    }
    artifacts_ = {}
    if spec.multi:
        summary["front"] = mark_front(c, spec, rows)
        last = len(rows) + 1  # (inside sort's key the list reads as empty)
        rows.sort(key=lambda r: r.get("pareto") or last)  # the front first, in its order; the rest as before
        finished = summary["front"]  # what gets a config, a registered version and an alias
        artifacts_["pareto.csv"] = _csv(summary["front"])
        for r in finished:
            artifacts_[f"pareto/best-{r['pareto']}.yaml"] = _best_config(
                c, r["run_id"], f"{spec.name}-pareto-{r['pareto']}"
            )
    artifacts_["leaderboard.csv"] = _csv(rows)
    if finished:
        best = finished[0]
        if not spec.multi:
            artifacts_["best.yaml"] = _best_config(c, best["run_id"], spec.name)
        summary["best"] = best
        tracking.log_metrics(uri, context.parent_id, {f"best/{metric}": best[metric]}, 0)
        c.set_tag(context.parent_id, "flexkd.best_run_id", best["run_id"])
    for name, text in artifacts_.items():
        c.log_text(context.parent_id, text, name)
    drawn = plots.draw(records, _distributions(spec), metric, spec.objective.mode)
    if spec.multi:
        drawn.update(plots.draw_front(rows, [(g.metric, g.mode) for g in spec.goals], _distributions(spec)))
    for name, content in drawn.items():
        _log_bytes(c, context.parent_id, name, content)
    logged = [r for r in finished if c.get_run(r["run_id"]).data.tags.get(tracking.STUDENT_URI_TAG)]
    # One objective: the best register_top. Several: every Pareto-optimal student (register_top 0: none).
    top = logged if spec.multi and spec.tracking.register_top > 0 else logged[: spec.tracking.register_top]
    if top:
        name = spec.tracking.register_as or f"flexkd-{spec.name}"
        summary["registered"] = registry.register(
            uri,
            name,
            top,
            metric,
            spec.objective.mode,
            c.get_run(context.parent_id).info.run_name,
            goals=[(g.metric, g.mode) for g in spec.goals] if spec.multi else None,
        )
    board_name, best_name = f"{spec.name}-leaderboard.csv", f"{spec.name}-best.yaml"
    files.write(artifacts_["leaderboard.csv"].encode(), board_name)
    summary["files"] = {"leaderboard": files.path(board_name), "best": files.path(best_name)}
    if "best.yaml" in artifacts_:
        files.write(artifacts_["best.yaml"].encode(), best_name)
    if spec.multi:
        summary["files"]["front"] = []
        for r in summary["front"]:
            member = f"{spec.name}-best-{r['pareto']}.yaml"
            files.write(artifacts_[f"pareto/best-{r['pareto']}.yaml"].encode(), member)
            summary["files"]["front"].append(files.path(member))
        if summary["front"]:
            summary["files"]["best"] = summary["files"]["front"][0]
    c.set_tag(context.parent_id, tracking.NOTE_TAG, description(summary, spec))
    c.set_terminated(context.parent_id, "FINISHED")
    if not quiet:
        print_summary(summary, spec, uri)
    return summary


def mark_front(c, spec: SweepSpec, rows: list[dict]) -> list[dict]:
    """Several objectives: the completed trials no other completed trial dominates (tuning/pareto.py),
    ordered by the first objective and numbered ``pareto`` = 1, 2, ...; every completed run is tagged
    ``flexkd.pareto_front`` true or false (and front members ``flexkd.pareto_rank``)."""
    from tuning.pareto import front

    metrics, modes = [g.metric for g in spec.goals], [g.mode for g in spec.goals]
    points = {
        r["run_id"]: [float(r[m]) for m in metrics]
        for r in rows
        if r["status"] == "completed" and all(isinstance(r.get(m), (int, float)) for m in metrics)
    }
    members = front(points, modes)
    rank = {run_id: k for k, run_id in enumerate(members, 1)}
    for r in rows:
        r["pareto"] = rank.get(r["run_id"])
        if r["run_id"] in points:
            tags = {"flexkd.pareto_front": str(r["run_id"] in rank).lower()}
            if r["run_id"] in rank:
                tags["flexkd.pareto_rank"] = str(rank[r["run_id"]])
            tracking.set_tags(c.tracking_uri, r["run_id"], tags)
    return sorted((r for r in rows if r["pareto"]), key=lambda r: r["pareto"])


def record_missing(context: SweepContext, results: dict) -> list[str]:
    """A trial Tune ran whose process could not open its run (the tracking store was down past the wait
    budget): the driver records it now, FAILED, with what Tune kept of it (its config, its last reported
    metrics and its error), so that no trial is silently absent. Returns the trial ids it recorded."""
    from tuning.space import trial_config
    from tuning.sweep import NUMBER_KEY, open_trial_run

    uri = context.uri
    have = {
        run.data.tags.get(tracking.TRIAL_TAG)
        for run in tracking.children(uri, context.parent_id, context.experiment_id)
    }
    added = []
    for trial_id, result in results.items():
        if trial_id in have:
            continue
        config = result.config or {}
        number = int(config.get(NUMBER_KEY, -1))
        sampled = {k: v for k, v in config.items() if k != NUMBER_KEY}
        cfg = trial_config(context.spec, sampled, run_name=f"{context.spec.name}-{trial_id}")
        run_id = open_trial_run(context, cfg, number, sampled, trial_id, {"flexkd.recorded_by": "driver"})
        reported = {
            k: float(v)
            for k, v in (result.metrics or {}).items()
            if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if reported:
            tracking.log_metrics(uri, run_id, reported, int((result.metrics or {}).get("step", 0) or 0))
        why = str(result.error or "no error reported").strip().splitlines()
        tracking.fail_child(
            uri,
            run_id,
            "The trial's own process could not write its MLflow run (the tracking store was unreachable "
            f"past {tracking.WAIT_ENV}); the sweep's driver recorded it afterwards from Tune's state. "
            f"Its error: {why[-1] if why else ''}",
        )
        added.append(trial_id)
    return added


def _log_bytes(c, run_id: str, name: str, content: bytes | str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, Path(name).name)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        c.log_artifact(run_id, str(path), str(Path(name).parent) if "/" in name else None)


def description(summary: dict, spec: SweepSpec, top: int = 10) -> str:
    """The parent run's Description (markdown): what won, how the trials ended, the leaderboard's head."""
    metric = spec.objective.metric
    rows = summary["leaderboard"]
    count = {k: sum(r["status"] == k for r in rows) for k in ("completed", "stopped_early", "failed")}
    lines = [
        f"**Sweep {spec.name}**: {len(rows)} trials ({count['completed']} completed, "
        f"{count['stopped_early']} stopped early by {spec.scheduler.name}, {count['failed']} failed); "
        f"objective {spec.objective.mode} `{metric}`.",
        "",
    ]
    if spec.multi:
        front = summary.get("front", [])
        metrics = [g.metric for g in spec.goals]
        lines += [
            f"Pareto front ({', '.join(f'{g.mode} `{g.metric}`' for g in spec.goals)}): {len(front)} trial(s); "
            "each is registered with the alias `pareto-<k>` (k in order of the first objective) and its config "
            "is `pareto/best-<k>.yaml`.",
            "",
            "| front | trial | method | " + " | ".join(metrics) + " |",
            "|---" * (3 + len(metrics)) + "|",
        ]
        for r in front:
            values = " | ".join(f"{r[m]:.4g}" for m in metrics)
            lines.append(f"| pareto-{r['pareto']} | {r['trial']} | {r[tracking.METHOD_TAG]} | {values} |")
        lines.append("")
    elif "best" in summary:
        best = summary["best"]
        lines.append(
            f"Best: trial {best['trial']} ({best[tracking.METHOD_TAG]}), {metric} **{best[metric]:.4f}**; "
            f"rerun with `flexkd train {summary['files']['best']}`."
        )
    if "registered" in summary:
        reg = summary["registered"]
        lines.append(f"Registered: `{reg['name']}` versions {', '.join(reg['versions'])}; {reg['note']}")
    lines += ["", f"| # | trial | method | status | {metric} | steps | s |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows[:top], 1):
        value = f"{r[metric]:.4f}" if isinstance(r[metric], float) else "-"
        lines.append(
            f"| {i} | {r['trial']} | {r[tracking.METHOD_TAG]} | {r['status'].replace('_', ' ')} | {value} | {r['steps']} | {r['seconds']} |"
        )
    if len(rows) > top:
        lines.append(f"\n{len(rows) - top} more in `leaderboard.csv`.")
    return "\n".join(lines)


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
    """The leaderboard (the Pareto front first when there are several objectives, else best first), where
    the best configs went, the registered students, the UI command."""
    metric = spec.objective.metric
    metrics = [g.metric for g in spec.goals]
    names = [p.name for p in spec.params]
    head = ["#", "trial", "method", "status", *(["front"] if spec.multi else []), *metrics]
    table = [[*head, "parameters"]]
    for i, r in enumerate(summary["leaderboard"], 1):
        params = " ".join(f"{n}={_short(r[n])}" for n in names if r.get(n) not in (None, ""))
        front = [f"pareto-{r['pareto']}" if r.get("pareto") else "-"] if spec.multi else []
        values = [f"{r[m]:.4g}" if isinstance(r.get(m), float) else "-" for m in metrics]
        status = r["status"].replace("_", " ")
        table.append(
            [
                str(i),
                f"{r['trial']} ({r['trial_id']})",
                r[tracking.METHOD_TAG],
                status,
                *front,
                *values,
                params,
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    print()
    if spec.multi:
        front = summary.get("front", [])
        print(
            f"Pareto front: {len(front)} trial(s) no other completed trial beats on every objective ("
            + ", ".join(f"{g.mode} {g.metric}" for g in spec.goals)
            + "); listed first"
        )
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1])
    print()
    if spec.multi and summary.get("front"):
        for r, where in zip(summary["front"], summary["files"]["front"]):
            print(f"pareto-{r['pareto']}: trial {r['trial']}, MLflow run {r['run_id']}, config {where}")
    elif "best" in summary:
        best = summary["best"]
        print(f"best trial: {best['trial']} ({metric} {best[metric]:.4f}), MLflow run {best['run_id']}")
        where = summary["files"]["best"]
        rerun = f"flexkd train {where}" if "://" not in where else "download it, then flexkd train FILE"
        print(f"best config: {where}  (rerun: {rerun})")
    if "registered" in summary:
        reg = summary["registered"]
        print(f"registered: {reg['name']} versions {', '.join(reg['versions'])}; {reg['note']}")
        aliases = [registry.CHAMPION, reg["sweep_alias"], *reg.get("pareto_aliases", [])[:3]]
        more = " ..." if len(reg.get("pareto_aliases", [])) > 3 else ""
        print("  load it: " + " or ".join(f"models:/{reg['name']}@{a}" for a in aliases) + more)
    print(f"MLflow UI: {tracking.ui_command(uri, summary.get('experiment_id'))}")


def _short(value) -> str:
    text = str(value)
    try:
        number = float(text)
        return f"{number:.3g}" if "." in text or "e" in text else text
    except ValueError:
        return text[:24]
