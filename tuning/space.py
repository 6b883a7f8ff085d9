"""Sweep files and search spaces.

A sweep file names a base run config and a search space over that config's own dotted keys:

    name: quickstart
    base: demo                                  # run preset or YAML file
    overrides: [train.steps=200]                # fixed for every trial
    space:
      method:                                   # a bundle: one categorical choosing several keys at once
        bundles:
          sft: {feature.loss: none, kd.loss: none}
          flexkd: {feature.loss: pearson}
      feature.weight: {loguniform: [0.1, 10], when: {method: [flexkd]}}
      selection.k: {choice: [8, 16, 32], when: {method: [flexkd]}}
      optim.lr: {loguniform: [3.0e-4, 3.0e-3]}
      train.steps: {int: [100, 300], step: 50}
    objective: {metric: val/accuracy, mode: max}
    trials: 8

Distributions: ``choice`` (categorical), ``uniform``, ``loguniform``, ``int`` (optionally ``step``,
``log``). ``when: {param: [values]}`` makes a parameter conditional on an earlier one (Optuna's
define-by-run): it is sampled only when the condition holds, and otherwise the base config's value stands.
Every key and every value a parameter can take is checked against the run config before Ray starts.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from flexkd.config import (
    Config,
    ConfigError,
    check_run_name,
    from_dict,
    read_config_dict,
    to_dict,
    valid_keys,
)
from flexkd.dotted import build_dataclass, dotted, merge, parse_overrides, read_yaml
from flexkd.plan import RunPlan

SWEEP_DIR = Path(__file__).parent / "sweeps"
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "bundles")


@dataclass
class SweepObjective:
    metric: str = "val/accuracy"
    """Metric the sweep optimises (a key the loop reports at evaluation, e.g. val/accuracy, val/rouge_l)."""
    mode: str = "max"
    """max | min."""


# What every trial reports at its end besides val/* and test/* (flexkd/footprint.py): objectives too.
FOOTPRINT_METRICS = ("perf/student_params", "perf/student_mb", "perf/latency_ms", "perf/throughput")
SAMPLERS = ("tpe", "nsga2")


@dataclass
class Scheduler:
    name: str = "asha"
    """asha (stop weak trials early) | none."""
    grace_period: int = 1
    """Evaluations every trial gets before ASHA may stop it."""
    reduction_factor: int = 2
    """ASHA keeps 1/reduction_factor of the trials at each rung."""


@dataclass
class Resources:
    cpus_per_trial: float = 1.0
    """CPUs of a trial's own process (it trains there when scaling.num_workers is 0)."""
    gpus_per_trial: float = 0.0
    """GPUs of a trial's own process (scaling.num_workers 0 with run.device cuda)."""


@dataclass
class Tracking:
    experiment: str = ""
    """MLflow experiment; empty: flexkd-<sweep name>."""
    register_as: str = ""
    """Registered-model name for the best students; empty: flexkd-<sweep name>."""
    register_top: int = 1
    """How many of the best students to register (the best gets the alias 'champion'); 0: none."""


