"""Ray Train: the one driver that runs ``flexkd.train.train`` (or the scoring pass) in a ``TorchTrainer``.

``run_trainer`` is used by `flexkd train`, `flexkd score` and every sweep trial, so they share one checkpoint
retention, one failure config and one resource check. The driver checks everything (``flexkd.checks.preflight``
returns the run plan) and prepares the teacher before Ray reserves a worker; the plan travels to the workers.

Reports: each worker calls ``ray.train.report`` at the same steps (rank 0 attaches checkpoints). ``QueueRelay``,
a Train callback in the Train controller, forwards rank 0's reports to the driver through a Ray queue; the
driver thread drains it into the run's ``RunRecorder`` (``flexkd.reporting``), which writes the run folder
and feeds its sinks (progress line, MLflow, Tune), while ``fit`` runs on a helper thread. With
``scaling.num_workers=0`` (sweep trials that train in place) the loop runs in this process under Ray Train's
local mode and reports to the recorder directly.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from ray.train import UserCallback

from flexkd import signals
from flexkd.config import Config, ConfigError, dump_yaml, from_dict, to_dict
from flexkd.plan import RunPlan
from flexkd.reporting import EVENTS_FILE, RunRecorder, progress_sinks

log = logging.getLogger("flexkd")

CHECKPOINTS_KEPT = 2  # the newest (to resume from) and the one before it (in case the newest is half-written)
CONTROLLER_FAILURES = 3
# Ray Train's controller takes one report per worker each time it polls them (every 2 s by default), and a
# worker's ray.train.report blocks while its previous report is still waiting: a loop reporting every 0.5 s
# ran 4x slower than in-process (0.08 s against 0.02 s per step, measured on the demo). The controller reads
# this variable from the process that calls fit(). A value the user has set wins.
REPORT_POLL_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Ray Train gives a worker group 60 s to start; on a loaded 2-CPU machine a worker's torch import alone
    # took longer (a sweep trial failed so). check_resources already refuses requests a local cluster can
    # never meet, so waiting longer only ever waits for resources that will come.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}


# ---------------------------------------------------------------------------------------------------------
# Worker side


def ray_report(metrics: dict, step: int, checkpoint: str | None = None) -> None:
    """The loop's ``report`` inside a Train worker: ``ray.train.report`` with the step, and the checkpoint
    folder handed over to Ray, which persists it to the run's storage before returning (the loop then
    deletes the local folder)."""
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None
    ray.train.report({"step": step, **metrics}, checkpoint=ckpt)


def worker_main(payload: dict) -> None:
    """Entry point of every Train worker."""
    import ray.train

    from flexkd.scorecache import ScoreCache
    from flexkd.train import train

    cfg, plan = from_dict(payload["config"]), RunPlan.from_dict(payload["plan"])
    checkpoint = ray.train.get_checkpoint()
    # Scores go to the run storage: a worker group restarted before its first checkpoint does not rescore.
    cache = ScoreCache(payload["score_cache"]) if payload.get("score_cache") else None
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_from:
        train(cfg, ray_report, plan=plan, resume_from=resume_from, score_cache=cache)


def score_worker(payload: dict) -> dict | None:
    """Entry point of `flexkd score` workers: sharded scoring; rank 0 returns the result to the driver."""
    import ray.train

    from flexkd.scorepass import score_and_select

    selections, scores = score_and_select(from_dict(payload["config"]), RunPlan.from_dict(payload["plan"]))
    if ray.train.get_context().get_world_rank() != 0:
        return None
    return {
        "selections": [asdict(s) for s in selections],
        "layers": sorted(scores.layers),
        "flat": scores.flatten().tolist(),
    }


# ---------------------------------------------------------------------------------------------------------
# Controller side


class QueueRelay(UserCallback):
    """Train callback: rank 0's metrics (and checkpoint) of every report, to the driver's queue, as they come."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.queue.put((dict(metrics[0]), checkpoint))


