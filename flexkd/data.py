"""Task data: loading (demo, local files, Hub), column maps, prompt templates, loss masks, splits, batches.

Rows are plain dicts in the task's own field names (``text``/``label``, ``instruction``/``input``/``response``,
``document``/``summary``); the column map of the config renames dataset columns into them. Encoded examples
carry, per position, the label the *output at that position* must predict (already shifted for causal LMs),
so the loss mask is simply ``labels != -100`` and a classification label is one per example.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from flexkd import demo
from flexkd.config import OPTIONAL_COLUMNS, TASK_COLUMNS, ConfigError, Data

IGNORE = -100  # label of positions that are not part of the task loss

TEMPLATES = {
    "instruction": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "instruction_no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
    "summarization": "Summarize:\n{document}\n\nSummary:\n",
}
TARGET_FIELD = {"instruction": "response", "summarization": "summary"}
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid", "dev"), "test": ("test",)}
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# ---------------------------------------------------------------------------------------------------------
# Loading


def _is_demo(source: str) -> bool:
    return source == "demo" or source.startswith("demo:")


def local_files(source: str) -> dict[str, Path]:
    """Split name -> file for a local source: one file is the train split; a folder holds train/validation/test files."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in FILE_TYPES:
            raise ConfigError(f"data.source: {path}: unsupported file type; use {', '.join(FILE_TYPES)}")
        return {"train": path}
    if path.is_dir():
        found = {}
        for file in sorted(path.iterdir()):
            if file.suffix not in FILE_TYPES:
                continue
            for split, aliases in SPLIT_ALIASES.items():
                if file.stem in aliases:
                    found.setdefault(split, file)
        if "train" not in found:
            raise ConfigError(f"data.source: {path}: no train.(jsonl|json|csv|parquet) file in this folder")
        return found
    raise ConfigError(f"data.source: {source}: no such file or folder")


