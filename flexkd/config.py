"""Run configuration: nested dataclasses, YAML presets, dotted ``key=value`` overrides.

One vocabulary of dotted keys (``selection.k``, ``kd.weight``, ``optim.lr`` ...) serves YAML files, the CLI,
the sweep space, MLflow params and the exported best config. The generic dotted-config machine is
``flexkd.dotted``; this module is the schema and its static checks. It imports no torch: every check here
runs in well under a second, before any model, tokenizer or Ray worker exists. Checks that need files
(model configs, tokenizers, dataset columns) live in ``flexkd.checks``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flexkd.dotted import (
    ConfigError,
    build_dataclass,
    field_docs,
    get_key,
    merge,
    parse_overrides,
    read_yaml,
)
from flexkd.layermap import parse_layer_map

PRESET_DIR = Path(__file__).parent / "configs"


# ---------------------------------------------------------------------------------------------------------
# The groups. Each field's docstring is what `flexkd show --keys` prints.


@dataclass
class Run:
    name: str = "run"
    """Run name; also the default output folder name (./flexkd-runs/<run.name>), so no '/', '..' or absolute path."""
    output_dir: str = ""
    """Where artifacts go. Empty: ./flexkd-runs/<run.name>. Relative paths are relative to the working directory."""
    seed: int = 0
    """Seed for model init, data order and the random selection strategy."""
    device: str = "auto"
    """auto | cpu | cuda. auto picks cuda when available."""
    precision: str = "fp32"
    """fp32 | bf16: the forward and losses under bf16 autocast; weights, gradients and AdamW state stay fp32.
    Fast on CUDA and on CPUs with AMX (0.68x the fp32 step of a MiniLM-L3 student on 2 cores:
    benchmarks/cpu_step.py); CPUs without bf16 units emulate it slowly. Stored fp32 teacher signals serve it."""


@dataclass
class Data:
    task: str = "classification"
    """classification (text, label) | instruction (instruction, input?, response) | summarization (document, summary)."""
    source: str = "demo"
    """'demo' (built-in generated task), a local .json/.jsonl/.csv/.parquet file or folder, or a Hub dataset name."""
    subset: str = ""
    """Hub dataset configuration name, if the dataset has several."""
    train_split: str = "train"
    """Split that training, scoring and (when no val_split) validation are cut from."""
    val_split: str = ""
    """Validation split name; empty: a local folder's own validation file (validation/valid/val/dev.jsonl ...), else hold out data.val_size examples of the train split."""
    test_split: str = ""
    """Test split name; empty: a local folder's own test file (test.jsonl ...), else hold out data.test_size examples of the train split (0 for none)."""
    val_size: int = 200
    """Examples held out for validation when val_split is empty."""
    test_size: int = 0
    """Examples held out for testing when test_split is empty."""
    columns: dict = field(default_factory=dict)
    """Map from the task's fields (text, label / instruction, input, response / document, summary) to column names."""
    template: str = ""
    """Prompt template with {field} slots; 'chat' uses the tokenizer's chat template; empty: the task's default."""
    max_length: int = 128
    """Tokens per example (prompt + response for generation tasks); longer prompts are cut."""
    max_response_length: int = 64
    """Tokens kept of a response or summary (generation tasks)."""
    max_train_examples: int = 0
    """Use at most this many training examples (0: all)."""
    split_seed: int = 1234
    """Seed of the train/val/test cut and of the scoring-set draw; independent of run.seed so seeds share data."""
    split_by_input: bool = False
    """Carve held-out splits by model input: rows that ask the same question (text, instruction + input, or
    document) go to one split together, so no carved-out row repeats a training row's input (a carved split may
    end a few rows over its size). For corpora that repeat their questions, such as ChatterBot's Q/A."""
    cache_dir: str = ""
    """Folder of the tokenised training table (Arrow, memory-mapped, one file per data + tokenizer fingerprint,
    shared by every run, worker and trial that reads it); empty: $FLEXKD_DATA_CACHE if set, else
    <scaling.storage_path>/data-cache when that is a local or shared folder, else ./flexkd-runs/data-cache."""
    num_proc: int = 0
    """Processes that tokenise the training rows (datasets.map); 0: one below 50,000 rows, else up to 8 (the CPUs)."""


