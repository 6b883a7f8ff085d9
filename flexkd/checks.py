"""Pre-flight checks that read files: model configs, tokenizers, dataset columns and sizes.

They run on the driver before any weights load and before Ray reserves a worker, and they stay fast: local
model folders are read as JSON (``config.json``, ``tokenizer.json`` through the ``tokenizers`` library) and local
data files by their first lines, so a bad input fails in about a second, not after importing torch. Only Hub
names (and tokenizers without a ``tokenizer.json``) take the slower transformers / datasets path.
"""

from __future__ import annotations

import json
import os
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
from flexkd.data import (
    TASK_COLUMNS,
    check_columns,
    check_labels,
    column_values,
    held_out_sources,
    local_files,
    origin_line,
    peek_columns,
    planned_origins,
)
from flexkd.plan import ModelDims, RunPlan, make_plan

HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
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
    text = conf.get("text_config") or conf
    heads = next((text[k] for k in HEAD_KEYS if isinstance(text.get(k), int)), 0)
    return ModelDims(
        hidden=_first(conf, HIDDEN_KEYS, "hidden size", where),
        layers=_first(conf, LAYER_KEYS, "layer count", where),
        model_type=str(conf.get("model_type", "")),
        vocab=int(text.get("vocab_size") or 0),
        heads=heads,
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


def arch_heads(arch: dict, like: dict, key: str) -> dict:
    """Attention-head fields of a model built from ``arch``, whose omitted fields come from ``like`` (the
    teacher's config dict, or {}). Returns the fields to set on top of ``like`` + ``arch``.

    The rule (``student.arch`` documents it): heads the arch gives must divide its hidden size; a hidden size
    given without heads keeps the teacher's head width (64 without a teacher): heads = hidden // width, lowered
    until it divides hidden. Key/value heads follow the heads unless the arch gives them.
    """
    hidden_key = next((k for k in ("hidden_size", "n_embd") if k in arch), None)
    head_key = {"n_embd": "n_head"}.get(hidden_key or "", "num_attention_heads")
    if "n_head" in arch or "n_head" in like:
        head_key = "n_head"
    hidden = arch.get(hidden_key) if hidden_key else like.get("hidden_size", like.get("n_embd"))
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        return {}
    out: dict = {}
    heads = arch.get(head_key)
    if heads is None:
        if hidden_key is None:
            return {}  # hidden size and heads both come from the teacher
        like_hidden, like_heads = like.get("hidden_size", like.get("n_embd")), like.get(head_key)
        width = like_hidden // like_heads if isinstance(like_hidden, int) and like_heads else 64
        heads = max(1, hidden // max(1, width))
        while hidden % heads:
            heads -= 1
        out[head_key] = heads
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or hidden % heads:
        raise ConfigError(
            f"{key}.{head_key}: {heads} heads do not divide the hidden size {hidden}; give a divisor of {hidden}"
        )
    kv = arch.get("num_key_value_heads")
    if kv is None and "num_key_value_heads" in like and heads != like.get(head_key):
        out["num_key_value_heads"] = heads
    elif kv is not None and (not isinstance(kv, int) or kv < 1 or heads % kv):
        raise ConfigError(f"{key}.num_key_value_heads: {kv} key/value heads do not divide {head_key}={heads}")
    if "head_dim" in like and "head_dim" not in arch:
        out["head_dim"] = hidden // heads  # the teacher's head width would not fit the new shape
    return out


def arch_dims(arch: dict, like: ModelDims | None, key: str) -> ModelDims:
    """Dims of a model to be built from an architecture dict (fields it omits come from ``like``)."""
    merged = {"model_type": like.model_type} if like else {}
    merged.update(arch)
    for keys, attr in ((HIDDEN_KEYS, "hidden"), (LAYER_KEYS, "layers")):
        if not any(k in merged for k in keys):
            if like is None:
                raise ConfigError(f"{key}.{keys[0]}: missing from the architecture")
            merged[keys[0]] = getattr(like, attr)
    teacher = {"hidden_size": like.hidden, "num_attention_heads": like.heads} if like and like.heads else {}
    arch_heads(arch, teacher, key)
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
    teacher_src: str,
    student_src: str,
    task: str,
    needs_vocab: bool,
    texts: list[str],
    key: str = "student.path",
) -> None:
    """The pair must share a vocabulary when logits are compared over it (generation tasks); otherwise they
    must at least split text identically, token for token, so that positions align (e.g. MPNet and BERT).
    key: the setting that chose the student's tokenizer (student.path, or student.tokenizer)."""
    texts = PROBE_TEXTS + texts
    t_vocab, t_tokens = _vocab_and_tokens(teacher_src, task, texts)
    s_vocab, s_tokens = _vocab_and_tokens(student_src, task, texts)
    if t_vocab == s_vocab:
        return
    if needs_vocab:
        differing = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise ConfigError(
            f"{key}: the teacher ({teacher_src}) and student ({student_src}) have different tokenizers "
            f"({len(t_vocab)} vs {len(s_vocab)} tokens, {differing} entries differ); a {task} task compares "
            f"their output distributions token by token, which needs one vocabulary"
        )
    for i, (a, b) in enumerate(zip(t_tokens, s_tokens)):
        if [x.lower() for x in a] != [x.lower() for x in b]:
            at = next(
                (j for j, (x, y) in enumerate(zip(a, b)) if x.lower() != y.lower()), min(len(a), len(b))
            )
            raise ConfigError(
                f"{key}: the teacher ({teacher_src}) and student ({student_src}) tokenizers split text "
                f"differently (probe {i}, token {at}: {a[at : at + 1]} vs {b[at : at + 1]}); feature distillation "
                f"needs positions that align one to one"
            )


# ---------------------------------------------------------------------------------------------------------
# Data


def check_data(cfg: Config) -> tuple[int | None, list[str], list[str], dict[str, str]]:
    """(train rows or None when unknown without loading, a few texts for the tokenizer probe, the class
    names of a local classification data set or [] when not read here, where each split will come from
    (``flexkd.data.planned_origins``)). Every file of a local folder is checked: columns, and for
    classification that its labels occur in train."""
    source = cfg.data.source
    if source == "demo" or source.startswith("demo:"):
        rows = demo.make_split("train", cfg.data.task)[:8]
        origins = planned_origins(cfg.data, dict(demo.SIZES))
        return demo.SIZES["train"], [str(next(iter(r.values()))) for r in rows], [], origins
    if not is_local_path(source):
        # A Hub dataset: checked when it loads (still on the driver, before any worker).
        return None, [], [], planned_origins(cfg.data, {})
    files = local_files(source)
    train_rows = None
    file_rows = {}
    for split, path in files.items():
        names, rows = peek_columns(path)
        if rows == 0:
            raise ConfigError(f"data.source: {path} is empty (no rows)")
        check_columns(names, cfg.data, str(path))
        file_rows[split] = rows
        if split == "train":
            train_rows = rows
    label_names = []
    if cfg.data.task == "classification":
        column = cfg.data.columns.get("label", "label")
        label_names = check_labels({split: column_values(path, column) for split, path in files.items()})
    texts = []
    if files["train"].suffix == ".jsonl":
        text_field = TASK_COLUMNS[cfg.data.task][0]
        column = cfg.data.columns.get(text_field, text_field)
        with files["train"].open(encoding="utf-8") as f:
            for line, _ in zip(f, range(8)):
                value = json.loads(line).get(column)
                if value:
                    texts.append(str(value)[:2000])
    sources = held_out_sources(cfg.data, files)
    held = (0 if sources["validation"] else cfg.data.val_size) + (
        0 if sources["test"] else cfg.data.test_size
    )
    if train_rows is not None and train_rows <= held:
        raise ConfigError(
            f"data.val_size: holding out {held} examples leaves nothing to train on in {files['train']} ({train_rows} rows)"
        )
    origins = planned_origins(cfg.data, file_rows)
    return (train_rows - held if train_rows is not None else None), texts, label_names, origins


def check_label_count(key: str, folder: str, label_names: list[str]) -> None:
    """A saved classifier's head must have one output per class of the data."""
    if not label_names or not is_local_path(folder) or not Path(folder, "config.json").is_file():
        return
    try:
        conf = json.loads(Path(folder, "config.json").read_text())
    except json.JSONDecodeError:
        return  # model_dims names the file
    count = len(conf.get("id2label") or {}) or conf.get("num_labels")
    if isinstance(count, int) and count != len(label_names):
        raise ConfigError(
            f"{key}: {folder} classifies into {count} labels; the data has {len(label_names)} "
            f"({', '.join(label_names[:10])})"
        )


# ---------------------------------------------------------------------------------------------------------


def teacher_ready(cfg: Config) -> bool:
    path = cfg.teacher.path
    return not is_local_path(path) or Path(path, "config.json").is_file()


def _teacher(cfg: Config, missing_ok: bool = False) -> tuple[ModelDims | None, str | None, list[str]]:
    """(the teacher's dims, where its tokenizer is, notes). A run that needs no teacher (fine-tuning the
    teacher itself) reads it only if it is there: a fresh student's architecture copies missing fields.

    A teacher not fine-tuned yet is checked against its recipe (teacher.base / teacher.arch) when the run
    will make it (teacher.auto_prepare) or ``missing_ok``; with ``missing_ok`` and no recipe either, the
    dims and the tokenizer are None: nothing of the teacher can be checked yet."""
    needed = uses_teacher(cfg)
    if teacher_ready(cfg) and cfg.teacher.path != "demo":
        try:
            return model_dims(cfg.teacher.path, "teacher.path"), cfg.teacher.path, []
        except ConfigError:
            if needed:
                raise
            return None, cfg.teacher.path, []
    recipe = bool(cfg.teacher.base or cfg.teacher.arch)
    if cfg.teacher.auto_prepare or (missing_ok and needed and recipe):
        note = f"teacher.path: {cfg.teacher.path} is not fine-tuned yet; checked against its recipe instead"
        return check_teacher_recipe(cfg), cfg.teacher.tokenizer or cfg.teacher.base, [note]
    if needed and not missing_ok:
        raise missing_teacher(cfg)
    return None, (cfg.teacher.path if not needed else None), []


def missing_teacher(cfg: Config) -> ConfigError:
    return ConfigError(
        f"teacher.path: {cfg.teacher.path} does not exist; run `flexkd teacher` on this config to fine-tune "
        f"one, or set teacher.auto_prepare=true"
    )


def check_writable(key: str, folder: str) -> None:
    """The folder, or the nearest part of it that exists, must be writable by us (nothing is created here)."""
    if not folder or "://" in folder:
        return
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"{key}: {folder}: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK) or os.statvfs(path).f_flag & os.ST_RDONLY:
        raise ConfigError(f"{key}: {folder} is not writable ({path} is read-only for this user)")


# Which head a saved model folder carries, by the class names in its config.json's "architectures".
TASK_HEADS = {"classification": ("ForSequenceClassification",), "generation": ("ForCausalLM", "LMHeadModel")}


def check_model_folder(path: str, task: str, key: str = "--model") -> None:
    """A saved model folder for ``task``: it exists, has a config.json, and (when the config names its
    classes) the head the task needs: a classifier cannot be evaluated on a generation task, nor back."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}: {path} does not exist (give a model folder, e.g. RUN/student)")
    conf = folder / "config.json"
    if not conf.is_file():
        raise ConfigError(f"{key}: {path} is not a Hugging Face model folder (no config.json)")
    try:
        architectures = json.loads(conf.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"{key}: {conf} is not valid JSON ({err})") from None
    wanted = TASK_HEADS["classification" if task == "classification" else "generation"]
    if architectures and not any(a.endswith(wanted) for a in architectures):
        raise ConfigError(
            f"{key}: {path} is a {', '.join(architectures)} model; the {task} task needs a *{' or *'.join(wanted)} model"
        )


def teacher_pending(cfg: Config) -> list[str]:
    """What the checks cannot establish while a needed teacher neither exists nor has a recipe to check."""
    out = ["the teacher's hidden size and depth"]
    if uses_selection(cfg):
        out.append("selection.k's range (1 .. the smaller hidden size)")
    out.append("the layer map (feature.layers)")
    if student_tokenizer_source(cfg)[0]:
        out.append("the student's tokenizer against the teacher's")
    if cfg.data.task == "classification":
        out.append("the teacher's label count")
    return out


def preflight(cfg: Config, teacher_missing_ok: bool = False) -> RunPlan:
    """Every file-level check of a run, and the run plan they establish. Raises ConfigError naming the key
    or file. The one owner of these checks: callers keep the plan instead of checking again.

    teacher_missing_ok (`flexkd show --check`): a teacher that does not exist yet is checked against its
    recipe; without one, what needs the teacher is listed in ``plan.pending`` instead of failing."""
    check_writable("run.output_dir", cfg.run.output_dir)
    train_rows, texts, label_names, origins = check_data(cfg)
    teacher, teacher_tok, notes = _teacher(cfg, teacher_missing_ok)
    pending = teacher_pending(cfg) if teacher is None and teacher_tok is None else []
    if teacher is not None and cfg.data.task == "classification":
        check_label_count("teacher.path", cfg.teacher.path, label_names)
    if cfg.student.path:
        student = model_dims(cfg.student.path, "student.path")
    elif pending and not all(any(k in cfg.student.arch for k in keys) for keys in (HIDDEN_KEYS, LAYER_KEYS)):
        student = ModelDims(hidden=0, layers=0, model_type=str(cfg.student.arch.get("model_type", "")))
        pending.insert(1, "the student's size (student.arch takes what it omits from the teacher)")
    else:
        student = arch_dims(cfg.student.arch, teacher, "student.arch")
    plan = make_plan(cfg, teacher, student, train_rows, teacher_pending=bool(pending))
    plan.notes = [*notes, *plan.notes]
    plan.pending = pending
    plan.data = origin_line(origins)
    if (
        cfg.feature.loss in SELECTING_FEATURE_LOSSES
        and cfg.feature.tokens == "response"
        and cfg.data.task == "classification"
    ):
        raise ConfigError(
            "feature.tokens: 'response' needs a generation task; classification has no response tokens"
        )
    student_tok, key = student_tokenizer_source(cfg)
    if student_tok and uses_teacher(cfg) and teacher_tok is not None:
        needs_vocab = cfg.data.task != "classification"
        check_tokenizers(teacher_tok, student_tok, cfg.data.task, needs_vocab, texts, key)
    scoring_rows = (
        min(cfg.scoring.num_examples, train_rows) if train_rows is not None else cfg.scoring.num_examples
    )
    if uses_selection(cfg) and scoring_rows < cfg.scoring.batch_size:
        raise ConfigError(
            f"scoring.batch_size: the scoring set has {scoring_rows} examples, fewer than one batch of "
            f"{cfg.scoring.batch_size}"
        )
    return plan


def student_tokenizer_source(cfg: Config) -> tuple[str, str]:
    """(the student's own tokenizer source, the key that set it), or ('', '') when it uses the teacher's."""
    if cfg.student.path:
        return cfg.student.path, "student.path"
    if cfg.student.tokenizer:
        return cfg.student.tokenizer, "student.tokenizer"
    return "", ""


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