def jsonl_records(path: Path):
    """(line number, record) of every non-blank line of a JSON-lines file; a line that is not a JSON object
    fails naming the file and the line."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data.source: {path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(
                    f"data.source: {path}:{number}: expected a JSON object, got {line.strip()[:40]}"
                )
            yield number, record


def peek_columns(path: Path) -> tuple[list[str], int]:
    """(column names, row count) of a local file, read without pandas or datasets, for the pre-flight checks.
    Every line of a JSON-lines file is parsed, so that a bad line 500 fails here, naming its line."""
    if path.suffix == ".jsonl":
        names, rows = [], 0
        for _, record in jsonl_records(path):
            if not rows:
                names = list(record)
            rows += 1
        return names, rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8") or "[]")
        except json.JSONDecodeError as err:
            raise ConfigError(f"data.source: {path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise ConfigError(f"data.source: {path}: expected a JSON list of records (or JSON lines)")
        return (list(data[0]) if data else []), len(data)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            names = next(reader, [])
            return names, sum(1 for _ in reader)
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path)
    return list(meta.schema_arrow.names), meta.metadata.num_rows


def column_values(path: Path, column: str) -> list[tuple[str, object]]:
    """(where, value) of one column in every row of a local file; ``where`` is ``file:line`` for JSON lines
    and CSV, ``file [record i]`` for JSON and parquet. A row without the column has the value None."""
    if path.suffix == ".jsonl":
        return [(f"{path}:{n}", r.get(column)) for n, r in jsonl_records(path)]
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            # Line numbers assume one line per row (a quoted newline in a field shifts them).
            return [(f"{path}:{i}", r.get(column)) for i, r in enumerate(csv.DictReader(f), 2)]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8") or "[]")
        if isinstance(data, dict) and len(data) == 1:
            data = next(iter(data.values()))
        return [
            (f"{path} [record {i}]", r.get(column) if isinstance(r, dict) else None)
            for i, r in enumerate(data)
        ]
    import pyarrow.parquet as pq

    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return [(f"{path} [row {i}]", v) for i, v in enumerate(values)]


def check_labels(labels: dict[str, list[tuple[str, object]]], key: str = "data.columns.label") -> list[str]:
    """Split -> (where, label) of every row: every row has a label; labels are all integers >= 0 or all
    strings; the labels of validation and test occur in train. Returns the label names (as training will)."""
    kinds: dict[type, str] = {}
    for rows in labels.values():
        for where, value in rows:
            if value is None:
                raise ConfigError(f"{key}: {where}: the row has no label")
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, (int, bool)):
                if value < 0:
                    raise ConfigError(
                        f"{key}: {where}: negative label {value}; labels are 0, 1, ... or names"
                    )
                kinds.setdefault(int, where)
            elif isinstance(value, str):
                kinds.setdefault(str, where)
            else:
                raise ConfigError(f"{key}: {where}: label {value!r} is neither an integer nor a name")
    if len(kinds) > 1:
        raise ConfigError(
            f"{key}: labels mix integers ({kinds[int]}) and names ({kinds[str]}); use one kind throughout"
        )
    train = {str(v) for _, v in labels.get("train", [])}
    for split, rows in labels.items():
        for where, value in rows if split != "train" else ():
            if str(value) not in train:
                raise ConfigError(
                    f"{key}: {where}: label {value!r} of the {split} split does not occur in train "
                    f"(train labels: {', '.join(sorted(train))})"
                )
    return _label_names([{"label": v} for _, v in labels.get("train", [])])


def _load_local(path: Path) -> list[dict]:
    from datasets import load_dataset

    kind = FILE_TYPES[path.suffix]
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # the datasets library raises many types; the file is what the user needs
        raise ConfigError(f"data.source: {path}: cannot be read ({str(err).splitlines()[0]})") from None
    return ds.to_list()


def _load_hub(cfg: Data) -> dict[str, list[dict]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(cfg.source, cfg.subset or None)
    except Exception as err:  # the datasets library raises many types; one line is what the user needs
        raise ConfigError(f"data.source: could not load {cfg.source!r}: {str(err).splitlines()[0]}") from None
    return {name: split.to_list() for name, split in ds.items()}


def load_raw_splits(cfg: Data) -> dict[str, list[dict]]:
    """Split name -> raw rows, before the column map."""
    if _is_demo(cfg.source):
        return {split: demo.make_split(split, cfg.task) for split in demo.SIZES}
    from flexkd.config import is_local_path

    if is_local_path(cfg.source):
        return {split: _load_local(path) for split, path in local_files(cfg.source).items()}
    return _load_hub(cfg)


def column_map(cfg: Data) -> dict[str, str]:
    """Task field -> dataset column (identity where the config maps nothing)."""
    return {name: cfg.columns.get(name, name) for name in TASK_COLUMNS[cfg.task]}


def check_columns(names: list[str], cfg: Data, where: str) -> None:
    """Fail naming the missing column and the ones that exist."""
    for task_field, column in column_map(cfg).items():
        if column not in names and task_field not in OPTIONAL_COLUMNS:
            key = f"data.columns.{task_field}"
            raise ConfigError(
                f"{key}: column {column!r} is not in {where}; its columns are {', '.join(map(str, names)) or '(none)'}"
            )


def _rename(rows: list[dict], cfg: Data, where: str) -> list[dict]:
    if not rows:
        return rows
    check_columns(list(rows[0]), cfg, where)
    cols = column_map(cfg)
    return [{f: row.get(c) for f, c in cols.items()} for row in rows]


# ---------------------------------------------------------------------------------------------------------
# Splits


@dataclass
class TaskData:
    """The rows of one run, in task field names, cut deterministically (``data.split_seed``)."""

    train: list[dict]
    val: list[dict]
    test: list[dict]
    label_names: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)
    """train / validation / test -> where its rows came from (``split_origins``), e.g. 'validation.jsonl (120 rows)'."""

    def scoring_set(self, num_examples: int, seed: int) -> list[dict]:
        """The first ``num_examples`` of a seeded permutation of the train split (the spec's scoring set)."""
        order = list(range(len(self.train)))
        random.Random(seed + 1).shuffle(order)
        return [self.train[i] for i in order[:num_examples]]


def _find_key(keys, name: str) -> str | None:
    """The split of ``keys`` that ``name`` means: itself, or its canonical name or an alias of it."""
    if not name:
        return None
    if name in keys:
        return name
    for canonical, aliases in SPLIT_ALIASES.items():
        if name in aliases:
            for alias in (canonical, *aliases):
                if alias in keys:
                    return alias
    return None


def _find_split(raw: dict[str, list[dict]], name: str) -> list[dict] | None:
    key = _find_key(raw, name)
    return raw[key] if key is not None else None


def is_local_folder(source: str) -> bool:
    from flexkd.config import is_local_path

    return not _is_demo(source) and is_local_path(source) and Path(source).expanduser().is_dir()


def held_out_sources(cfg: Data, splits) -> dict[str, str]:
    """Where validation and test come from: ``{"validation": name, "test": name}``, the split of ``splits``
    (the source's split names) each is read from, or '' when it is carved out of the train split.

    An explicit data.val_split / data.test_split wins; else a local folder's own validation / test file
    (``SPLIT_ALIASES``: validation.jsonl, valid.csv, dev.parquet ...); else data.val_size / data.test_size
    rows are carved out of train. Hub datasets and the demo split only as their keys say.
    """
    folder = is_local_folder(cfg.source)
    out = {}
    for split, explicit in (("validation", cfg.val_split), ("test", cfg.test_split)):
        if explicit:
            out[split] = explicit
        elif folder and split in splits:
            out[split] = split
        else:
            out[split] = ""
    return out


def split_names(cfg: Data, splits) -> dict[str, str]:
    """Source split -> how the run's records and its ``data:`` line name it: the file name of a local source,
    ``demo [train]`` for the demo, ``name [train]`` for a Hub dataset."""
    if _is_demo(cfg.source):
        return {s: f"{cfg.source} [{s}]" for s in splits}
    if is_local_folder(cfg.source) or Path(cfg.source).expanduser().is_file():
        return {s: path.name for s, path in local_files(cfg.source).items()}
    return {s: f"{cfg.source} [{s}]" for s in splits}


def split_origins(
    cfg: Data, names: dict[str, str], rows: dict[str, int | None], train_rows: int | None
) -> dict[str, str]:
    """train / validation / test -> where its rows come from, with the number of rows (when known).

    names: source split -> display name (``split_names``); rows: the run's rows per split (None: unknown
    before loading); train_rows: rows of the source's train split before anything is carved out of it.
    """
    train_key = _find_key(names, cfg.train_split) or cfg.train_split
    train_name = names.get(train_key, train_key)

    def count(n: int | None, of: int | None = None) -> str:
        if n is None:
            return ""
        return f" ({n} of {of} rows)" if of is not None and of != n else f" ({n} rows)"

    out = {"train": f"{train_name}{count(rows.get('train'), train_rows)}"}
    sources = held_out_sources(cfg, names)
    for split, size_key in (("validation", "val_size"), ("test", "test_size")):
        source = sources[split]
        if source:
            key = _find_key(names, source) or source
            out[split] = f"{names.get(key, key)}{count(rows.get(split))}"
        elif getattr(cfg, size_key):
            n = rows.get(split)
            out[split] = (
                f"carved from {train_name} ({n if n is not None else getattr(cfg, size_key)} rows, data.{size_key})"
            )
        else:
            out[split] = f"none (data.{size_key}=0)"
    return out


def planned_origins(cfg: Data, file_rows: dict[str, int]) -> dict[str, str]:
    """``split_origins`` before anything loads, for the run's ``data:`` line. file_rows: source split -> rows
    (a local source's files, the demo's splits); {} when unknown (a Hub dataset)."""
    keys = file_rows or [k for k in (cfg.train_split, cfg.val_split, cfg.test_split) if k]
    sources = held_out_sources(cfg, keys)
    total = file_rows.get(_find_key(file_rows, cfg.train_split) or "") if file_rows else None
    rows: dict[str, int | None] = {}
    carved = 0
    for split, size in (("validation", cfg.val_size), ("test", cfg.test_size)):
        if sources[split]:
            rows[split] = file_rows.get(_find_key(file_rows, sources[split]) or "") if file_rows else None
        else:
            rows[split] = size if total is None else min(size, max(total - carved, 0))
            carved += rows[split]
    rest = None if total is None else max(total - carved, 0)
    if rest is not None and cfg.max_train_examples:
        rest = min(rest, cfg.max_train_examples)
    rows = {"train": rest, **rows}
    return split_origins(cfg, split_names(cfg, keys), rows, total)


def origin_line(origins: dict[str, str]) -> str:
    """``data: train <- train.jsonl (3800 rows), validation <- validation.jsonl (120 rows), test <- ...``"""
    return "data: " + ", ".join(f"{split} <- {text}" for split, text in origins.items())


def split_task_data(raw: dict[str, list[dict]], cfg: Data) -> TaskData:
    source = cfg.source
    train = _find_split(raw, cfg.train_split)
    if train is None:
        raise ConfigError(
            f"data.train_split: {source} has no split {cfg.train_split!r}; it has {', '.join(raw)}"
        )
    if not train:
        raise ConfigError(f"data.source: {source}: the {cfg.train_split!r} split is empty")
    train_total = len(train)
    train = _rename(train, cfg, f"{source} [{cfg.train_split}]")
    order = list(range(len(train)))
    random.Random(cfg.split_seed).shuffle(order)
    # The units a held-out split is carved in: single rows, or with data.split_by_input every row that asks
    # one question (its model input), so that no carved-out row repeats a training row's input.
    units: list[list[int]] = [[i] for i in order]
    if cfg.split_by_input:
        groups: dict[tuple, list[int]] = {}
        for i in order:
            groups.setdefault(model_input_key(train[i], cfg.task), []).append(i)
        units = list(groups.values())
    taken = 0  # units
    held: set[int] = set()
    sources = held_out_sources(cfg, raw)

    def carve(split: str, size: int, key: str) -> list[dict]:
        nonlocal taken
        split_name = sources[split]
        if split_name:
            rows = _find_split(raw, split_name)
            if rows is None:
                raise ConfigError(f"{key}: {source} has no split {split_name!r}; it has {', '.join(raw)}")
            return _rename(rows, cfg, f"{source} [{split_name}]")
        picked: list[int] = []
        while len(picked) < size and taken < len(units):
            picked += units[taken]  # whole groups: the split may end a few rows over its size
            taken += 1
        held.update(picked)
        return [train[i] for i in picked]

    val = carve("validation", cfg.val_size, "data.val_split")
    test = carve("test", cfg.test_size, "data.test_split")
    rest = [train[i] for i in range(len(train)) if i not in held]
    if cfg.max_train_examples:
        rest = rest[: cfg.max_train_examples]
    if not rest:
        raise ConfigError(
            f"data.val_size: holding out {len(held)} examples leaves no training data in {source} ({len(train)} rows)"
        )
    label_names: list[str] = []
    if cfg.task == "classification":
        label_names = _label_names(rest + val + test)
    rows = {"train": len(rest), "validation": len(val), "test": len(test)}
    origins = split_origins(cfg, split_names(cfg, raw), rows, train_total)
    return TaskData(train=rest, val=val, test=test, label_names=label_names, origins=origins)


def _label_names(rows: list[dict]) -> list[str]:
    labels = {r["label"] for r in rows}
    if None in labels:
        raise ConfigError("data.columns.label: some rows have no label")
    if all(isinstance(v, (int, bool)) for v in labels):
        return [str(i) for i in range(max(int(v) for v in labels) + 1)]
    return sorted(str(v) for v in labels)


def load_task_data(cfg: Data) -> TaskData:
    return split_task_data(load_raw_splits(cfg), cfg)


def describe_splits(cfg: Data, splits: dict[str, list[dict]]) -> list[dict]:
    """What a run trained and evaluated on, for the records: per split its name, kind (demo, local or hub),
    source (the file it was read from, for a local source; the Hub name, with ``subset``, for a Hub one),
    origin (``split_origins``: its own file, or carved out of train), rows and a digest of its content (two
    runs with the same digest saw the same rows). ``splits``: context -> rows."""
    base = Path(cfg.source).name if not _is_demo(cfg.source) else cfg.source
    files = local_files(cfg.source) if not _is_demo(cfg.source) and Path(cfg.source).exists() else {}
    keys = files or [k for k in (cfg.train_split, cfg.val_split, cfg.test_split) if k]
    sources = held_out_sources(cfg, keys)
    counts = {context: len(rows) for context, rows in splits.items()}
    origins = split_origins(cfg, split_names(cfg, keys), counts, None)
    out = []
    for context, rows in splits.items():
        if not rows:
            continue
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
        split = _find_key(files, sources.get(context) or cfg.train_split) if files else None
        out.append(
            {
                "context": context,
                "name": f"{base}:{context}",
                "kind": "demo" if _is_demo(cfg.source) else "local" if files else "hub",
                "subset": cfg.subset or None,
                "source": str(files[split]) if split else cfg.source,
                "origin": origins.get(context, ""),
                "rows": len(rows),
                "digest": digest,
            }
        )
    return out


def model_inputs(cfg: Data, rows: list[dict], tokenizer, n: int = 2) -> list[str]:
    """The text a served student takes for ``rows``: the input text (classification) or the rendered prompt."""
    if cfg.task == "classification":
        return [str(r["text"]) for r in rows[:n]]
    return [render_prompt(cfg, r, tokenizer) for r in rows[:n]]


# ---------------------------------------------------------------------------------------------------------
# Encoding


def prompt_template(cfg: Data, row: dict) -> str:
    if cfg.template and cfg.template != "chat":
        return cfg.template
    if cfg.task == "instruction" and not row.get("input"):
        return TEMPLATES["instruction_no_input"]
    return TEMPLATES[cfg.task]


def render_prompt(cfg: Data, row: dict, tokenizer) -> str:
    """The prompt text of a generation example (everything before the response)."""
    if cfg.template == "chat":
        user = row["instruction"] if cfg.task == "instruction" else f"Summarize:\n{row['document']}"
        if cfg.task == "instruction" and row.get("input"):
            user = f"{user}\n\n{row['input']}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    fields = {k: ("" if v is None else str(v)) for k, v in row.items()}
    try:
        return prompt_template(cfg, row).format(**fields)
    except KeyError as err:
        raise ConfigError(f"data.template: slot {err} is not a field of the {cfg.task} task") from None


def _prompt_ids(cfg: Data, row: dict, tokenizer, budget: int) -> list[int]:
    """Token ids of the prompt, at most ``budget``; a long prompt loses its middle, keeping the template's tail."""
    text = render_prompt(cfg, row, tokenizer)
    add_special = cfg.template != "chat"  # a chat template already wrote its special tokens
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if len(ids) <= budget:
        return ids
    # The part after the last slot ("\n\n### Response:\n") tells the model where to answer: keep it.
    template = prompt_template(cfg, row)
    tail_text = template[template.rfind("}") + 1 :] if cfg.template != "chat" else ""
    tail = tokenizer(tail_text, add_special_tokens=False)["input_ids"] if tail_text else []
    tail = tail[: budget // 2]
    return ids[: budget - len(tail)] + tail


def encode(row: dict, tokenizer, cfg: Data, label_names: list[str]) -> dict:
    """One example -> ``{"input_ids": [..], "labels": int | [..]}``.

    Causal LM: ``labels[t]`` is the token at ``t + 1`` when that token belongs to the response (or the EOS
    after it), else IGNORE; so logits at position t pair with labels[t] and the loss mask is ``labels != IGNORE``.
    """
    if cfg.task == "classification":
        ids = tokenizer(str(row["text"]), truncation=True, max_length=cfg.max_length)["input_ids"]
        label = row["label"]
        index = int(label) if isinstance(label, (int, bool)) else label_names.index(str(label))
        return {"input_ids": ids, "labels": index}
    target = TARGET_FIELD[cfg.task]
    response = tokenizer(str(row[target]), add_special_tokens=False)["input_ids"][: cfg.max_response_length]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    prompt = _prompt_ids(cfg, row, tokenizer, cfg.max_length - len(response))
    ids = prompt + response
    labels = [IGNORE] * (len(prompt) - 1) + response + [IGNORE]
    return {"input_ids": ids, "labels": labels}


def encode_prompt(row: dict, tokenizer, cfg: Data) -> list[int]:
    """Prompt ids for generation (same cut as in training)."""
    target = TARGET_FIELD[cfg.task]
    response_len = min(
        len(tokenizer(str(row[target]), add_special_tokens=False)["input_ids"]), cfg.max_response_length
    )
    return _prompt_ids(cfg, row, tokenizer, cfg.max_length - response_len - 1)


def reference_text(row: dict, cfg: Data) -> str:
    return str(row[TARGET_FIELD[cfg.task]])


def model_input_key(row: dict, task: str) -> tuple:
    """What the model is shown of a row (every task field but the target): two rows with the same key ask
    the same question, whatever their answers."""
    target = "label" if task == "classification" else TARGET_FIELD[task]
    return tuple(str(row.get(name)) for name in TASK_COLUMNS[task] if name != target)


def unseen_rows(rows: list[dict], train: list[dict], task: str) -> list[dict]:
    """The rows whose model input never occurs in ``train``: held out in fact, not only by index. A corpus
    with repeated questions (ChatterBot has many) puts copies of training rows in a carved-out test split,
    and a metric over those measures memorisation."""
    seen = {model_input_key(r, task) for r in train}
    return [r for r in rows if model_input_key(r, task) not in seen]


def collate(examples: list[dict], pad_id: int, teacher_pad_id: int | None = None):
    """Right-pad a micro-batch into tensors.

    Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``labels`` (B,) or (B, T) long, and
    ``teacher_input_ids`` / ``teacher_attention_mask`` when examples carry teacher ids of their own and a
    teacher pad id is given (evaluation reads the student's ids only).
    """
    import torch

    width = max(len(e["input_ids"]) for e in examples)

    def pad(seqs, value):
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    batch = {
        "input_ids": pad([e["input_ids"] for e in examples], pad_id),
        "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0),
    }
    if isinstance(examples[0]["labels"], list):
        batch["labels"] = pad([e["labels"] for e in examples], IGNORE)
    else:
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    if teacher_pad_id is not None and "teacher_input_ids" in examples[0]:
        batch["teacher_input_ids"] = pad([e["teacher_input_ids"] for e in examples], teacher_pad_id)
        batch["teacher_attention_mask"] = batch["attention_mask"]
    return batch


# ---------------------------------------------------------------------------------------------------------
# Batches: a pure function of the step, so that a resumed run and any number of workers see the same data


def step_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: consecutive slices of seeded per-epoch permutations."""
    out = []
    start = step * batch_size
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, num_examples)
        out.append(_permutation(num_examples, seed, epoch)[offset])
    return out


_PERMS: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMS:
        if len(_PERMS) > 4:
            _PERMS.clear()
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        _PERMS[key] = order
    return _PERMS[key]


def micro_batches(indices: list[int], rank: int, world: int, accum: int) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of a global batch (equal sizes; the config checks divisibility)."""
    size = len(indices) // (world * accum)
    return [indices[(a * world + rank) * size : (a * world + rank + 1) * size] for a in range(accum)]


def shard_batches(num_examples: int, batch_size: int, rank: int, world: int) -> list[range]:
    """Consecutive batches of ``batch_size`` (the last may be smaller), dealt round-robin to ranks.

    Used for scoring: cutting on scoring-batch boundaries keeps the batch-level absolute value of the
    ``grad`` score identical to a single-worker run.
    """
    starts = range(0, num_examples, batch_size)
    return [range(s, min(s + batch_size, num_examples)) for i, s in enumerate(starts) if i % world == rank]