@dataclass
class Teacher:
    path: str = ""
    """The fine-tuned teacher: a Hugging Face folder or Hub name. Frozen during distillation."""
    base: str = ""
    """`flexkd teacher` fine-tunes this model (folder or Hub name) into teacher.path; empty: build from teacher.arch."""
    arch: dict = field(default_factory=dict)
    """Architecture to build from a config (model_type plus config fields) when teacher.base is empty."""
    tokenizer: str = ""
    """Tokenizer folder or Hub name for a teacher built from arch; 'demo' builds the demo task's word tokenizer."""
    auto_prepare: bool = False
    """Run `flexkd teacher` first when teacher.path does not exist yet (the demo presets do)."""
    steps: int = 600
    """Optimizer steps of the teacher fine-tune (`flexkd teacher`)."""
    lr: float = 1e-3
    """Peak learning rate of the teacher fine-tune (AdamW; weight decay and clipping are optim.weight_decay / optim.max_grad_norm)."""
    batch_size: int = 32
    """Batch size of the teacher fine-tune."""
    warmup_steps: int = 0
    """Linear warm-up steps of the teacher fine-tune (not optim.warmup_steps, which is the student's)."""
    schedule: str = "cosine"
    """Learning-rate schedule of the teacher fine-tune after warm-up: cosine | linear | constant."""
    max_length: int = 0
    """Tokens per example in the teacher fine-tune; 0: data.max_length (what the teacher reads when distilling)."""
    eval_every: int = 100
    """Validate the teacher every this many fine-tune steps (and at the end), shown on its progress line; 0: only at the end."""


@dataclass
class Student:
    path: str = ""
    """Pretrained student to start from (folder or Hub name); empty: build a fresh one from student.arch."""
    tokenizer: str = ""
    """Tokenizer of a fresh student (folder, Hub name or 'demo'); empty: the teacher's. Checked against the teacher's: logit KD on generation tasks needs one vocabulary, else identical splits."""
    arch: dict = field(default_factory=dict)
    """Architecture of a fresh student: model_type plus config fields; missing fields are copied from the teacher,
    except the head count of a hidden size the arch gives without num_attention_heads: the teacher's head width
    (64 without a teacher) is kept, heads = hidden_size // that width, lowered until it divides hidden_size."""


@dataclass
class Scoring:
    method: str = "grad"
    """grad | grad_token | taylor | fisher (see FLEXKD.md section 1)."""
    batch_size: int = 8
    """Scoring batch size; with 'grad' it changes the scores, so it is a sweep dimension."""
    num_examples: int = 512
    """Size of the scoring set drawn from the training split (fewer if the split is smaller)."""
    cache: str = ""
    """Folder (or s3://, gs:// URI) where scores are kept between runs, keyed by content; empty: no cache."""


@dataclass
class Selection:
    strategy: str = "gradient"
    """gradient (Flex-KD) | random | variance | first."""
    k: int = 0
    """Teacher units kept per layer; 0: the student hidden size. Student dims 0..k-1 are aligned."""


@dataclass
class Feature:
    loss: str = "pearson"
    """pearson (Flex-KD) | mse_std | projector (learned linear map, the FitNets baseline) | cka (1 - linear
    CKA of the full hidden states) | gram (cosine-similarity Gram matrices of the positions, arXiv
    2509.25253) | none. projector, cka and gram read every teacher unit: no scoring, no selection."""
    weight: float = 1.0
    """Weight of the feature loss (mean over mapped layers)."""
    layers: Any = "last"
    """Layer map: 'last', 'uniform:K', 'T:S,T:S' or [[T, S], ...]; indices into hidden_states, negatives allowed."""
    tokens: str = "all"
    """Positions aligned: all (every non-padding token) | response (generation: the positions that enter the
    task loss) | head (the positions the task head reads: position 0 of a classifier, whose [CLS] / <s> state
    is all its head sees, or a generation task's response positions)."""