# ---------------------------------------------------------------------------------------------------------
# Driver side


def storage_root(cfg: Config) -> str:
    return cfg.scaling.storage_path or str(Path("./flexkd-runs/ray").resolve())


def score_cache_root(cfg: Config, storage: str) -> str:
    """Where a Ray run keeps scores: scoring.cache when set, else beside its checkpoints (a restarted worker
    group, or the next trial of a sweep, then finds them)."""
    return cfg.scoring.cache or f"{storage}/score-cache"


def check_resources(plan: RunPlan, extra_cpus: float = 0.0) -> None:
    """On a local cluster, a request it can never satisfy is an error now, not a wait forever.

    extra_cpus: CPUs already held by the caller (a sweep trial's own process).
    """
    import ray

    if os.environ.get("RAY_ADDRESS") or plan.workers == 0:
        return  # a real cluster may autoscale; local mode needs no worker
    have = float(ray.cluster_resources().get("CPU", 0))
    need = plan.cpus_needed + extra_cpus
    if need > have:
        raise ConfigError(
            f"scaling.num_workers: {plan.workers} workers x {plan.cpus_per_worker} CPU"
            + (f" + {extra_cpus:g} for the trial" if extra_cpus else "")
            + f" need {need:g} CPUs; this Ray cluster has {have:g} (lower scaling.cpus_per_worker or the worker count)"
        )