@dataclass
class SweepSpec:
    name: str = ""
    """Sweep name (default: the file's name)."""
    base: str = ""
    """Run preset or YAML file every trial starts from (a relative path: relative to the sweep file)."""
    overrides: list = field(default_factory=list)
    """key=value overrides of the base, the same for every trial."""
    space: dict = field(default_factory=dict)
    """Search space over dotted run-config keys (see tuning/space.py)."""
    objective: SweepObjective = field(default_factory=SweepObjective)
    objectives: list = field(default_factory=list)
    """Several objectives, [{metric, mode}, ...] (e.g. val/accuracy max, perf/latency_ms min): the sweep's
    answer is then the Pareto front; the first one also serves as `objective` (the leaderboard's order,
    `champion`). Empty: the single `objective`."""
    sampler: str = "tpe"
    """Optuna sampler: tpe (TPE; multi-objective TPE with several objectives) | nsga2 (NSGA-II). Seeded."""
    trials: int = 8
    """Number of trials."""
    concurrency: int = 1
    """Trials running at once."""
    seed: int = 0
    """Seed of the Optuna TPE sampler."""
    start_points: list = field(default_factory=list)
    """Trials to run first, as {parameter: value} (e.g. the defaults you trust); the sampler continues from them."""
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    tracking: Tracking = field(default_factory=Tracking)
    storage_path: str = ""
    """Where Tune keeps the sweep (absolute path or URI); empty: ./flexkd-runs/sweeps."""

    # Worked out once from the fields above (not fields themselves: a sweep file cannot set them).
    @property
    def goals(self) -> list[SweepObjective]:
        """The objectives, first one first: ``objectives`` when given, else ``[objective]``."""
        if not self.objectives:
            return [self.objective]
        return [build_dataclass(SweepObjective, dict(o)) for o in self.objectives]

    @property
    def multi(self) -> bool:
        return len(self.goals) > 1

    @cached_property
    def params(self) -> list[Param]:
        """The space, parsed."""
        return parse_space(self.space)

    @cached_property
    def base_config(self) -> dict:
        """The base run config with the fixed overrides, as a nested dict (the base YAML read once)."""
        return merge(read_config_dict(self.base), parse_overrides(list(self.overrides)))

    @cached_property
    def resolved_base(self) -> dict:
        """The base with its local paths made absolute, here on the driver: trials run in other working
        directories, where ``./flexkd-runs/...`` would mean something else."""
        return to_dict(from_dict(self.base_config))


@dataclass
class Param:
    name: str
    kind: str
    args: Any
    step: float | None = None
    log: bool = False
    when: dict = field(default_factory=dict)


def sweep_names() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def find_sweep_file(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = SWEEP_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"{name}: no such sweep file or shipped sweep; shipped sweeps are {', '.join(sweep_names())}"
    )


def load_sweep(name: str, overrides: list[str] = ()) -> tuple[SweepSpec, dict]:
    """(the sweep spec, its file's raw text as a dict). ``overrides`` may set sweep fields (``trials=4``,
    ``scheduler.name=none``) or run-config keys (``train.steps=50``), which join the fixed overrides."""
    path = find_sweep_file(name)
    raw = read_yaml(path)  # a mapping, or one line naming the file
    sweep_fields = {f.name for f in dataclasses.fields(SweepSpec)}
    sweep_over, run_over = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        (sweep_over if key.split(".")[0] in sweep_fields else run_over).append(item)
    data = merge(raw, parse_overrides(sweep_over))
    data.setdefault("name", path.stem)
    spec = build_dataclass(SweepSpec, data)
    spec.overrides = [*spec.overrides, *run_over]
    beside = path.parent / Path(spec.base).expanduser() if spec.base else None
    if beside is not None and beside.is_file():
        spec.base = str(beside.resolve())  # a relative base is relative to the sweep file, as extends: is
    if "objective" in data and spec.objectives:
        raise ConfigError("objective: give `objective` (one) or `objectives` (several), not both")
    check_sweep(spec)
    spec.objective = spec.goals[0]  # the first objective orders the leaderboard and picks `champion`
    return spec, raw


# ---------------------------------------------------------------------------------------------------------
# Parsing and checking the space


