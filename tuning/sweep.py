"""`flexkd sweep`: Ray Tune + Optuna over the run config, every trial and the best students in MLflow.

One Tune trial is one driver that builds and fits a ``TorchTrainer`` (the Train V2 pattern). With
``scaling.num_workers`` >= 1 the trainer starts that many Ray Train workers and a ``ReportRelay`` in its
controller feeds Tune and MLflow; with 0 it is Ray Train's local mode, which runs the loop in the trial's own
process (no worker group to start, so a short trial is not dominated by start-up) and the relay is called in
place. Either way Tune sees one result per evaluation, each carrying the objective, so ASHA's rungs are
evaluations and Optuna's TPE gets intermediate values.

Before Ray starts: the sweep file and every value of its space are checked against the run config, the
base run's files are checked, the MLflow store is reached, and a missing demo teacher is fine-tuned.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from flexkd import signals
from flexkd.config import dump_yaml, from_dict, to_dict
from flexkd.dotted import flatten
from flexkd.reporting import RunRecorder
from flexkd.runs import ensure_teacher
from tuning import tracking
from tuning.leaderboard import finish
from tuning.space import DefineByRun, SweepSpec, check_space_files, describe, trial_config

log = logging.getLogger("flexkd")


@dataclass
class SweepContext:
    """What every trial needs to know about its sweep (passed to trials with ``tune.with_parameters``)."""

    spec: SweepSpec
    uri: str
    experiment_id: str
    parent_id: str
    trials_root: str  # local folder of trial outputs
    storage: str  # Tune/Train storage (absolute path or URI)


# ---------------------------------------------------------------------------------------------------------
# The trial


class TuneSink:
    """Recorder sink: evaluation reports (those with the objective metric) become Tune results.

    Always called from the trial's own thread (the Ray Train driver drains reports there), where
    ``tune.report`` belongs.
    """

    def __init__(self, metric: str):
        self.metric = metric

    def report(self, metrics: dict, step: int, checkpoint) -> None:
        if self.metric in metrics:
            from ray import tune

            tune.report({**metrics, "step": step})

    def event(self, name, value, step) -> None:
        pass


def trial_main(sampled: dict, context: SweepContext) -> None:
    """One trial: its config and plan, its MLflow child run, a TorchTrainer, then final metrics and artifacts."""
    import ray
    from ray import tune

    from flexkd.checks import preflight
    from tuning.ray_train import run_trainer, score_cache_root

    entered = time.perf_counter()
    timing = {"perf/trial/process_start_s": _process_start_cost()}
    spec = context.spec
    trial_id = tune.get_context().get_trial_id()
    out = Path(context.trials_root, trial_id)
    cfg = trial_config(spec, sampled, run_name=f"{spec.name}-{trial_id}")
    cfg.run.output_dir = str(out)
    plan = preflight(cfg)  # this trial's own values: every one was checked on the driver, this is its plan
    signals.attach(cfg, plan)  # the driver built the signals of every value of the space
    params = {**flatten(to_dict(cfg)), **{f"sweep.{k}": v for k, v in sampled.items()}}
    run_id = tracking.start_child(
        context.uri,
        context.experiment_id,
        context.parent_id,
        trial_id,
        tune.get_context().get_trial_name(),
        params,
        # Where the trial ran: the node (the machine, on a cluster) and its host name.
        tags={"flexkd.node_id": ray.get_runtime_context().get_node_id(), "flexkd.host": socket.gethostname()},
    )
    timing["perf/trial/mlflow_open_s"] = time.perf_counter() - entered
    try:
        # MLflow first: Tune may stop (end) this trial as soon as it sees the result.
        mlflow_sink = tracking.MlflowSink(context.uri, run_id)
        recorder = RunRecorder(
            out, [mlflow_sink, TuneSink(spec.objective.metric)], config_text=dump_yaml(cfg)
        )
        started = time.perf_counter()
        run_trainer(
            cfg,
            plan,
            f"trial-{trial_id}",  # stable: a restarted trial's Train run resumes from its checkpoint
            context.storage,
            recorder=recorder,
            score_cache=score_cache_root(cfg, context.storage),
            extra_cpus=spec.resources.cpus_per_trial,
        )
        metrics = recorder.finish()
        timing["perf/trial/fit_s"] = time.perf_counter() - started
        timing["perf/trial/mlflow_steps_s"] = mlflow_sink.seconds
        metrics.update(timing)
        value = metrics.get(spec.objective.metric)
        keep = value is not None and tracking.should_log_student(
            context.uri,
            context.experiment_id,
            context.parent_id,
            spec.objective.metric,
            spec.objective.mode,
            value,
            spec.tracking.register_top,
        )
        closing = time.perf_counter()
        tracking.finish_child(context.uri, run_id, out, metrics, log_student=keep)
        done = time.perf_counter()
        tracking.log_metrics(
            context.uri,
            run_id,
            {"perf/trial/mlflow_close_s": done - closing, "perf/trial/in_trial_s": done - entered},
            0,
        )
    except Exception:
        tracking.fail_child(context.uri, run_id, traceback.format_exc())
        raise


_TRIALS_IN_THIS_PROCESS = 0


def _process_start_cost() -> float:
    """Seconds between this process's start and now, for the first trial a process runs (its spawn and
    imports); 0 for a process Tune reuses. Linux only (reads /proc); NaN elsewhere."""
    global _TRIALS_IN_THIS_PROCESS
    _TRIALS_IN_THIS_PROCESS += 1
    if _TRIALS_IN_THIS_PROCESS > 1:
        return 0.0
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


# ---------------------------------------------------------------------------------------------------------
# The scheduler, recording what it stops


def early_stop_scheduler(spec: SweepSpec, record: str):
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    class RecordingASHA(AsyncHyperBandScheduler):
        """ASHA that notes each trial it stops, so the sweep can tag that trial's MLflow run."""

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP:
                with open(record, "a") as f:
                    f.write(json.dumps({"trial_id": trial.trial_id, "step": result.get("step")}) + "\n")
            return decision

    # max_t above any number of evaluations: ASHA also stops trials that reach max_t, and a trial stopped
    # mid-fit is one whose resources Ray must reclaim; only weak trials should be stopped.
    return RecordingASHA(
        time_attr="training_iteration",
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        max_t=100_000,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


# ---------------------------------------------------------------------------------------------------------
# The driver


def trial_dirname(trial) -> str:
    """Tune's folder name for a trial: its id, so the sweep can tell which trials Tune knows."""
    return f"trial-{trial.trial_id}"


def sweep_home() -> Path:
    return tracking.default_root() / "sweeps"


def run_sweep(
    spec: SweepSpec, raw: dict, *, resume: bool = False, quiet: bool = False, num_cpus: int | None = None
) -> dict:
    """Run (or continue) a sweep; returns a summary with the leaderboard and the best trial."""
    # --- everything that can fail fast, before Ray ----------------------------------------------------
    uri = tracking.tracking_uri()
    tracking.check_store(uri)
    check_space_files(spec)
    ensure_teacher(from_dict(spec.base_config), quiet=quiet)
    storage = spec.storage_path or str(sweep_home())
    pointer = sweep_home() / f"{spec.name}.latest.json"
    if resume:
        if not pointer.exists():
            from flexkd.config import ConfigError

            raise ConfigError(f"--resume: no earlier sweep named {spec.name!r} ({pointer} is missing)")
        state = json.loads(pointer.read_text())
    else:
        experiment_id = tracking.ensure_experiment(uri, spec.tracking.experiment or f"flexkd-{spec.name}")
        exp_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent_id = tracking.start_parent(
            uri,
            experiment_id,
            exp_name,
            {
                "sweep.name": spec.name,
                "sweep.base": spec.base,
                "sweep.trials": spec.trials,
                "sweep.seed": spec.seed,
                "sweep.concurrency": spec.concurrency,
                "sweep.objective": f"{spec.objective.mode} {spec.objective.metric}",
                "sweep.scheduler": spec.scheduler.name,
                "sweep.overrides": spec.overrides,
            },
            {
                "sweep.yaml": yaml.safe_dump(raw, sort_keys=False),
                "space.txt": describe(spec),
                "resolved_sweep.yaml": yaml.safe_dump(
                    json.loads(json.dumps(spec, default=vars)), sort_keys=False
                ),
            },
        )
        state = {
            "experiment_path": f"{storage}/{exp_name}",
            "exp_name": exp_name,
            "experiment_id": experiment_id,
            "parent_id": parent_id,
            "uri": uri,
        }
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps(state, indent=1))
    context = SweepContext(
        spec,
        uri,
        state["experiment_id"],
        state["parent_id"],
        str(sweep_home() / state["exp_name"]),
        storage,
    )
    _ = spec.resolved_base  # worked out here, on the driver, before the spec is pickled to the trials
    stopped_record = str(sweep_home() / f"{state['exp_name']}.early_stopped.jsonl")

    # --- Ray Tune ------------------------------------------------------------------------------------------
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from tuning.session import start_ray

    # Tune saves the experiment's state (trials, the Optuna sampler) at most this often; a driver killed
    # between two saves forgets the trials started since, so save often (the state is small).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    start_ray(num_cpus=num_cpus, quiet=quiet)
    # The teacher's outputs and scores, once for the whole sweep, before the first trial.
    from tuning.signals import build_for_sweep

    prepared = time.perf_counter()
    builds = build_for_sweep(spec, storage, quiet=quiet)
    if builds:
        tracking.client(uri).set_tag(
            state["parent_id"],
            "flexkd.teacher_signals",
            "; ".join(f"{b['folder']} ({b['bytes'] / 1e6:.1f} MB)" for b in builds),
        )
        log.info("teacher signals and scores ready in %.1fs", time.perf_counter() - prepared)
    resources = {"cpu": spec.resources.cpus_per_trial}
    if spec.resources.gpus_per_trial:
        resources["gpu"] = spec.resources.gpus_per_trial
    trainable = tune.with_resources(tune.with_parameters(trial_main, context=context), resources)
    started = time.perf_counter()
    if resume and tune.Tuner.can_restore(state["experiment_path"]):
        log.info("resuming sweep %s from %s", spec.name, state["experiment_path"])
        tracking.client(uri).update_run(state["parent_id"], status="RUNNING")
        tuner = tune.Tuner.restore(
            state["experiment_path"], trainable, resume_unfinished=True, resume_errored=False
        )
    else:
        searcher = OptunaSearch(
            DefineByRun(spec.params),
            metric=spec.objective.metric,
            mode=spec.objective.mode,
            seed=spec.seed,
            points_to_evaluate=[dict(p) for p in spec.start_points] or None,
        )
        scheduler = early_stop_scheduler(spec, stopped_record) if spec.scheduler.name == "asha" else None
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=spec.trials,
                max_concurrent_trials=spec.concurrency,
                trial_dirname_creator=trial_dirname,
                # Reusing a trial's process saves its imports, but a trial that ASHA stopped mid-fit cannot be
                # reset, and Tune then fails the next trial instead of starting a fresh process.
                reuse_actors=scheduler is None,
            ),
            run_config=tune.RunConfig(
                name=state["exp_name"], storage_path=storage, verbose=0 if quiet else 1
            ),
        )
    grid = tuner.fit()
    log.info("sweep %s: %d trials in %.0fs", spec.name, len(grid), time.perf_counter() - started)
    return finish(context, grid, stopped_record, sweep_home(), quiet=quiet)