@dataclass
class KD:
    loss: str = "fkl"
    """fkl | rkl | skl | srkl | jsd | none: logit distillation on the task-loss positions."""
    weight: float = 1.0
    """Weight of the logit-KD loss."""
    temperature: float = 1.0
    """Softmax temperature; the loss is scaled by temperature**2."""
    skew: float = 0.1
    """Mixing weight a of the skew losses skl and srkl (DistiLLM)."""
    top_k: int = 0
    """Causal LMs: KD over the teacher's top-k tokens plus one bucket for the rest (what cached signals store); 0: the full vocabulary (exact)."""


@dataclass
class Task:
    weight: float = 1.0
    """Weight of the student's own task cross-entropy."""


@dataclass
class Optim:
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: cosine | linear | constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""


@dataclass
class Train:
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Global batch: examples per optimizer step, whatever the number of workers."""
    grad_accum: int = 1
    """Micro-batches per step; the micro-batch is batch_size / (workers * grad_accum)."""
    log_every: int = 10
    """Report training metrics every this many steps."""
    eval_every: int = 100
    """Validate every this many steps (and at the end); 0: only at the end."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""


@dataclass
class Eval:
    batch_size: int = 64
    """Evaluation batch size."""
    max_examples: int = 0
    """Evaluate on at most this many examples per split (0: all)."""
    max_new_tokens: int = 64
    """Greedy decoding budget for generation tasks."""


@dataclass
class Scaling:
    num_workers: int = 0
    """0: run in this process without Ray; N >= 1: Ray Train with N workers."""
    use_gpu: bool = False
    """One GPU per worker."""
    strategy: str = "ddp"
    """ddp | fsdp: how the student is wrapped across workers (the teacher never is)."""
    cpus_per_worker: int = 1
    """CPUs reserved per Ray Train worker."""
    storage_path: str = ""
    """Ray Train storage: absolute path or cloud URI; empty: ./flexkd-runs/ray."""
    max_failures: int = 0
    """Worker-group restarts allowed; each resumes from the latest checkpoint."""


@dataclass
class Signals:
    mode: str = "auto"
    """auto (train from cached teacher signals when they exist) | cached (they must exist) | live (run the teacher in the loop)."""
    path: str = ""
    """Folder or s3://, gs:// URI holding signal caches, one content-addressed folder each; empty: <scaling.storage_path>/signals, else ./flexkd-runs/signals."""
    dtype: str = "float32"
    """Storage dtype of hidden states and logits: float32 (exact) | bfloat16 | float16."""
    units: str = "all"
    """all: every unit of the mapped teacher layers (serves any k or strategy) | selected: only the build's selected units."""
    max_gb: float = 50.0
    """A build whose estimate exceeds this many GB stops before writing anything."""
    batch_size: int = 32
    """Teacher batch size of the build."""
    shard_examples: int = 256
    """Examples per shard file (the unit of parallel writing and of resuming an interrupted build)."""
    actors: int = 0
    """Teacher copies of the Ray Data build; 0: one per GPU with scaling.use_gpu, else one per 2 CPUs of the cluster."""
    local_cache_gb: float = 20.0
    """Shards of an s3://, gs:// cache are fetched to local disk, at most this many GB per cache and node (least recently used evicted first); must hold the shards of one micro-batch per process of the node."""
    local_cache_dir: str = ""
    """Folder of those fetched shards, one subfolder per cache key, shared by a node's processes; empty: <system temp dir>/flexkd-signals."""


@dataclass
class Config:
    run: Run = field(default_factory=Run)
    data: Data = field(default_factory=Data)
    teacher: Teacher = field(default_factory=Teacher)
    student: Student = field(default_factory=Student)
    scoring: Scoring = field(default_factory=Scoring)
    selection: Selection = field(default_factory=Selection)
    feature: Feature = field(default_factory=Feature)
    kd: KD = field(default_factory=KD)
    task: Task = field(default_factory=Task)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    eval: Eval = field(default_factory=Eval)
    scaling: Scaling = field(default_factory=Scaling)
    signals: Signals = field(default_factory=Signals)