def parse_space(space: dict) -> list[Param]:
    params = []
    seen: dict[str, Param] = {}
    for name, spec in space.items():
        where = f"space.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(
                f"{where}: expected a mapping such as {{choice: [...]}} or {{loguniform: [lo, hi]}}"
            )
        kinds = [k for k in spec if k in DISTRIBUTIONS]
        extra = [k for k in spec if k not in (*DISTRIBUTIONS, "when", "step", "log")]
        if len(kinds) != 1 or extra:
            raise ConfigError(
                f"{where}: give exactly one of {', '.join(DISTRIBUTIONS)} (plus optional when, step, log)"
            )
        kind = kinds[0]
        args = spec[kind]
        if kind in ("choice",) and not (isinstance(args, list) and args):
            raise ConfigError(f"{where}.choice: expected a non-empty list")
        if kind == "bundles" and not (isinstance(args, dict) and args):
            raise ConfigError(f"{where}.bundles: expected a mapping of name -> {{key: value}}")
        if kind == "bundles":
            for bundle, keys in args.items():
                if not isinstance(keys, dict) or not keys:
                    raise ConfigError(
                        f"{where}.bundles.{bundle}: expected a mapping of run keys to values, got {keys!r}"
                    )
        if kind in ("uniform", "loguniform", "int"):
            if not (isinstance(args, list) and len(args) == 2):
                raise ConfigError(f"{where}.{kind}: expected [low, high]")
            try:
                low, high = (int(a) if kind == "int" else float(a) for a in args)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{kind}: bounds must be numbers, got {args}") from None
            if low > high or (kind == "loguniform" and low <= 0):
                raise ConfigError(f"{where}.{kind}: bad bounds {args} (low <= high; > 0 for loguniform)")
            args = [low, high]
        when = spec.get("when") or {}
        for other, values in when.items():
            if other not in seen:
                raise ConfigError(f"{where}.when: {other!r} is not a parameter defined before {name!r}")
            allowed = _choices(seen[other])
            if allowed is None or not isinstance(values, list) or not set(values) <= set(allowed):
                raise ConfigError(f"{where}.when: {other} takes {allowed}; the condition names {values!r}")
        param = Param(name, kind, args, spec.get("step"), bool(spec.get("log", False)), dict(when))
        params.append(param)
        seen[name] = param
    return params


def _choices(param: Param) -> list | None:
    if param.kind == "choice":
        return list(param.args)
    if param.kind == "bundles":
        return list(param.args)
    return None


def _is_run_key(key: str) -> bool:
    keys = set(valid_keys())
    if key in keys:
        return True
    # Keys inside dict-valued fields (student.arch.hidden_size, data.columns.text) are open-ended.
    return any(key.startswith(f"{k}.") for k in ("data.columns", "teacher.arch", "student.arch"))


def param_values(param: Param) -> list[dict]:
    """Representative assignments of one parameter, each as {run key: value}: every choice, every bundle,
    both ends of a range."""
    if param.kind == "bundles":
        return [dict(b) for b in param.args.values()]
    if param.kind == "choice":
        return [{param.name: v} for v in param.args]
    return [{param.name: v} for v in param.args]


def check_objectives(spec: SweepSpec) -> None:
    """Objectives name metrics the trials report; several objectives go with scheduler none only."""
    if not isinstance(spec.objectives, list) or not all(isinstance(o, dict) for o in spec.objectives):
        raise ConfigError("objectives: expected a list of {metric: ..., mode: max|min}")
    for i, o in enumerate(spec.objectives):
        unknown = set(o) - {"metric", "mode"}
        if unknown or "metric" not in o:
            raise ConfigError(f"objectives[{i}]: expected {{metric: ..., mode: max|min}}, got {o!r}")
    where = "objectives[{}]" if spec.objectives else "objective"
    goals = spec.goals
    if len(goals) > 1 and spec.scheduler.name != "none":
        raise ConfigError(
            f"scheduler.name: {spec.scheduler.name} ranks trials by one metric; with {len(goals)} objectives "
            "use scheduler.name=none (Ray Tune's early-stopping schedulers, ASHA among them, take a single "
            "metric and mode)"
        )
    for i, goal in enumerate(goals):
        key = where.format(i)
        if goal.mode not in ("max", "min"):
            raise ConfigError(f"{key}.mode: {goal.mode!r}; choose max or min")
        footprint = goal.metric in FOOTPRINT_METRICS or (
            goal.metric.startswith("perf/latency_b") and goal.metric.endswith("_ms")
        )
        if not (goal.metric.startswith(("val/", "test/")) or footprint):
            raise ConfigError(
                f"{key}.metric: {goal.metric!r}; the loop reports val/... and test/... metrics at evaluation, "
                f"and at its end {', '.join(FOOTPRINT_METRICS)} and perf/latency_b<batch>_ms"
            )
        if spec.scheduler.name == "asha" and (footprint or goal.metric.startswith("test/")):
            raise ConfigError(
                f"{key}.metric: {goal.metric} is reported once, at a trial's end; ASHA compares trials at "
                "every evaluation: set scheduler.name=none"
            )
    metrics = [g.metric for g in goals]
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"objectives: a metric appears twice ({metrics})")


