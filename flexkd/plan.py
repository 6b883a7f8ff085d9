"""The run plan: what a run will do, worked out once from the config and the models' own config files.

``flexkd.checks.preflight`` reads the files and returns a ``RunPlan``; everything downstream takes that plan
instead of working the same things out again: the loop (layer map, k, which terms are on, whether the
teacher loads), `flexkd score`, the Ray Train driver (workers and their resources) and the sweep (one plan
per value of its space, before Ray starts). The plan travels to Ray workers as a plain dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flexkd.config import Config, uses_features, uses_selection, uses_teacher
from flexkd.dotted import ConfigError
from flexkd.layermap import resolve_layer_map


@dataclass
class ModelDims:
    hidden: int
    layers: int
    model_type: str
    vocab: int = 0
    heads: int = 0
    """Attention heads (0: not known)."""


@dataclass
class RunPlan:
    teacher: ModelDims | None
    """The teacher's dims; None for a run that reads nothing of a teacher (fine-tuning the teacher itself)."""
    student: ModelDims
    layer_map: list[tuple[int, int]]
    """Explicit non-negative (teacher, student) indices into ``hidden_states``; empty without a teacher."""
    k: int
    """Teacher units kept per mapped layer (selection.k, default the student hidden size)."""
    terms: list[str]
    """The loss terms with a positive weight: a subset of task, kd, feat."""
    loads_teacher: bool
    """Does the loop run the teacher (KD or a feature term) live? False when it reads cached signals."""
    selects_units: bool
    """Does the run score and select teacher units (pearson / mse_std)?"""
    train_rows: int | None
    """Training rows, when known without loading the data (local files, the demo)."""
    workers: int = 0
    """Ray Train workers (0: in this process)."""
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    signals: str = ""
    """The teacher-signal cache folder the loop reads instead of running the teacher (``flexkd.signals``)."""
    notes: list[str] = field(default_factory=list)
    """What the checks could not establish yet (said by `flexkd show --check`)."""
    pending: list[str] = field(default_factory=list)
    """What cannot be checked until the teacher exists (`flexkd show --check` before `flexkd teacher`)."""
    data: str = ""
    """Where each split comes from: the run's ``data: train <- ...`` line (``flexkd.data.split_origins``)."""

    @property
    def cpus_needed(self) -> int:
        return self.workers * self.cpus_per_worker

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunPlan:
        data = dict(data)
        for who in ("teacher", "student"):
            if data.get(who) is not None:
                data[who] = ModelDims(**data[who])
        data["layer_map"] = [tuple(pair) for pair in data["layer_map"]]
        return cls(**data)

    def describe(self) -> str:
        where = f"{self.workers} Ray Train worker(s)" if self.workers else "in this process"
        source = f", teacher signals from {self.signals}" if self.signals else ""
        student = (
            f"student hidden {self.student.hidden} x {self.student.layers} layers"
            if self.student.hidden
            else "student size from the teacher"
        )
        if self.pending:
            return f"data, {student}, terms {'+'.join(self.terms)}, {where} (the teacher does not exist yet)"
        teacher = (
            f"teacher hidden {self.teacher.hidden} x {self.teacher.layers} layers"
            if self.teacher
            else "no teacher read"
        )
        return (
            f"{teacher}, {student}, "
            f"layer map {self.layer_map}, k {self.k}, terms {'+'.join(self.terms)}, {where}{source}"
        )

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for t, _ in self.layer_map})


def make_plan(
    cfg: Config,
    teacher: ModelDims | None,
    student: ModelDims,
    train_rows: int | None,
    teacher_pending: bool = False,
) -> RunPlan:
    """The plan from the models' dims; the one place the layer map is resolved and k is range-checked.

    teacher_pending: a needed teacher that does not exist yet (``preflight(teacher_missing_ok=True)``): no
    layer map and no k range, instead of an error."""
    terms = ["task"] if cfg.task.weight > 0 else []
    if cfg.kd.loss != "none" and cfg.kd.weight > 0:
        terms.append("kd")
    if uses_features(cfg):
        terms.append("feat")
    layer_map: list[tuple[int, int]] = []
    k = cfg.selection.k or student.hidden
    if teacher is not None:
        layer_map = resolve_layer_map(cfg.feature.layers, teacher.layers, student.layers)
        if uses_selection(cfg) and not 1 <= k <= min(teacher.hidden, student.hidden):
            raise ConfigError(
                f"selection.k: {k} is out of range; it must be 1..{min(teacher.hidden, student.hidden)} "
                f"(min of teacher hidden {teacher.hidden}, student hidden {student.hidden})"
            )
    elif uses_teacher(cfg) and not teacher_pending:
        raise ConfigError(f"teacher.path: {cfg.teacher.path} is needed by this run and could not be read")
    notes = []
    if cfg.kd.top_k and cfg.data.task != "classification" and cfg.kd.loss in ("rkl", "srkl", "jsd"):
        # benchmarks/signals_cost.py topk: SmolLM2-135M teacher, fresh student, k in 8..512.
        notes.append(
            f"kd.top_k={cfg.kd.top_k} with kd.loss={cfg.kd.loss}: the student's side of this loss sees the rest of "
            "the vocabulary as one bucket; measured gradient cosine to the full loss 0.06-0.92 (forward KL, fkl: "
            ">= 0.977). Prefer fkl with top-k, or kd.top_k=0"
        )
    return RunPlan(
        teacher=teacher,
        student=student,
        layer_map=layer_map,
        k=k,
        terms=terms,
        loads_teacher=uses_teacher(cfg),
        selects_units=uses_selection(cfg),
        train_rows=train_rows,
        workers=cfg.scaling.num_workers,
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        gpus_per_worker=1 if cfg.scaling.use_gpu else 0,
        notes=notes,
    )