# ---------------------------------------------------------------------------------------------------------
# Names the checks accept. The loss/scorer dicts live beside their code; these lists are kept equal to them
# by a test, so that config parsing never imports torch.

TASKS = ("classification", "instruction", "summarization")
TASK_COLUMNS = {
    "classification": ("text", "label"),
    "instruction": ("instruction", "input", "response"),
    "summarization": ("document", "summary"),
}
OPTIONAL_COLUMNS = {"input"}
SCORING_METHODS = ("grad", "grad_token", "taylor", "fisher")
SELECTION_STRATEGIES = ("gradient", "random", "variance", "first")
FEATURE_LOSS_NAMES = ("pearson", "mse_std", "projector", "cka", "gram", "none")
KD_LOSS_NAMES = ("fkl", "rkl", "skl", "srkl", "jsd", "none")
SELECTING_FEATURE_LOSSES = ("pearson", "mse_std")
SIGNAL_DTYPES = ("float32", "bfloat16", "float16")  # the ones that align a selected subspace


def uses_teacher(cfg: Config) -> bool:
    """Does the run read the teacher at all? (SFT does not.)"""
    return (cfg.kd.loss != "none" and cfg.kd.weight > 0) or (
        cfg.feature.loss != "none" and cfg.feature.weight > 0
    )


def uses_features(cfg: Config) -> bool:
    return cfg.feature.loss != "none" and cfg.feature.weight > 0


def uses_selection(cfg: Config) -> bool:
    """Does the run score and select teacher units? (pearson / mse_std with a positive weight.)"""
    return uses_features(cfg) and cfg.feature.loss in SELECTING_FEATURE_LOSSES


def method_name(cfg: Config) -> str:
    """What a run is, in the words of the method spec: ``sft``, ``kd``, ``flexkd+kd``, ``projector+kd``,
    ``flexkd-random+kd`` (a selection other than the gradient one), ``flexkd-mse`` (the mse_std loss)."""
    kd = cfg.kd.loss != "none" and cfg.kd.weight > 0
    if not uses_features(cfg):
        return "kd" if kd else "sft"
    name = {"pearson": "flexkd", "mse_std": "flexkd-mse"}.get(cfg.feature.loss, cfg.feature.loss)
    if uses_selection(cfg) and cfg.selection.strategy != "gradient":
        name += f"-{cfg.selection.strategy}"
    return name + ("+kd" if kd else "")


def _choice(key: str, value: str, allowed: tuple[str, ...]):
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}; choose one of {', '.join(allowed)}")


def _at_least(key: str, value: float, low: float):
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value}")


def _positive(key: str, value: float):
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}: must be a finite number > 0, got {value}")


