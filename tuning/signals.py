"""`flexkd signals`: the frozen teacher run once over the training rows, as a Ray Data job.

The driver plans the build (``flexkd.signals.plan_build``: key, shards, size estimate, checked against
``signals.max_gb`` before anything is written), then streams the shards through ``map_batches`` with
``TeacherActor``, a stateful callable class holding one copy of the teacher: one actor per GPU (or per two
CPUs) of the cluster, each writing its shards straight to the cache folder, so on a cluster the pass spreads
over every node. The driver writes the manifest last, from the actors' shard records; an interrupted build
has no manifest, is never read, and resumes (shards already written whole are kept).

Sweeps call ``build_for_sweep`` on the driver before the first trial: one build per distinct teacher, data
and tokenisation in the space, holding the union of its layer maps (and temperatures, for top-k logits),
under a lock per key, so concurrent trials never build twice. They also warm the score cache for each
scoring setting of the space, so trials that select units load no teacher either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from flexkd import signals as sig
from flexkd.config import Config, ConfigError, to_dict
from flexkd.plan import RunPlan

log = logging.getLogger("flexkd")


class TeacherActor:
    """``map_batches`` callable: one teacher copy per actor; each row of a batch is one shard to write.

    A row names its shard only; the actor reads the shard's examples from the tokenised table the driver
    wrote (``flexkd.encoded``, memory-mapped), so no examples pass through the driver or the object store.
    A node that does not see the driver's data.cache_dir tokenises the rows itself, into the same key."""

    def __init__(
        self, cfg_dict: dict, label_names: list[str], spec: dict, folder: str, table: str, size: int
    ):
        from pathlib import Path

        from flexkd.config import from_dict
        from flexkd.encoded import open_table

        self.writer = sig.ShardWriter(cfg_dict, label_names, spec, folder)
        rows = open_table(Path(table))
        if rows is None:
            from flexkd.workbench import open_workbench

            bench = open_workbench(from_dict(cfg_dict), need_teacher=False)
            rows = bench.encode_table(bench.data.train)
        self.chunks = sig.Chunks(rows, size)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        records = [json.dumps(self.writer(int(i), self.chunks[int(i)])) for i in batch["shard"]]
        return {"record": np.array(records, dtype=object)}