def check_sweep(spec: SweepSpec) -> None:
    """Every key and every value of the space must make a valid run config (static checks, no files)."""
    check_run_name("name", spec.name)  # the sweep's folder and its trials' run names
    if not spec.base:
        raise ConfigError("base: the sweep names no base run config (a preset such as demo, or a YAML file)")
    check_objectives(spec)
    if spec.scheduler.name not in ("asha", "none"):
        raise ConfigError(f"scheduler.name: {spec.scheduler.name!r}; choose asha or none")
    if spec.sampler not in SAMPLERS:
        raise ConfigError(f"sampler: {spec.sampler!r}; choose {' or '.join(SAMPLERS)}")
    for key in ("trials", "concurrency"):
        if getattr(spec, key) < 1:
            raise ConfigError(f"{key}: must be >= 1")
    if spec.storage_path and "://" not in spec.storage_path and not Path(spec.storage_path).is_absolute():
        raise ConfigError(f"storage_path: {spec.storage_path!r} must be an absolute path or a URI")
    base = spec.base_config
    from_dict(base)  # the base alone must be valid
    params = spec.params
    by_name = {p.name: p for p in params}
    for i, point in enumerate(spec.start_points):
        if not isinstance(point, dict):
            raise ConfigError(f"start_points[{i}]: expected a mapping of parameter -> value")
        for name, value in point.items():
            param = by_name.get(name)
            if param is None:
                raise ConfigError(
                    f"start_points[{i}].{name}: not a parameter of the space ({', '.join(by_name)})"
                )
            choices = _choices(param)
            if choices is not None and value not in choices:
                raise ConfigError(f"start_points[{i}].{name}: {value!r} is not one of {choices}")
            if choices is None and not param.args[0] <= float(value) <= param.args[1]:
                raise ConfigError(f"start_points[{i}].{name}: {value} is outside {param.args}")
    for param in params:
        for assignment in param_values(param):
            for key in assignment:
                if not _is_run_key(key):
                    raise ConfigError(
                        f"space.{param.name}: {key!r} is not a run-config key (flexkd show --keys lists them)"
                    )
            try:
                from_dict(merge(base, dotted(assignment)))
            except ConfigError as err:
                raise ConfigError(f"space.{param.name}: {assignment}: {err}") from None