def run_trainer(
    cfg: Config,
    plan: RunPlan,
    name: str,
    storage: str,
    *,
    recorder: RunRecorder | None = None,
    score_only: bool = False,
    score_cache: str = "",
    extra_cpus: float = 0.0,
):
    """Build and fit the TorchTrainer of a run (or of `flexkd score`); returns Ray Train's ``Result``.

    recorder: where reports go (required unless score_only). ``name`` is stable for a run that may resume:
    Ray Train continues a run whose name and storage it finds again, from its latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_resources(plan, extra_cpus)
    for key, value in REPORT_POLL_ENV.items():
        os.environ.setdefault(key, value)
    # "Running in local mode...", logged at INFO by every ScalingConfig(num_workers=0): once per sweep trial.
    logging.getLogger("ray.train.v2.api.config").setLevel(logging.WARNING)
    per_worker = {"CPU": plan.cpus_per_worker}
    if plan.gpus_per_worker:
        per_worker["GPU"] = plan.gpus_per_worker
    scaling = ScalingConfig(
        num_workers=plan.workers, use_gpu=bool(plan.gpus_per_worker), resources_per_worker=per_worker
    )
    payload = {"config": to_dict(cfg), "plan": plan.to_dict(), "score_cache": score_cache}
    queue = None
    callbacks = []
    if score_only:
        loop = score_worker
    elif plan.workers == 0:
        # Local mode: the loop runs here, in this thread, and reports to the recorder directly.
        from flexkd.scorecache import ScoreCache
        from flexkd.train import train

        def loop(_payload):
            train(cfg, recorder, plan=plan, score_cache=ScoreCache(score_cache) if score_cache else None)

    else:
        from ray.util.queue import Queue

        loop = worker_main
        queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        callbacks.append(QueueRelay(queue))
    trainer = TorchTrainer(
        loop,
        train_loop_config=payload,
        torch_config=TorchConfig(timeout_s=600),
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(
                max_failures=cfg.scaling.max_failures, controller_failure_limit=CONTROLLER_FAILURES
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    if queue is None:
        return trainer.fit()
    return _fit_draining(trainer, queue, recorder)


def _fit_draining(trainer, queue, recorder: RunRecorder):
    """``trainer.fit()`` on a helper thread while this thread drains the reports into the recorder (so Tune's
    ``tune.report``, a sink of a trial's recorder, is called from the trial's own thread)."""
    from ray.util.queue import Empty

    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised on the driver thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True, name="flexkd-fit")
    thread.start()
    while True:
        try:
            metrics, checkpoint = queue.get(timeout=0.2)
        except Empty:
            if not thread.is_alive():
                if queue.empty():
                    break
            continue
        step = int(metrics.pop("step", 0))
        local = None
        if checkpoint is not None:
            local = tempfile.mkdtemp(prefix="flexkd-ckpt-")
            checkpoint.to_directory(local)
        recorder(metrics, step, local, origin=checkpoint.path if checkpoint is not None else "")
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def fit(
    cfg: Config,
    plan: RunPlan | None = None,
    quiet: bool = False,
    resume: bool = False,
    num_cpus: int | None = None,
) -> dict:
    """`flexkd train` with ``scaling.num_workers >= 1``: the loop in a TorchTrainer, the run folder on the driver.

    The Train run is stored at ``<storage>/<run.name>-<time>``; ``--resume`` continues the newest one and
    its worker groups restart from the latest checkpoint.
    """
    from ray.train import TrainingFailedError

    from flexkd.checks import preflight
    from flexkd.runs import ensure_teacher
    from tuning.session import start_ray

    plan = plan or preflight(cfg)  # the CLI has run it already and passes its plan
    ensure_teacher(cfg, quiet=quiet)
    signals.attach(cfg, plan)  # before Ray: a missing cache with signals.mode=cached reserves no worker
    start_ray(num_cpus=num_cpus, quiet=quiet)
    recorder = RunRecorder(
        cfg.run.output_dir, progress_sinks(cfg.train.steps, quiet), resume=resume, config_text=dump_yaml(cfg)
    )
    # The Train run's name is an event of the run folder, so that a Ray run writes the same files as a local
    # one; --resume continues the run it names (Ray Train resumes a run whose name and storage it finds).
    if resume:
        names = [e["value"] for e in recorder.read(EVENTS_FILE) if e["event"] == "ray_run"]
        if not names:
            raise ConfigError(f"--resume: no Ray Train run recorded in {recorder.out / EVENTS_FILE}")
        name = names[-1]
    else:
        name = f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        recorder({"event/ray_run": name}, 0)
    started = time.perf_counter()
    try:
        run_trainer(
            cfg,
            plan,
            name,
            storage_root(cfg),
            recorder=recorder,
            score_cache=score_cache_root(cfg, storage_root(cfg)),
        )
    except TrainingFailedError as err:
        raise RuntimeError(
            f"Ray Train run {name} failed: {err}. Checkpoints so far are kept in {storage_root(cfg)}/{name}; "
            f"continue with `flexkd train ... --resume`"
        ) from err
    log.info("Ray Train run %s took %.1fs", name, time.perf_counter() - started)
    metrics = recorder.finish()
    metrics["ray/run"] = f"{storage_root(cfg)}/{name}"
    return metrics


def score(cfg: Config, plan: RunPlan | None = None, quiet: bool = False, num_cpus: int | None = None):
    """`flexkd score` with ``scaling.num_workers >= 1``: sharded scoring on Ray; writes selection.json.

    Returns (selection.json path, the merged ScoreSet).
    """
    import torch

    from flexkd.runs import check_scoring, write_selection
    from flexkd.scoring import ScoreSet, UnitScores
    from flexkd.selection import LayerSelection
    from tuning.session import start_ray

    plan = plan or check_scoring(cfg)
    start_ray(num_cpus=num_cpus, quiet=quiet)
    name = f"{cfg.run.name}-score-{time.strftime('%Y%m%d-%H%M%S')}"
    out = run_trainer(cfg, plan, name, storage_root(cfg), score_only=True).return_value
    # unflatten needs each layer's width; it is the length of any per-unit score list of that layer.
    widths = {s["teacher_layer"]: len(s["scores"]) for s in out["selections"]}
    layout = ScoreSet({layer: UnitScores.zeros(layer, widths[layer]) for layer in out["layers"]})
    scores = layout.unflatten(torch.tensor(out["flat"], dtype=torch.float64))
    path = write_selection(cfg, [LayerSelection(**s) for s in out["selections"]])
    return path, scores
