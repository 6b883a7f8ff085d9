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
import sys
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

NUMBER_KEY = "__flexkd_trial_number"  # rides in a trial's config from the searcher to the trial


@dataclass
class SweepContext:
    """What every trial needs to know about its sweep (passed to trials with ``tune.with_parameters``)."""

    spec: SweepSpec
    uri: str
    experiment_id: str
    parent_id: str
    trials_root: str  # local folder of trial outputs
    storage: str  # Tune/Train storage (absolute path or URI)
    source: dict  # MLflow's source tags (command, user, git commit) for every child


# ---------------------------------------------------------------------------------------------------------
# The trial


class TuneSink:
    """Recorder sink: the reports that carry every objective become Tune results (one objective on val/*:
    each evaluation; several, or one reported at the end such as perf/latency_ms: the last report, since
    Tune's searcher wants every objective in every result).

    Always called from the trial's own thread (the Ray Train driver drains reports there), where
    ``tune.report`` belongs.
    """

    def __init__(self, metrics: list[str]):
        self.metrics = list(metrics)

    def report(self, metrics: dict, step: int, checkpoint) -> None:
        if all(m in metrics for m in self.metrics):
            from ray import tune

            tune.report({**metrics, "step": step})

    def event(self, name, value, step) -> None:
        pass


# The child run's params: the sampled values, and the keys that say what a run is. The whole resolved config
# (full-precision values included) is the run's config.yaml artifact; 150 params would bury the ones that matter.
SHOWN_KEYS = (
    "data.source",
    "teacher.path",
    "student.path",
    "student.arch",
    "train.steps",
    "train.batch_size",
    "optim.lr",
    "run.seed",
)
FEATURE_KEYS = ("feature.loss", "feature.weight", "feature.layers")
SELECTION_KEYS = ("selection.k", "selection.strategy", "scoring.method", "scoring.batch_size")
KD_KEYS = ("kd.loss", "kd.weight", "kd.temperature")


def shown_params(cfg, sampled: dict) -> dict:
    from flexkd.config import uses_features, uses_selection

    flat = flatten(to_dict(cfg))
    keys = [*SHOWN_KEYS]
    keys += FEATURE_KEYS if uses_features(cfg) else ()
    keys += SELECTION_KEYS if uses_selection(cfg) else ()
    keys += KD_KEYS if cfg.kd.loss != "none" and cfg.kd.weight > 0 else ()
    params = {k: flat[k] for k in keys if k in flat and flat[k] not in ("", None, {})}
    return {**params, **sampled}


def trial_number(sampled: dict) -> int:
    return int(sampled.get(NUMBER_KEY, -1))


def open_trial_run(context: SweepContext, cfg, number: int, sampled: dict, trial_id: str, tags: dict) -> str:
    """A trial's child run, named ``<method>-<trial number>``, with its shown params and what-it-is tags."""
    from flexkd.config import method_name

    method = method_name(cfg)
    return tracking.start_child(
        context.uri,
        context.experiment_id,
        context.parent_id,
        trial_id,
        f"{method}-{number:03d}" if number >= 0 else f"{method}-{trial_id}",
        shown_params(cfg, sampled),
        tags={tracking.METHOD_TAG: method, tracking.NUMBER_TAG: str(number), **tags, **context.source},
    )