def local_cpus(num_cpus: int | None = None) -> int | None:
    """CPUs of the private local Ray cluster a sweep starts or already runs in (None on a real cluster:
    RAY_ADDRESS is set, and it may autoscale). Read without starting Ray: the cluster this process already
    started if there is one, else ``num_cpus``, else this machine's count."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    ray = sys.modules.get("ray")  # imported only if something here already uses Ray
    if ray is not None and ray.is_initialized():
        return int(ray.cluster_resources().get("CPU", 0)) or None
    return num_cpus or os.cpu_count() or 1


def check_sweep_resources(spec: SweepSpec, plan: RunPlan, cpus: int | None) -> None:
    """On a local cluster, a trial that can never start, or more trials at once than fit, is an error now:
    Ray would otherwise wait for CPUs that never come (after the parent run is written)."""
    if cpus is None:
        return
    per_trial = spec.resources.cpus_per_trial
    if per_trial > cpus:
        raise ConfigError(
            f"resources.cpus_per_trial: {per_trial:g} CPUs per trial; this machine has {cpus} "
            "(a local Ray cluster has the machine's CPUs)"
        )
    need = per_trial + plan.cpus_needed
    if plan.workers and need > cpus:
        raise ConfigError(
            f"scaling.num_workers: {plan.workers} workers x {plan.cpus_per_worker} CPU + {per_trial:g} for the "
            f"trial need {need:g} CPUs; this machine has {cpus} (lower scaling.cpus_per_worker or the worker count)"
        )
    if spec.concurrency * need > cpus:
        raise ConfigError(
            f"concurrency: {spec.concurrency} trials at once x {need:g} CPUs each need {spec.concurrency * need:g}; "
            f"this machine has {cpus} (at most {max(1, int(cpus // need))} at once)"
        )


def check_space_files(spec: SweepSpec, cpus: int | None = -1, num_cpus: int | None = None) -> RunPlan:
    """The file-level checks (models, tokenizers, data, layer ranges, k) and the resources (on a local
    cluster: ``cpus``, default this machine's; None: do not check) for every value of the space; returns
    the base run's plan."""
    from flexkd.checks import preflight

    cpus = local_cpus(num_cpus) if cpus == -1 else cpus
    base = spec.base_config
    plan = preflight(from_dict(base))
    check_sweep_resources(spec, plan, cpus)
    space_configs(spec)  # refuses ranges over keys the teacher signals depend on
    for param in spec.params:
        for assignment in param_values(param):
            try:
                value_plan = preflight(from_dict(merge(base, dotted(assignment))))
                check_sweep_resources(spec, value_plan, cpus)
            except ConfigError as err:
                raise ConfigError(f"space.{param.name}: {assignment}: {err}") from None
    check_shapes(spec, base)
    return plan


SHAPE_KEYS = ("student.", "selection.k", "feature.layers")
MAX_SHAPES = 4096


def _shape_param(param: Param) -> bool:
    keys = list(param.args.values()) if param.kind == "bundles" else [{param.name: None}]
    return any(k.startswith(SHAPE_KEYS) for b in keys for k in b)


def _every_value(param: Param) -> list[dict]:
    """Every value of an int range (its ends elsewhere): a hidden size of 40 may not divide by the heads
    where 32 and 64 do."""
    if param.kind == "int":
        low, high = param.args
        values = list(range(low, high + 1, int(param.step or 1)))
        if len(values) <= 256:
            return [{param.name: v} for v in values]
    return param_values(param)


def check_shapes(spec: SweepSpec, base: dict) -> None:
    """Every combination of the values of the parameters that shape the student or its alignment (student
    folder or architecture, k, the layer map) must make a valid run together: heads that divide the hidden
    size, a k within both hidden sizes, a layer map within both models. Checked by the same pre-flight as a
    run, without Ray; up to MAX_SHAPES combinations (a larger product: each value alone, as above)."""
    import itertools

    from flexkd.checks import preflight

    shape = [p for p in spec.params if _shape_param(p)]
    grids = [_every_value(p) for p in shape]
    count = 1
    for g in grids:
        count *= len(g)
    if not shape or (len(shape) == 1 and len(grids[0]) == len(param_values(shape[0]))):
        return  # at most one such parameter, and each of its values was checked already
    if count > MAX_SHAPES:
        return  # each value alone was checked; the whole product would take too long here
    for combo in itertools.product(*grids):
        assignment: dict = {}
        for part in combo:
            assignment.update(part)
        try:
            preflight(from_dict(merge(base, dotted(assignment))))
        except ConfigError as err:
            together = ", ".join(f"{k}={v}" for k, v in assignment.items())
            raise ConfigError(f"space: {together} (one combination the search can draw): {err}") from None


# ---------------------------------------------------------------------------------------------------------
# Sampling


class DefineByRun:
    """Optuna define-by-run space: samples the parameters in file order, skipping those whose ``when`` fails.

    A class instance (not a closure) so that Tune can pickle it with the searcher's state for ``--resume``.
    Returns nothing: the sampled values are the trial's config, keyed by parameter name.
    """

    def __init__(self, params: list[Param]):
        self.params = params

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = {}
        for p in self.params:
            if any(chosen.get(other) not in values for other, values in p.when.items()):
                continue
            if p.kind in ("choice", "bundles"):
                options = list(p.args)
                value = trial.suggest_categorical(p.name, options)
            elif p.kind == "int":
                value = trial.suggest_int(p.name, p.args[0], p.args[1], step=int(p.step or 1), log=p.log)
            else:
                value = trial.suggest_float(
                    p.name, p.args[0], p.args[1], log=p.kind == "loguniform" or p.log, step=p.step
                )
            chosen[p.name] = value


def trial_overrides(spec: SweepSpec, sampled: dict) -> dict[str, Any]:
    """A trial's sampled parameters as run-config overrides {dotted key: value} (bundles expanded)."""
    params = {p.name: p for p in spec.params}
    out: dict[str, Any] = {}
    for name, value in sampled.items():
        param = params.get(name)
        if param is None:
            continue
        if param.kind == "bundles":
            out.update(param.args[value])
        else:
            out[name] = value
    return out


def trial_config(spec: SweepSpec, sampled: dict, run_name: str) -> Config:
    """The run config of one trial: the (resolved) base with its fixed overrides, then the sampled values."""
    data = merge(spec.resolved_base, dotted(trial_overrides(spec, sampled)))
    data = merge(data, {"run": {"name": run_name}})
    return from_dict(data)


# Keys whose values change what the sweep driver prepares before the first trial: the teacher signals
# (flexkd.signals.MATERIAL_KEYS, by prefix) and the scoring passes (plus the keys that turn them on).
PREPARED_PREFIXES = (
    "teacher.",
    "student.path",
    "data.",
    "run.precision",
    "feature.layers",
    "feature.loss",
    "kd.loss",
    "kd.top_k",
    "kd.temperature",
    "signals.",
    "scoring.",
)


def _prepared(key: str) -> bool:
    return key.startswith(PREPARED_PREFIXES)


def space_configs(spec: SweepSpec) -> list[Config]:
    """Every combination of the categorical parameters that change what the driver prepares (teacher
    signals, scoring passes), each as a trial config would be; ``when`` conditions are ignored, so this
    covers every trial (and perhaps a few combinations no trial draws). A continuous parameter over such a
    key is refused where it would change the signals (each value would need its own build)."""
    import itertools

    base = spec.resolved_base
    axes = []
    for p in spec.params:
        keys = {k for a in param_values(p) for k in a}
        if not any(_prepared(k) for k in keys):
            continue
        if p.kind in ("choice", "bundles"):
            axes.append(param_values(p))
            continue
        if p.name == "kd.temperature":
            cfg = from_dict(base)
            if cfg.kd.top_k and cfg.data.task != "classification" and cfg.signals.mode != "live":
                raise ConfigError(
                    f"space.{p.name}: top-k teacher signals (kd.top_k={cfg.kd.top_k}) store the tail at fixed "
                    "temperatures; search it as a choice, store full logits (kd.top_k=0) or set signals.mode=live"
                )
            continue
        if p.name.startswith("scoring."):
            continue  # trials score such values themselves (cached)
        if from_dict(base).signals.mode != "live":
            raise ConfigError(
                f"space.{p.name}: a {p.kind} range over a key the teacher signals depend on; each value needs its "
                "own build before the first trial, so search it as a choice (or set signals.mode=live)"
            )
    out = []
    for combo in itertools.product(*axes) if axes else [()]:
        data = base
        for assignment in combo:
            data = merge(data, dotted(assignment))
        out.append(from_dict(data))
    return out


def describe(spec: SweepSpec) -> str:
    """The resolved space, resources and concurrency, as `flexkd sweep --dry-run` prints them."""
    base = from_dict(spec.base_config)
    lines = [
        f"sweep {spec.name}: {spec.trials} trials, {spec.concurrency} at a time, seed {spec.seed}",
        f"base: {spec.base} + {spec.overrides or 'no overrides'}",
        (
            "objectives (Pareto front): " + ", ".join(f"{g.mode} {g.metric}" for g in spec.goals)
            if spec.multi
            else f"objective: {spec.objective.mode} {spec.objective.metric}"
        )
        + f"; sampler {spec.sampler}",
        f"scheduler: {spec.scheduler.name}"
        + (
            f" (grace {spec.scheduler.grace_period} evaluations, reduction {spec.scheduler.reduction_factor})"
            if spec.scheduler.name == "asha"
            else ""
        ),
        f"per trial: {spec.resources.cpus_per_trial:g} CPU for the trial process"
        + (
            f" + {base.scaling.num_workers} Ray Train worker(s) x {base.scaling.cpus_per_worker} CPU"
            if base.scaling.num_workers
            else " (it trains in place: scaling.num_workers=0)"
        ),
        "space:",
    ]
    for p in spec.params:
        cond = f"  when {p.when}" if p.when else ""
        if p.kind == "bundles":
            body = "; ".join(f"{n} = {b}" for n, b in p.args.items())
            lines.append(f"  {p.name}: one of {{{body}}}{cond}")
        else:
            lines.append(f"  {p.name}: {p.kind} {p.args}{f' step {p.step}' if p.step else ''}{cond}")
    return "\n".join(lines)