def actor_count(cfg: Config, shards: int, nodes: list[dict] | None = None) -> tuple[int, dict]:
    """(actors, resources per actor): one per GPU with scaling.use_gpu, else one per 2 CPUs of the cluster
    (or signals.actors), each holding its share of the CPUs. The share matters: Ray sets an actor's torch
    threads (OMP_NUM_THREADS) to its num_cpus, so one actor asking 1 CPU of a 2-CPU machine ran the teacher
    on one thread and left the other core idle. An actor never asks more CPUs than one node has, and no more
    actors are planned than fit the nodes whole: a share of the cluster's total that no single node holds
    (3 CPUs on a 1-CPU head and a 2-CPU worker) is never scheduled, and the build would wait forever.

    nodes: each alive node's resources (read from ``ray.nodes()`` when not given)."""
    import ray

    if nodes is None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if cfg.scaling.use_gpu:
        have = sum(int(n.get("GPU", 0)) for n in nodes)
        if have < 1:
            raise ConfigError(
                "scaling.use_gpu: the teacher-signal build asks for GPUs; this Ray cluster has none"
            )
        n = max(1, min(cfg.signals.actors or have, shards))
        return n, {"num_gpus": 1}
    per_node = [int(n.get("CPU", 0)) for n in nodes] or [1]
    cpus = max(1, sum(per_node))
    n = max(1, min(cfg.signals.actors or max(1, cpus // 2), shards))
    per = max(1, min(cpus // n, max(per_node)))
    fits = sum(c // per for c in per_node)
    return max(1, min(n, fits)), {"num_cpus": per}


def build(
    cfg: Config,
    plan: RunPlan,
    *,
    layers: list[int] | None = None,
    temperatures: list[float] | None = None,
    quiet: bool = False,
    num_cpus: int | None = None,
) -> dict:
    """Build (or find) the signals of ``cfg`` for ``layers`` (default: the plan's teacher layers); returns
    the manifest. A cache that already serves the request is returned without building."""
    import ray

    from flexkd.workbench import open_workbench
    from tuning.session import start_ray

    bench = open_workbench(cfg, need_teacher=False)
    layers = sorted(set(layers if layers is not None else plan.teacher_layers))
    units = _selected_units(cfg, plan, bench) if cfg.signals.units == "selected" else None
    bp = sig.plan_build(cfg, bench, layers, temperatures, units)
    store = sig.Store(bp.root)
    found = _served(cfg, bp)
    if found is not None:
        log.info("teacher signals already built: %s", found["folder"])
        return found
    log.info("%s", bp.describe())
    sig.check_budget(bp.estimate, cfg)
    start_ray(num_cpus=num_cpus, quiet=quiet)
    with store.lock(bp.key):  # a second builder of the same key waits here, then finds the manifest
        done = sig.read_manifest(store, bp.key)
        if done is not None:
            return {**done, "folder": bp.folder}
        started = time.perf_counter()
        actors, per_actor = actor_count(cfg, len(bp.chunks))
        items = [{"shard": i} for i in range(len(bp.chunks))]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            TeacherActor,
            fn_constructor_kwargs={
                "cfg_dict": to_dict(cfg),
                "label_names": bench.data.label_names,
                "spec": bp.spec.to_dict(),
                "folder": bp.folder,
                "table": bp.chunks.rows.folder,
                "size": bp.chunks.size,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            **per_actor,
        )
        _quiet_ray_data()
        records = []
        first = None  # when the first shard came back: the actors' start-up is not the shards' pace
        for row in ds.iter_rows():
            records.append(json.loads(row["record"]))
            now, done, total = time.perf_counter(), len(records), len(bp.chunks)
            if quiet:
                continue
            if first is None:
                first = now
                log.info("signals: shard 1/%d written (%.0fs, teacher actors started)", total, now - started)
            else:
                eta = (now - first) / (done - 1) * (total - done)
                log.info("signals: shard %d/%d written (%.0fs, eta %.0fs)", done, total, now - started, eta)
        seconds = time.perf_counter() - started
        manifest = sig.finish_build(bp, records, seconds, actors=actors)
    sizes = manifest["sizes"]
    log.info(
        "teacher signals built in %.1fs with %d actor(s): %.1f MB, %.0f B/token -> %s",
        seconds,
        actors,
        sizes["bytes"] / 1e6,
        sizes["bytes_per_token"],
        bp.folder,
    )
    return {**manifest, "folder": bp.folder}


def _quiet_ray_data() -> None:
    """Our per-shard line is the progress; Ray Data's own every-10-seconds report would bury it."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _served(cfg: Config, bp: sig.BuildPlan) -> dict | None:
    """The manifest (with its folder) of an existing cache that serves this build, else None."""
    store = sig.Store(bp.root)
    for name, manifest in sig.manifests(store):
        if name == bp.key or not sig.differences(manifest["material"], bp.material):
            return {**manifest, "folder": store.path(name)}
    return None


def _selected_units(cfg: Config, plan: RunPlan, bench) -> dict[int, list[int]]:
    """signals.units=selected: the units this config selects, per teacher layer (union over the pairs)."""
    from flexkd.scorecache import ScoreCache
    from flexkd.scorepass import compute_selection

    if not plan.selects_units:
        raise ConfigError(
            "signals.units: selected needs a run that selects units (feature.loss pearson or mse_std)"
        )
    cache = ScoreCache(cfg.scoring.cache) if cfg.scoring.cache else None
    selections, _ = compute_selection(bench, plan, cache)
    bench.release_teacher()
    units: dict[int, set[int]] = {}
    for s in selections:
        units.setdefault(s.teacher_layer, set()).update(s.indices)
    return {layer: sorted(u) for layer, u in units.items()}


# ---------------------------------------------------------------------------------------------------------
# Sweeps


def build_for_sweep(spec, storage: str, quiet: bool = False) -> list[dict]:
    """On the sweep driver, before the first trial: the signals of every distinct teacher/data/tokenisation
    in the space (the union of its layer maps and temperatures), then the scores of every scoring setting.
    Returns one summary per build (for the parent run). Nothing happens with signals.mode=live."""
    from flexkd.checks import preflight
    from flexkd.scorecache import ScoreCache
    from flexkd.scorepass import compute_scores
    from flexkd.workbench import open_workbench
    from tuning.space import space_configs

    configs = [c for c in space_configs(spec) if c.signals.mode != "live"]
    groups: dict[str, dict] = {}
    for cfg in configs:
        plan = preflight(cfg)
        if not plan.loads_teacher:
            continue
        group = _group_key(cfg)
        entry = groups.setdefault(group, {"cfg": cfg, "plan": plan, "layers": set(), "temps": set()})
        entry["layers"].update(plan.teacher_layers)
        entry["temps"].update(sig.temperatures_needed(cfg))
    out = []
    for entry in groups.values():
        manifest = build(
            entry["cfg"],
            entry["plan"],
            layers=sorted(entry["layers"]),
            temperatures=sorted(entry["temps"]),
            quiet=quiet,
        )
        out.append(
            {"folder": manifest["folder"], **manifest["sizes"], "build_s": manifest.get("build_s", 0.0)}
        )

    # Scores: one pass per distinct scoring setting, here, so that trials find them in the cache.
    from tuning.ray_train import score_cache_root

    benches: dict[str, object] = {}
    seen = set()
    for cfg in configs:
        plan = preflight(cfg)
        if not plan.selects_units:
            continue
        setting = json.dumps(
            [_group_key(cfg), cfg.scoring.batch_size, cfg.scoring.num_examples, plan.teacher_layers]
        )
        if setting in seen:
            continue
        seen.add(setting)
        group = _group_key(cfg)
        if group not in benches:
            benches[group] = open_workbench(cfg, need_teacher=True)
        # One teacher and data per group; the scoring settings are this combination's.
        bench = dataclasses.replace(benches[group], cfg=cfg, scoring_seconds=None)
        compute_scores(bench, plan.teacher_layers, ScoreCache(score_cache_root(cfg, storage)))
    for bench in benches.values():
        bench.release_teacher()
    if seen:
        log.info("scores ready for %d scoring setting(s) of the space", len(seen))
    return out


def _group_key(cfg: Config) -> str:
    """What one cache is shared by: everything in its material but the layers and temperatures."""
    return json.dumps(
        [
            cfg.teacher.path,
            cfg.student.path,
            to_dict(cfg.data),
            cfg.run.precision,
            cfg.signals.dtype,
            cfg.signals.units,
            cfg.signals.path,
            cfg.kd.top_k if cfg.data.task != "classification" else 0,
        ],
        sort_keys=True,
        default=str,
    )