def _finite_numbers(obj: Any, prefix: str = "") -> None:
    """No float field may be nan or inf: YAML reads `.inf` and `nan` as numbers, and a loss weight of inf
    trains nothing but NaNs."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _finite_numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}: must be a finite number, got {value}")


def check_run_name(key: str, name: str) -> None:
    """A name that becomes a folder under ./flexkd-runs (or a sweep's folder) must stay inside it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.path.isabs(name):
        raise ConfigError(
            f"{key}: {name!r} must be a plain folder name (no '/', '..' or absolute path); it names a folder "
            "under ./flexkd-runs (set run.output_dir to write elsewhere)"
        )


def validate(cfg: Config) -> None:
    """Static checks (no files read). Raises ConfigError naming the key."""
    _finite_numbers(cfg)
    check_run_name("run.name", cfg.run.name)
    _choice("run.device", cfg.run.device, ("auto", "cpu", "cuda"))
    _choice("run.precision", cfg.run.precision, ("fp32", "bf16"))
    _choice("data.task", cfg.data.task, TASKS)
    if not cfg.data.source:
        raise ConfigError("data.source: empty; give 'demo', a local file or folder, or a Hub dataset name")
    allowed_cols = TASK_COLUMNS[cfg.data.task]
    for name in cfg.data.columns:
        if name not in allowed_cols:
            raise ConfigError(
                f"data.columns.{name}: not a field of the {cfg.data.task} task; its fields are {', '.join(allowed_cols)}"
            )
    for key in ("val_size", "test_size", "max_train_examples"):
        _at_least(f"data.{key}", getattr(cfg.data, key), 0)
    _at_least("data.max_length", cfg.data.max_length, 8)
    _at_least("data.max_response_length", cfg.data.max_response_length, 1)
    _at_least("data.num_proc", cfg.data.num_proc, 0)
    # A response takes max_response_length tokens plus its EOS; the prompt needs at least one more.
    if cfg.data.task != "classification" and cfg.data.max_response_length >= cfg.data.max_length - 1:
        raise ConfigError(
            f"data.max_response_length: {cfg.data.max_response_length} leaves no room for the prompt "
            f"within data.max_length={cfg.data.max_length} (at most {cfg.data.max_length - 2})"
        )

    if not cfg.teacher.path:
        raise ConfigError("teacher.path: empty; give the fine-tuned teacher's folder or Hub name")
    if cfg.teacher.base and cfg.teacher.arch:
        raise ConfigError(
            "teacher.arch: set either teacher.base (a model to fine-tune) or teacher.arch, not both"
        )
    if cfg.student.path and cfg.student.arch:
        raise ConfigError(
            "student.arch: set either student.path (a pretrained student) or student.arch, not both"
        )
    if not cfg.student.path and not cfg.student.arch:
        raise ConfigError("student.path: empty, and no student.arch to build one from; give one of the two")
    if cfg.teacher.arch and "model_type" not in cfg.teacher.arch:
        raise ConfigError("teacher.arch.model_type: missing; name the architecture (e.g. bert, llama)")
    for key in ("steps", "batch_size"):
        _at_least(f"teacher.{key}", getattr(cfg.teacher, key), 1)
    _positive("teacher.lr", cfg.teacher.lr)
    for key in ("warmup_steps", "eval_every", "max_length"):
        _at_least(f"teacher.{key}", getattr(cfg.teacher, key), 0)
    _choice("teacher.schedule", cfg.teacher.schedule, ("cosine", "linear", "constant"))
    if cfg.teacher.max_length:
        _at_least("teacher.max_length", cfg.teacher.max_length, 8)
        if cfg.data.task != "classification" and cfg.data.max_response_length >= cfg.teacher.max_length - 1:
            raise ConfigError(
                f"teacher.max_length: {cfg.teacher.max_length} leaves no room for the prompt after "
                f"data.max_response_length={cfg.data.max_response_length} (at least {cfg.data.max_response_length + 2})"
            )
    if cfg.student.path and cfg.student.tokenizer:
        raise ConfigError(
            "student.tokenizer: a pretrained student (student.path) brings its own tokenizer; set one of the two"
        )

    _choice("scoring.method", cfg.scoring.method, SCORING_METHODS)
    _at_least("scoring.batch_size", cfg.scoring.batch_size, 1)
    _at_least("scoring.num_examples", cfg.scoring.num_examples, 1)
    if cfg.scoring.num_examples < cfg.scoring.batch_size:
        raise ConfigError(
            f"scoring.num_examples: {cfg.scoring.num_examples} is smaller than one scoring batch "
            f"(scoring.batch_size={cfg.scoring.batch_size})"
        )
    _choice("selection.strategy", cfg.selection.strategy, SELECTION_STRATEGIES)
    _at_least("selection.k", cfg.selection.k, 0)

    _choice("feature.loss", cfg.feature.loss, FEATURE_LOSS_NAMES)
    _choice("feature.tokens", cfg.feature.tokens, ("all", "response", "head"))
    if cfg.feature.tokens == "response" and cfg.data.task == "classification":
        raise ConfigError(
            "feature.tokens: 'response' needs a generation task; classification has no response tokens"
        )
    parse_layer_map(cfg.feature.layers)  # raises on a malformed map
    _choice("kd.loss", cfg.kd.loss, KD_LOSS_NAMES)
    for key in ("task.weight", "kd.weight", "feature.weight"):
        _at_least(key, get_key(cfg, key), 0)
    _at_least("kd.top_k", cfg.kd.top_k, 0)
    if cfg.kd.top_k and cfg.data.task == "classification":
        raise ConfigError(
            "kd.top_k: applies to causal LMs (instruction, summarization); classification KD uses every class"
        )
    _positive("kd.temperature", cfg.kd.temperature)
    if not 0 < cfg.kd.skew < 1:
        raise ConfigError(f"kd.skew: must be in (0, 1), got {cfg.kd.skew}")
    if cfg.task.weight == 0 and cfg.kd.weight == 0 and cfg.feature.weight == 0:
        raise ConfigError("task.weight: all loss weights are 0, nothing would train")

    _positive("optim.lr", cfg.optim.lr)
    _at_least("optim.weight_decay", cfg.optim.weight_decay, 0)
    _at_least("optim.warmup_steps", cfg.optim.warmup_steps, 0)
    _choice("optim.schedule", cfg.optim.schedule, ("cosine", "linear", "constant"))
    _at_least("optim.max_grad_norm", cfg.optim.max_grad_norm, 0)

    for key in ("steps", "batch_size", "grad_accum", "log_every"):
        _at_least(f"train.{key}", getattr(cfg.train, key), 1)
    for key in ("eval_every", "checkpoint_every"):
        _at_least(f"train.{key}", getattr(cfg.train, key), 0)
    _at_least("eval.batch_size", cfg.eval.batch_size, 1)
    _at_least("eval.max_examples", cfg.eval.max_examples, 0)
    _at_least("eval.max_new_tokens", cfg.eval.max_new_tokens, 1)

    _at_least("scaling.num_workers", cfg.scaling.num_workers, 0)
    _choice("scaling.strategy", cfg.scaling.strategy, ("ddp", "fsdp"))
    _at_least("scaling.cpus_per_worker", cfg.scaling.cpus_per_worker, 0)
    _at_least("scaling.max_failures", cfg.scaling.max_failures, 0)
    if cfg.scaling.strategy == "fsdp" and cfg.feature.loss == "projector":
        raise ConfigError(
            "scaling.strategy: fsdp shards the student alone; the projector baseline (feature.loss=projector) needs ddp"
        )
    shards = max(cfg.scaling.num_workers, 1) * cfg.train.grad_accum
    if cfg.train.batch_size % shards:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} does not split into scaling.num_workers x train.grad_accum "
            f"= {shards} equal micro-batches"
        )
    _choice("signals.mode", cfg.signals.mode, ("auto", "cached", "live"))
    _choice("signals.dtype", cfg.signals.dtype, SIGNAL_DTYPES)
    _choice("signals.units", cfg.signals.units, ("all", "selected"))
    if cfg.signals.units == "selected" and cfg.feature.loss in ("projector", "cka", "gram"):
        raise ConfigError(
            f"signals.units: selected stores a subset of units; feature.loss={cfg.feature.loss} reads all of "
            "them (use all)"
        )
    for key in ("batch_size", "shard_examples"):
        _at_least(f"signals.{key}", getattr(cfg.signals, key), 1)
    _at_least("signals.actors", cfg.signals.actors, 0)
    _positive("signals.max_gb", cfg.signals.max_gb)
    _positive("signals.local_cache_gb", cfg.signals.local_cache_gb)
    if (
        cfg.scaling.storage_path
        and "://" not in cfg.scaling.storage_path
        and not os.path.isabs(cfg.scaling.storage_path)
    ):
        raise ConfigError(
            f"scaling.storage_path: {cfg.scaling.storage_path!r} must be an absolute path or a URI (workers change directory)"
        )


