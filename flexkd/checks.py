"""Pre-flight checks that read files: model configs, tokenizers, dataset columns and sizes.

They run on the driver before any weights load and before Ray reserves a worker, and they stay fast: local
model folders are read as JSON (``config.json``, ``tokenizer.json`` through the ``tokenizers`` library) and local
data files by their first lines, so a bad input fails in about a second, not after importing torch. Only Hub
names (and tokenizers without a ``tokenizer.json``) take the slower transformers / datasets path.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexkd import demo
from flexkd.config import (
    SELECTING_FEATURE_LOSSES,
    Config,
    ConfigError,
    is_local_path,
    uses_selection,
    uses_teacher,
)
from flexkd.data import TASK_COLUMNS, check_columns, local_files, peek_columns
from flexkd.plan import ModelDims, RunPlan, make_plan

HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Flex-KD aligns a student's hidden state with the teacher's task-relevant units!",
    "Tokenizers: 12,345 naïve cafés; don't split me unexpectedly?",
]


def _first(conf: dict, keys: tuple[str, ...], what: str, where: str) -> int:
    conf = conf.get("text_config") or conf
    for key in keys:
        if isinstance(conf.get(key), int):
            return conf[key]
    raise ConfigError(f"{where}: config.json has no {what} ({' / '.join(keys)})")


def dims_from_dict(conf: dict, where: str) -> ModelDims:
    return ModelDims(
        hidden=_first(conf, HIDDEN_KEYS, "hidden size", where),
        layers=_first(conf, LAYER_KEYS, "layer count", where),
        model_type=str(conf.get("model_type", "")),
        vocab=int((conf.get("text_config") or conf).get("vocab_size") or 0),
    )


def model_dims(source: str, key: str) -> ModelDims:
    """Hidden size and depth of a model folder (read as JSON) or Hub name (through transformers)."""
    if is_local_path(source):
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"{key}: {source} does not exist")
        conf = path / "config.json"
        if not conf.is_file():
            raise ConfigError(f"{key}: {source} is not a Hugging Face model folder (no config.json)")
        try:
            return dims_from_dict(json.loads(conf.read_text()), f"{key}: {conf}")
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {conf} is not valid JSON ({err})") from None
    try:
        from transformers import AutoConfig

        return dims_from_dict(AutoConfig.from_pretrained(source).to_dict(), key)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{key}: {source!r} is not a local folder (local paths start with / . or ~) and could not be "
            f"loaded from the Hugging Face Hub ({str(err).splitlines()[0]})"
        ) from None


def arch_dims(arch: dict, like: ModelDims | None, key: str) -> ModelDims:
    """Dims of a model to be built from an architecture dict (fields it omits come from ``like``)."""
    merged = {"model_type": like.model_type} if like else {}
    merged.update(arch)
    for keys, attr in ((HIDDEN_KEYS, "hidden"), (LAYER_KEYS, "layers")):
        if not any(k in merged for k in keys):
            if like is None:
                raise ConfigError(f"{key}.{keys[0]}: missing from the architecture")
            merged[keys[0]] = getattr(like, attr)
    return dims_from_dict(merged, key)


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


def _fast_tokenizer(source: str):
    """A ``tokenizers.Tokenizer`` from a local folder's tokenizer.json, or None (then transformers decides)."""
    if source == "demo" or not is_local_path(source):
        return None
    file = Path(source, "tokenizer.json")
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(file))
    tok.no_padding()  # some folders save a fixed padding length; the probe compares the text's own tokens
    tok.no_truncation()
    return tok


def _vocab_and_tokens(source: str, task: str, texts: list[str]):
    """(token -> id vocabulary, per text the tokens that are not special) for a tokenizer source."""
    if source == "demo":
        tok = demo.build_tokenizer(task)
        return tok.get_vocab(), [
            tok.convert_ids_to_tokens(tok(t, add_special_tokens=False)["input_ids"]) for t in texts
        ]
    fast = _fast_tokenizer(source)
    if fast is not None:
        return fast.get_vocab(), [fast.encode(t, add_special_tokens=False).tokens for t in texts]
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer: cannot load {source!r}: {str(err).splitlines()[0]}") from None
    return tok.get_vocab(), [
        tok.convert_ids_to_tokens(tok(t, add_special_tokens=False)["input_ids"]) for t in texts
    ]


def check_tokenizers(
    teacher_src: str, student_src: str, task: str, needs_vocab: bool, texts: list[str]
) -> None:
    """The pair must share a vocabulary when logits are compared over it (generation tasks); otherwise they
    must at least split text identically, token for token, so that positions align (e.g. MPNet and BERT)."""
    texts = PROBE_TEXTS + texts
    t_vocab, t_tokens = _vocab_and_tokens(teacher_src, task, texts)
    s_vocab, s_tokens = _vocab_and_tokens(student_src, task, texts)
    if t_vocab == s_vocab:
        return
    if needs_vocab:
        differing = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise ConfigError(
            f"student.path: the teacher ({teacher_src}) and student ({student_src}) have different tokenizers "
            f"({len(t_vocab)} vs {len(s_vocab)} tokens, {differing} entries differ); a {task} task compares "
            f"their output distributions token by token, which needs one vocabulary"
        )
    for i, (a, b) in enumerate(zip(t_tokens, s_tokens)):
        if [x.lower() for x in a] != [x.lower() for x in b]:
            at = next(
                (j for j, (x, y) in enumerate(zip(a, b)) if x.lower() != y.lower()), min(len(a), len(b))
            )
            raise ConfigError(
                f"student.path: the teacher ({teacher_src}) and student ({student_src}) tokenizers split text "
                f"differently (probe {i}, token {at}: {a[at : at + 1]} vs {b[at : at + 1]}); feature distillation "
                f"needs positions that align one to one"
            )