def trial_main(sampled: dict, context: SweepContext) -> None:
    """One trial: its config and plan, its MLflow child run, a TorchTrainer, then final metrics and artifacts."""
    import ray
    from ray import tune

    from flexkd.checks import preflight
    from tuning.ray_train import run_trainer, score_cache_root
    from tuning.session import load_worker_secrets

    load_worker_secrets()  # MLflow credentials: a 0600 file, never the runtime env (Ray logs that)
    entered = time.perf_counter()
    timing = {"perf/trial/process_start_s": _process_start_cost()}
    spec = context.spec
    number = trial_number(sampled)
    sampled = {k: v for k, v in sampled.items() if k != NUMBER_KEY}
    trial_id = tune.get_context().get_trial_id()
    out = Path(context.trials_root, trial_id)
    cfg = trial_config(spec, sampled, run_name=f"{spec.name}-{trial_id}")
    cfg.run.output_dir = str(out)
    # The run opens first, so that its duration is the trial's and a failure in the set-up below is recorded.
    run_id = open_trial_run(
        context,
        cfg,
        number,
        sampled,
        trial_id,
        # Where the trial ran: the node (the machine, on a cluster) and its host name.
        {"flexkd.node_id": ray.get_runtime_context().get_node_id(), "flexkd.host": socket.gethostname()},
    )
    timing["perf/trial/mlflow_open_s"] = time.perf_counter() - entered
    try:
        # This trial's own values: every one was checked on the driver, this is its plan.
        plan = preflight(cfg)
        signals.attach(cfg, plan)  # the driver built the signals of every value of the space
        # MLflow first: Tune may stop (end) this trial as soon as it sees the result.
        mlflow_sink = tracking.MlflowSink(context.uri, run_id)
        recorder = RunRecorder(
            out, [mlflow_sink, TuneSink([g.metric for g in spec.goals])], config_text=dump_yaml(cfg)
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
        goals = [(g.metric, g.mode) for g in spec.goals]
        values = [metrics.get(m) for m, _ in goals]
        keep = None not in values and tracking.should_log_student(
            context.uri,
            context.experiment_id,
            context.parent_id,
            goals,
            values,
            spec.tracking.register_top,
        )
        closing = time.perf_counter()
        timing["perf/trial/in_trial_s"] = closing - entered
        tracking.finish_child(
            context.uri,
            run_id,
            out,
            {**metrics, **timing},
            student=cfg.data.task if keep else "",
            examples=mlflow_sink.examples,
        )
        closed = {"perf/trial/mlflow_close_s": time.perf_counter() - closing}  # artifacts, model, status
        tracking.set_tags(context.uri, run_id, tracking.one_off_tags(closed))
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
# The search, the scheduler and the driver's view of them


def numbered_search(spec: SweepSpec):
    """Optuna through Tune, each trial's config carrying Optuna's trial number: the order of the search,
    kept across ``--resume`` (the searcher's state is saved with the experiment). Run names and the plots
    use it, so trial 7 in the UI is trial 7 of the study."""
    from ray.tune.search.optuna import OptunaSearch

    class NumberedOptunaSearch(OptunaSearch):
        def suggest(self, trial_id):
            config = super().suggest(trial_id)
            if isinstance(config, dict) and trial_id in self._ot_trials:
                config = {**config, NUMBER_KEY: self._ot_trials[trial_id].number}
            return config

    goals = spec.goals
    return NumberedOptunaSearch(
        DefineByRun(spec.params),
        # Several objectives: lists, and Optuna's study gets one direction per objective.
        metric=[g.metric for g in goals] if spec.multi else spec.objective.metric,
        mode=[g.mode for g in goals] if spec.multi else spec.objective.mode,
        sampler=optuna_sampler(spec),  # seeded there (Tune refuses a seed beside a sampler)
        points_to_evaluate=[dict(p) for p in spec.start_points] or None,
    )


def optuna_sampler(spec: SweepSpec):
    """TPE (multi-objective TPE when there are several objectives) or NSGA-II, seeded by the sweep."""
    import optuna

    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def early_stop_scheduler(spec: SweepSpec, record: str):
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    class RecordingASHA(AsyncHyperBandScheduler):
        """ASHA that notes each trial it stops (when, at which step, its value), so the sweep can close that
        trial's MLflow run at that moment and say why."""

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP:
                value = result.get(spec.objective.metric)
                with open(record, "a") as f:
                    entry = {
                        "trial_id": trial.trial_id,
                        "step": result.get("step"),
                        "time_ms": int(time.time() * 1000),
                        "value": value if isinstance(value, (int, float)) else None,
                    }
                    f.write(json.dumps(entry) + "\n")
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


def stopped_trials(record: str) -> dict[str, dict]:
    """trial id -> what the scheduler noted when it stopped it (step, time_ms, value)."""
    path = Path(record)
    if not path.exists():
        return {}
    return {e["trial_id"]: e for e in map(json.loads, path.read_text().splitlines()) if e}


def close_stopped(context: SweepContext, record: str, trial_id: str) -> bool:
    """Close a stopped trial's run with the time it was stopped; False when it was not stopped."""
    entry = stopped_trials(record).get(trial_id)
    if entry is None:
        return False
    found = tracking.client(context.uri).search_runs(
        [context.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{context.parent_id}' and tags.`{tracking.TRIAL_TAG}` = '{trial_id}'",
    )
    cut = f"1/{context.spec.scheduler.reduction_factor}"
    for run in found:
        tracking.stop_child(
            cut,
            context.uri,
            run.info.run_id,
            entry.get("time_ms", 0),
            entry.get("step"),
            context.spec.objective.metric,
            entry.get("value"),
        )
    return bool(found)


def sweep_callbacks(context: SweepContext, record: str, quiet: bool) -> list:
    from ray.tune import Callback

    spec = context.spec
    sign = 1 if spec.objective.mode == "max" else -1

    class SweepProgress(Callback):
        """The driver's own view: one line per change (trials done / running / stopped, best so far, ETA), in
        place of Tune's tables; and a stopped trial's run closed the moment it is stopped."""

        def __init__(self):
            self.started = time.time()
            self.best: tuple[float, str] | None = None
            self.done: dict[str, str] = {}
            self.last = ""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(spec.objective.metric)
            if isinstance(value, (int, float)) and (self.best is None or sign * value > sign * self.best[0]):
                number = (trial.config or {}).get(NUMBER_KEY)
                self.best = (float(value), f"trial {number}" if number is not None else trial.trial_id)
                self.show(trials)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.show(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            stopped = close_stopped(context, record, trial.trial_id)
            self.done[trial.trial_id] = "stopped" if stopped else "completed"
            self.show(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done[trial.trial_id] = "failed"
            self.show(trials)

        def show(self, trials) -> None:
            if quiet:
                return
            states = list(self.done.values())
            running = sum(t.status == "RUNNING" for t in trials)
            finished = len(states)
            elapsed = time.time() - self.started
            parts = [
                f"sweep {spec.name}: {finished}/{spec.trials} trials done "
                f"({states.count('completed')} completed, {states.count('stopped')} stopped early, "
                f"{states.count('failed')} failed), {running} running"
            ]
            if self.best:
                parts.append(f"best {spec.objective.metric} so far {self.best[0]:.4g} ({self.best[1]})")
            eta = f"eta {_clock(elapsed / finished * (spec.trials - finished))}" if finished else "eta -"
            parts.append(f"{_clock(elapsed)} elapsed, {eta}")
            line = " | ".join(parts)
            if line.split(" | ")[:2] != self.last.split(" | ")[:2]:  # a change, not just the clock
                print(line, file=sys.stderr, flush=True)
            self.last = line

    return [SweepProgress()]


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------------------
# The driver


def trial_dirname(trial) -> str:
    """Tune's folder name for a trial: its id, so the sweep can tell which trials Tune knows."""
    return f"trial-{trial.trial_id}"


def sweep_home(spec: SweepSpec | None = None) -> Path:
    """Where a sweep keeps its files (leaderboard, best config, resume pointer, trial outputs): its
    ``storage_path`` when that is a folder (on a cluster: the shared one, which outlives the job and its
    temporary working directory), else ``./flexkd-runs/sweeps``."""
    if spec is not None and spec.storage_path and "://" not in spec.storage_path:
        return Path(spec.storage_path)
    return tracking.default_root() / "sweeps"


def run_sweep(
    spec: SweepSpec, raw: dict, *, resume: bool = False, quiet: bool = False, num_cpus: int | None = None
) -> dict:
    """Run (or continue) a sweep; returns a summary with the leaderboard and the best trial."""
    from flexkd.storage import Store

    # --- everything that can fail fast, before Ray ----------------------------------------------------
    check_space_files(
        spec, num_cpus=num_cpus
    )  # first: a bad sweep file writes nothing (check_store creates the store)
    uri = tracking.tracking_uri()
    tracking.check_store(uri)
    home = sweep_home(spec)
    storage = spec.storage_path or str(home)
    files = Store(
        spec.storage_path or str(home)
    )  # the pointer, leaderboard and best config: beside Tune's state
    pointer = f"{spec.name}.latest.json"
    if resume and not files.exists(pointer):
        from flexkd.config import ConfigError

        raise ConfigError(
            f"--resume: no earlier sweep named {spec.name!r} ({files.path(pointer)} is missing)"
        )
    ensure_teacher(from_dict(spec.base_config), quiet=quiet)
    source = tracking.source_tags(f"flexkd sweep {spec.name}")
    if resume:
        state = json.loads(files.read(pointer))
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
            tags={**source, tracking.NOTE_TAG: f"Sweep {spec.name}: running ({spec.trials} trials planned)."},
        )
        state = {
            "experiment_path": f"{storage}/{exp_name}",
            "exp_name": exp_name,
            "experiment_id": experiment_id,
            "parent_id": parent_id,
            "uri": uri,
        }
        files.write(json.dumps(state, indent=1).encode(), pointer)
    context = SweepContext(
        spec,
        uri,
        state["experiment_id"],
        state["parent_id"],
        # Trial outputs beside Tune's trial folders (a URI storage keeps them on the trial's node instead).
        str((home if files.local else sweep_home()) / state["exp_name"]),
        storage,
        source,
    )
    _ = spec.resolved_base  # worked out here, on the driver, before the spec is pickled to the trials
    stopped_record = str(Path(context.trials_root).parent / f"{state['exp_name']}.early_stopped.jsonl")
    Path(stopped_record).parent.mkdir(parents=True, exist_ok=True)

    # --- Ray Tune ------------------------------------------------------------------------------------------
    from ray import tune

    from tuning.session import QUIET_ENV, start_ray

    for key, value in QUIET_ENV.items():  # this driver too: no artifact download bars in the job log
        os.environ.setdefault(key, value)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory", per plot
    # Tune saves the experiment's state (trials, the Optuna sampler) at most this often; a driver killed
    # between two saves forgets the trials started since, so save often (the state is small).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # The driver prints its own progress line (SweepProgress); Tune's tables and boxes would bury it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
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
    callbacks = sweep_callbacks(context, stopped_record, quiet)
    if resume and tune.Tuner.can_restore(state["experiment_path"]):
        log.info("resuming sweep %s from %s", spec.name, state["experiment_path"])
        tracking.client(uri).update_run(state["parent_id"], status="RUNNING")
        tuner = tune.Tuner.restore(
            state["experiment_path"], trainable, resume_unfinished=True, resume_errored=False
        )
        tuner._local_tuner._run_config.callbacks = callbacks  # Tuner.restore takes no run_config
    else:
        scheduler = early_stop_scheduler(spec, stopped_record) if spec.scheduler.name == "asha" else None
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=numbered_search(spec),
                scheduler=scheduler,
                num_samples=spec.trials,
                max_concurrent_trials=spec.concurrency,
                trial_dirname_creator=trial_dirname,
                # Reusing a trial's process saves its imports, but a trial that ASHA stopped mid-fit cannot be
                # reset, and Tune then fails the next trial instead of starting a fresh process.
                reuse_actors=scheduler is None,
            ),
            run_config=tune.RunConfig(
                name=state["exp_name"], storage_path=storage, verbose=0, callbacks=callbacks
            ),
        )
    if not quiet:
        print(
            f"sweep {spec.name}: {spec.trials} trials, {spec.concurrency} at a time; progress below",
            file=sys.stderr,
        )
    grid = tuner.fit()
    log.info("sweep %s: %d trials in %.0fs", spec.name, len(grid), time.perf_counter() - started)
    try:
        return finish(context, grid, stopped_record, files, quiet=quiet)
    except Exception as err:  # the trials are done and kept; say so in one line, not a traceback
        raise records_failed(context, state, files, err) from None


def records_failed(context: SweepContext, state: dict, files, err: Exception) -> tracking.SweepRecordsError:
    """The after-sweep step failed: its traceback goes to a file beside the sweep's state; the parent run is
    closed FAILED with the reason when the store still answers (an outage leaves it RUNNING: ``--resume``
    finishes it); the error names what to do."""
    name = f"{state['exp_name']}.records-error.txt"
    files.write(traceback.format_exc().encode(), name)
    down = tracking.transient(err)
    if not down:
        try:
            tracking.set_tags(
                context.uri,
                context.parent_id,
                {tracking.NOTE_TAG: f"The after-sweep records failed: {str(err).splitlines()[0][:300]}"},
            )
            tracking.client(context.uri, wait=False).set_terminated(context.parent_id, "FAILED")
        except Exception:  # noqa: BLE001 - the message below is what matters now
            pass
    cause = (
        "the tracking store stayed unreachable"
        if down
        else f"{type(err).__name__}: {str(err).splitlines()[0]}"
    )
    return tracking.SweepRecordsError(
        f"sweep {context.spec.name}: every trial ran, but the leaderboard, plots and registry were not "
        f"written ({cause}; details in {files.path(name)}). The trials are kept: "
        f"`flexkd sweep {context.spec.name} --resume` writes the records once the store answers."
    )