# ---------------------------------------------------------------------------------------------------------
# Loading and dumping


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _looks_like_path(name: str) -> bool:
    return "/" in name or name.endswith((".yaml", ".yml")) or name.startswith(("~", "."))


def find_config_file(name: str, near: Path | None = None) -> Path:
    """A preset name (``demo``) or a path to a YAML file. ``near``: the folder of the file that names it
    (``extends:``), which a relative path is relative to instead of the working directory."""
    path = Path(name).expanduser()
    if near is not None and not path.is_absolute():
        path = near / path
    if path.is_file():
        return path.resolve()
    if near is not None and _looks_like_path(name):
        raise ConfigError(f"{name}: no such config file (relative to {near})")
    preset = PRESET_DIR / f"{name}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"{name}: no such config file or preset; presets are {', '.join(preset_names())}")


def read_config_dict(name: str, near: Path | None = None, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a config file as a nested dict, following ``extends: <preset or file>`` chains; a relative
    ``extends`` path is relative to the file that says it. Groups merge key by key; a dict value (such as
    ``student.arch``) is replaced whole."""
    path = find_config_file(name, near)
    if path in _chain:
        raise ConfigError(
            f"{_chain[-1]}: extends {path}, a cycle ("
            + " -> ".join(str(p) for p in (*_chain[_chain.index(path) :], path))
            + ")"
        )
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: expected a preset name or a file path, got {parent!r}")
        base = read_config_dict(parent, path.parent, (*_chain, path))
        # A file that extends another restates whole fields: its teacher.arch replaces the parent's.
        return merge(base, data, depth=1)
    return data


def from_dict(data: dict) -> Config:
    """Build and validate a Config; unknown keys fail with the valid ones listed."""
    cfg = build_dataclass(Config, data)
    validate(cfg)
    resolve_paths(cfg)
    return cfg


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset name or YAML path, plus ``key=value`` overrides -> validated Config with absolute local paths."""
    data = merge(read_config_dict(name), parse_overrides(list(overrides)))
    return from_dict(data)


def is_local_path(text: str) -> bool:
    """Local paths start with / . ~ or exist; anything else (``org/name``) is read as a Hub name."""
    return text.startswith(("/", ".", "~")) or os.path.exists(text)


def resolve_paths(cfg: Config) -> None:
    """Make local paths absolute (Ray workers change directory) and fill the default output folder."""

    def absolute(text: str) -> str:
        return str(Path(text).expanduser().resolve()) if text and is_local_path(text) else text

    cfg.run.output_dir = absolute(cfg.run.output_dir or f"./flexkd-runs/{cfg.run.name}")
    cfg.teacher.path = absolute(cfg.teacher.path)
    cfg.teacher.base = absolute(cfg.teacher.base)
    if cfg.teacher.tokenizer != "demo":
        cfg.teacher.tokenizer = absolute(cfg.teacher.tokenizer)
    cfg.student.path = absolute(cfg.student.path)
    if cfg.student.tokenizer != "demo":
        cfg.student.tokenizer = absolute(cfg.student.tokenizer)
    cfg.scoring.cache = absolute(cfg.scoring.cache)
    if not cfg.signals.path:
        storage = cfg.scaling.storage_path.rstrip("/")
        cfg.signals.path = f"{storage}/signals" if storage else "./flexkd-runs/signals"
    cfg.signals.path = absolute(cfg.signals.path) if "://" not in cfg.signals.path else cfg.signals.path
    if not cfg.data.cache_dir and os.environ.get("FLEXKD_DATA_CACHE"):
        cfg.data.cache_dir = os.environ["FLEXKD_DATA_CACHE"]
    if not cfg.data.cache_dir:
        storage = cfg.scaling.storage_path.rstrip("/")
        local = storage and "://" not in storage
        cfg.data.cache_dir = f"{storage}/data-cache" if local else "./flexkd-runs/data-cache"
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    if cfg.data.source != "demo" and not cfg.data.source.startswith("demo:"):
        cfg.data.source = absolute(cfg.data.source)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def valid_keys() -> list[str]:
    """Every dotted key of the run config."""
    from flexkd.dotted import valid_keys as keys_of

    return keys_of(Config)


def key_docs() -> dict[str, str]:
    """Dotted key -> its field docstring (the text `flexkd show --keys` prints)."""
    return field_docs(Config)