# ---------------------------------------------------------------------------------------------------------
# Data


def check_data(cfg: Config) -> tuple[int | None, list[str]]:
    """(train rows or None when unknown without loading, a few texts for the tokenizer probe)."""
    source = cfg.data.source
    if source == "demo" or source.startswith("demo:"):
        rows = demo.make_split("train", cfg.data.task)[:8]
        return demo.SIZES["train"], [str(next(iter(r.values()))) for r in rows]
    if not is_local_path(source):
        return None, []  # a Hub dataset: checked when it loads (still on the driver, before any worker)
    files = local_files(source)
    train_rows = None
    for split, path in files.items():
        names, rows = peek_columns(path)
        if rows == 0:
            raise ConfigError(f"data.source: {path} is empty (no rows)")
        check_columns(names, cfg.data, str(path))
        if split == "train":
            train_rows = rows
    texts = []
    if files["train"].suffix == ".jsonl":
        text_field = TASK_COLUMNS[cfg.data.task][0]
        column = cfg.data.columns.get(text_field, text_field)
        with files["train"].open(encoding="utf-8") as f:
            for line, _ in zip(f, range(8)):
                value = json.loads(line).get(column)
                if value:
                    texts.append(str(value)[:2000])
    held = (0 if cfg.data.val_split else cfg.data.val_size) + (
        0 if cfg.data.test_split else cfg.data.test_size
    )
    if train_rows is not None and train_rows <= held:
        raise ConfigError(
            f"data.val_size: holding out {held} examples leaves nothing to train on in {files['train']} ({train_rows} rows)"
        )
    return (train_rows - held if train_rows is not None else None), texts


# ---------------------------------------------------------------------------------------------------------


def teacher_ready(cfg: Config) -> bool:
    path = cfg.teacher.path
    return not is_local_path(path) or Path(path, "config.json").is_file()


def _teacher(cfg: Config) -> tuple[ModelDims | None, str, list[str]]:
    """(the teacher's dims, where its tokenizer is, notes). A run that needs no teacher (fine-tuning the
    teacher itself) reads it only if it is there: a fresh student's architecture copies missing fields."""
    needed = uses_teacher(cfg)
    if teacher_ready(cfg) and cfg.teacher.path != "demo":
        try:
            return model_dims(cfg.teacher.path, "teacher.path"), cfg.teacher.path, []
        except ConfigError:
            if needed:
                raise
            return None, cfg.teacher.path, []
    if cfg.teacher.auto_prepare:
        note = f"teacher.path: {cfg.teacher.path} is not fine-tuned yet; checked against its recipe instead"
        return check_teacher_recipe(cfg), cfg.teacher.tokenizer or cfg.teacher.base, [note]
    if needed:
        raise missing_teacher(cfg)
    return None, cfg.teacher.path, []


def missing_teacher(cfg: Config) -> ConfigError:
    return ConfigError(
        f"teacher.path: {cfg.teacher.path} does not exist; run `flexkd teacher` on this config to fine-tune "
        f"one, or set teacher.auto_prepare=true"
    )


def preflight(cfg: Config) -> RunPlan:
    """Every file-level check of a run, and the run plan they establish. Raises ConfigError naming the key
    or file. The one owner of these checks: callers keep the plan instead of checking again."""
    train_rows, texts = check_data(cfg)
    teacher, teacher_tok, notes = _teacher(cfg)
    if cfg.student.path:
        student = model_dims(cfg.student.path, "student.path")
    else:
        student = arch_dims(cfg.student.arch, teacher, "student.arch")
    plan = make_plan(cfg, teacher, student, train_rows)
    plan.notes = [*notes, *plan.notes]
    if (
        cfg.feature.loss in SELECTING_FEATURE_LOSSES
        and cfg.feature.tokens == "response"
        and cfg.data.task == "classification"
    ):
        raise ConfigError(
            "feature.tokens: 'response' needs a generation task; classification has no response tokens"
        )
    if cfg.student.path and uses_teacher(cfg):
        needs_vocab = cfg.data.task != "classification"
        check_tokenizers(teacher_tok, cfg.student.path, cfg.data.task, needs_vocab, texts)
    scoring_rows = (
        min(cfg.scoring.num_examples, train_rows) if train_rows is not None else cfg.scoring.num_examples
    )
    if uses_selection(cfg) and scoring_rows < cfg.scoring.batch_size:
        raise ConfigError(
            f"scoring.batch_size: the scoring set has {scoring_rows} examples, fewer than one batch of "
            f"{cfg.scoring.batch_size}"
        )
    return plan


def check_teacher_recipe(cfg: Config) -> ModelDims:
    """Checks for `flexkd teacher`: something to start from and a tokenizer."""
    if cfg.teacher.base:
        return model_dims(cfg.teacher.base, "teacher.base")
    if not cfg.teacher.arch:
        raise ConfigError(
            "teacher.base: empty, and no teacher.arch to build a teacher from; give one of the two"
        )
    if not cfg.teacher.tokenizer:
        raise ConfigError(
            "teacher.tokenizer: a teacher built from teacher.arch needs a tokenizer (folder, Hub name or 'demo')"
        )
    if (
        cfg.teacher.tokenizer != "demo"
        and is_local_path(cfg.teacher.tokenizer)
        and not Path(cfg.teacher.tokenizer).exists()
    ):
        raise ConfigError(f"teacher.tokenizer: {cfg.teacher.tokenizer} does not exist")
    return arch_dims(cfg.teacher.arch, None, "teacher.arch")
