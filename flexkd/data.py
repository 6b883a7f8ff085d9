"""Task data: loading (demo, local files, Hub), column maps, prompt templates, loss masks, splits, batches.

Rows are in the task's own field names (``text``/``label``, ``instruction``/``input``/``response``,
``document``/``summary``); the column map of the config renames dataset columns into them. The training split
is a Hugging Face ``datasets.Dataset``: an Arrow table memory-mapped from the cache ``load_dataset`` writes, so
a process holds the rows it reads, not the corpus (``flexkd.encoded`` tokenises it once, the same way). The
held-out splits, which evaluation reads whole, are lists of dicts. Encoded examples
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


def column_values(path: Path, column: str):
    """(where, value) of one column in every row of a local file, one row at a time; ``where`` is
    ``file:line`` for JSON lines and CSV, ``file [record i]`` for JSON and parquet. A row without the column
    has the value None."""
    if path.suffix == ".jsonl":
        for n, r in jsonl_records(path):
            yield f"{path}:{n}", r.get(column)
        return
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            # Line numbers assume one line per row (a quoted newline in a field shifts them).
            for i, r in enumerate(csv.DictReader(f), 2):
                yield f"{path}:{i}", r.get(column)
        return
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8") or "[]")
        if isinstance(data, dict) and len(data) == 1:
            data = next(iter(data.values()))
        for i, r in enumerate(data):
            yield f"{path} [record {i}]", r.get(column) if isinstance(r, dict) else None
        return
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=65_536):
        for v in batch.column(0).to_pylist():
            yield f"{path} [row {row}]", v
            row += 1


def check_labels(labels: dict, key: str = "data.columns.label") -> list[str]:
    """Split -> (where, label) of every row (any iterable: the rows are read once, one at a time, keeping
    only the distinct labels): every row has a label; labels are all integers >= 0 or all strings; the
    labels of validation and test occur in train. Returns the label names (as training will)."""
    kinds: dict[type, str] = {}
    train: set = set()
    train_names: set[str] = set()
    for split in sorted(labels, key=lambda s: s != "train"):  # train first: the others are checked against it
        for where, value in labels[split]:
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
            if split == "train":
                train.add(value)
                train_names.add(str(value))
            elif str(value) not in train_names:
                raise ConfigError(
                    f"{key}: {where}: label {value!r} of the {split} split does not occur in train "
                    f"(train labels: {', '.join(sorted(train_names))})"
                )
    return _label_names([{"label": v} for v in train])


def _hf_cache(cfg: Data) -> str | None:
    """Where ``load_dataset`` keeps its Arrow files: beside the run's storage (data.cache_dir), else its default."""
    return str(Path(cfg.cache_dir) / "hf") if cfg.cache_dir else None


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()  # the run logs its own line for the one long step (tokenising)
    datasets.logging.set_verbosity_error()


def _load_local(path: Path, cfg: Data):
    from datasets import load_dataset

    _quiet_datasets()
    kind = FILE_TYPES[path.suffix]
    try:
        return load_dataset(kind, data_files=str(path), split="train", cache_dir=_hf_cache(cfg))
    except Exception as err:  # the datasets library raises many types; the file is what the user needs
        raise ConfigError(f"data.source: {path}: cannot be read ({str(err).splitlines()[0]})") from None


def _load_hub(cfg: Data) -> dict:
    from datasets import load_dataset

    _quiet_datasets()
    try:
        ds = load_dataset(cfg.source, cfg.subset or None, cache_dir=_hf_cache(cfg))
    except Exception as err:  # the datasets library raises many types; one line is what the user needs
        raise ConfigError(f"data.source: could not load {cfg.source!r}: {str(err).splitlines()[0]}") from None
    return dict(ds.items())


def load_raw_splits(cfg: Data) -> dict:
    """Split name -> raw rows (a ``datasets.Dataset``, memory-mapped for files and the Hub), before the column map."""
    if _is_demo(cfg.source):
        from datasets import Dataset

        return {split: Dataset.from_list(demo.make_split(split, cfg.task)) for split in demo.SIZES}
    from flexkd.config import is_local_path

    if is_local_path(cfg.source):
        return {split: _load_local(path, cfg) for split, path in local_files(cfg.source).items()}
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


def _rename(rows, cfg: Data, where: str):
    """A split (``datasets.Dataset``) in the task's field names: the mapped columns only, renamed; an optional
    field the dataset lacks (``input``) is a column of None."""
    if len(rows) == 0:
        return rows
    check_columns(rows.column_names, cfg, where)
    cols = column_map(cfg)
    present = {f: c for f, c in cols.items() if c in rows.column_names}
    if len(set(present.values())) < len(present):  # two fields read one column: copy it, row by row
        return rows.map(lambda r: {f: r[c] for f, c in present.items()}, remove_columns=rows.column_names)
    out = rows.select_columns(list(present.values()))
    renames = {c: f for f, c in present.items() if c != f}
    if renames:
        out = out.rename_columns(renames)
    for f in cols:
        if f not in present:
            out = out.add_column(f, [None] * len(out))
    return out


def rows_of(rows, n: int | None = None) -> list[dict]:
    """The first ``n`` rows (all: None) of a split, as dicts; a ``datasets.Dataset`` is read for those rows only."""
    if isinstance(rows, list):
        return rows[:n]
    n = len(rows) if n is None else min(n, len(rows))
    return rows.select(range(n)).to_list()


def rows_digest(rows) -> str:
    """sha256 of the rows as one JSON list (keys sorted): a list is dumped whole, a ``datasets.Dataset`` a batch
    at a time to the same bytes, so a table and the list of its rows have one digest."""
    if isinstance(rows, list):
        return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    key = getattr(rows, "_fingerprint", None)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256(b"[")
    first = True
    for batch in rows.iter(batch_size=4096):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            text = json.dumps(dict(zip(names, values)), sort_keys=True, default=str)
            h.update((text if first else ", " + text).encode())
            first = False
    h.update(b"]")
    _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


_DIGESTS: dict[str, str] = {}  # Dataset fingerprint -> rows_digest: a run digests its train split once


# ---------------------------------------------------------------------------------------------------------
# Splits


@dataclass
class TaskData:
    """The rows of one run, in task field names, cut deterministically (``data.split_seed``).

    train: a ``datasets.Dataset`` (memory-mapped; ``len``, ``[i]`` and ``select`` read it by index; tests may
    pass a list of dicts); val, test: lists of dicts (evaluation reads them whole)."""

    train: object
    val: list[dict]
    test: list[dict]
    label_names: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)
    """train / validation / test -> where its rows came from (``split_origins``), e.g. 'validation.jsonl (120 rows)'."""

    def scoring_set(self, num_examples: int, seed: int) -> list[dict]:
        """The first ``num_examples`` of a seeded permutation of the train split (the spec's scoring set)."""
        order = list(range(len(self.train)))
        random.Random(seed + 1).shuffle(order)
        if isinstance(self.train, list):
            return [self.train[i] for i in order[:num_examples]]
        return self.train.select(order[:num_examples]).to_list()


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


def _find_split(raw: dict, name: str):
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


def split_task_data(raw: dict, cfg: Data) -> TaskData:
    """Cut the run's splits out of ``raw`` (split name -> ``datasets.Dataset``). The train split stays a table
    (a selection of the source's rows, by index); validation and test become lists of dicts."""
    source = cfg.source
    train = _find_split(raw, cfg.train_split)
    if train is None:
        raise ConfigError(
            f"data.train_split: {source} has no split {cfg.train_split!r}; it has {', '.join(raw)}"
        )
    if len(train) == 0:
        raise ConfigError(f"data.source: {source}: the {cfg.train_split!r} split is empty")
    train_total = len(train)
    train = _rename(train, cfg, f"{source} [{cfg.train_split}]")
    n = len(train)
    order = list(range(n))
    random.Random(cfg.split_seed).shuffle(order)
    # The units a held-out split is carved in: single rows, or with data.split_by_input every row that asks
    # one question (its model input), so that no carved-out row repeats a training row's input.
    units: list[list[int]] | None = None
    if cfg.split_by_input:
        keys = input_keys(train, cfg.task)
        groups: dict[tuple, list[int]] = {}
        for i in order:
            groups.setdefault(keys[i], []).append(i)
        units = list(groups.values())
    taken = 0  # units (rows when there are no groups)
    held: set[int] = set()
    sources = held_out_sources(cfg, raw)

    def carve(split: str, size: int, key: str) -> list[dict]:
        nonlocal taken
        split_name = sources[split]
        if split_name:
            rows = _find_split(raw, split_name)
            if rows is None:
                raise ConfigError(f"{key}: {source} has no split {split_name!r}; it has {', '.join(raw)}")
            return rows_of(_rename(rows, cfg, f"{source} [{split_name}]"))
        if units is None:
            picked = order[taken : taken + size]
            taken += len(picked)
        else:
            picked = []
            while len(picked) < size and taken < len(units):
                picked += units[taken]  # whole groups: the split may end a few rows over its size
                taken += 1
        held.update(picked)
        return train.select(picked).to_list() if picked else []

    val = carve("validation", cfg.val_size, "data.val_split")
    test = carve("test", cfg.test_size, "data.test_split")
    keep = cfg.max_train_examples or n
    if held:  # an index array (8 bytes a row), not a list of Python ints
        import numpy as np

        rest = np.setdiff1d(np.arange(n), np.fromiter(held, dtype=np.int64, count=len(held)))[:keep]
    else:
        rest = range(min(n, keep))
    if not len(rest):
        raise ConfigError(
            f"data.val_size: holding out {len(held)} examples leaves no training data in {source} ({n} rows)"
        )
    # A range stays a slice of the mapped table; a list becomes an index column. The fingerprint (the tokenised
    # table's key) names the cut by what decides it, rather than datasets hashing every index.
    cut = [train._fingerprint, cfg.split_seed, cfg.split_by_input, sources, cfg.val_size, cfg.test_size, keep]
    rest_rows = train.select(rest, new_fingerprint=hashlib.sha256(json.dumps(cut).encode()).hexdigest()[:16])
    label_names: list[str] = []
    if cfg.task == "classification":
        # Without a cap the training rows and the carved ones are the whole split: read its column in Arrow.
        labels = train.unique("label") if len(rest) + len(held) == n else rest_rows["label"]
        label_names = _label_names([{"label": v} for v in {*labels, *(r["label"] for r in val + test)}])
    rows = {"train": len(rest), "validation": len(val), "test": len(test)}
    origins = split_origins(cfg, split_names(cfg, raw), rows, train_total)
    return TaskData(train=rest_rows, val=val, test=test, label_names=label_names, origins=origins)


def input_keys(rows, task: str) -> list[tuple]:
    """``model_input_key`` of every row of a table, read column by column (Arrow to Python in bulk)."""
    target = "label" if task == "classification" else TARGET_FIELD[task]
    names = [name for name in TASK_COLUMNS[task] if name != target]
    if isinstance(rows, list):
        return [model_input_key(r, task) for r in rows]
    out = []
    for start in range(0, len(rows), 50_000):
        part = rows.with_format("arrow")[start : start + 50_000]
        columns = [part.column(name).to_pylist() for name in names]
        out += [tuple(str(v) for v in values) for values in zip(*columns)]
    return out


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
        if not len(rows):
            continue
        digest = rows_digest(rows)
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
    rows = rows_of(rows, n)
    if cfg.task == "classification":
        return [str(r["text"]) for r in rows]
    return [render_prompt(cfg, r, tokenizer) for r in rows]


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
    if not rows:
        return []
    asked = {model_input_key(r, task) for r in rows}
    if isinstance(train, list):
        seen = {model_input_key(r, task) for r in train} & asked
    else:
        seen = _seen_in_table(train, asked, task)
        if seen is None:  # not all string columns: a batch of keys at a time, in Python
            seen, step = set(), 50_000
            for start in range(0, len(train), step):
                part = train.select(range(start, min(start + step, len(train))))
                seen.update(k for k in input_keys(part, task) if k in asked)
    return [r for r in rows if model_input_key(r, task) not in seen]


def _seen_in_table(train, asked: set[tuple], task: str) -> set[tuple] | None:
    """The keys of ``asked`` that rows of the table ``train`` have, found by Arrow compute over its columns
    (``is_in`` on the whole column, then the rows of the selection): no Python object per training row.
    None when an input column is not text (the caller compares ``str`` of its values in Python)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    target = "label" if task == "classification" else TARGET_FIELD[task]
    names = [name for name in TASK_COLUMNS[task] if name != target]
    table = train.data
    sep = "\x1f"
    wanted = None
    mask_parts = []
    for start in range(0, table.num_rows, 50_000):  # a slice at a time: Arrow's buffers stay small
        columns = []
        for name in names:
            column = table.column(name).slice(start, 50_000)
            if pa.types.is_null(column.type):
                column = column.cast(pa.string())
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                return None
            columns.append(pc.fill_null(column, "None"))  # str(None), as model_input_key writes it
        key = columns[0] if len(columns) == 1 else pc.binary_join_element_wise(*columns, sep)
        if wanted is None:
            wanted = pa.array([sep.join(k) for k in asked], type=key.type)
        mask_parts.append(pc.is_in(key, value_set=wanted))
    mask = pa.chunked_array(mask_parts, type=pa.bool_())  # one bit a row of the whole table
    if train._indices is not None:  # a selection of the table's rows: only those count
        mask = pc.take(mask, train._indices.column(0))
        found = pc.take(train._indices.column(0), pc.indices_nonzero(mask))
    else:
        found = pc.indices_nonzero(mask)
    hits = train.data.table.select(names).take(found).to_pylist()
    pa.default_memory_pool().release_unused()
    return {tuple(str(h[n]) for n in names) for h in hits}


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


def rank_batches(
    step: int, batch_size: int, num_examples: int, seed: int, rank: int, world: int, accum: int, block: int
) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of global batch ``step`` (each ``batch_size / (world * accum)``).

    One worker: consecutive slices of seeded per-epoch permutations of every example (``step_indices``).
    Several: rank r owns the blocks of ``block`` consecutive examples whose number b has b % world == r (the
    blocks are the teacher-signal shards, ``signals.shard_examples``, smaller when the data is too short to give
    every rank one) and draws its share of every global batch from seeded per-epoch permutations of its own
    examples, so a worker training from cached signals opens its own shards only. Both are pure functions
    of the step: a resumed run sees the same batches.
    """
    if world == 1:
        indices = step_indices(step, batch_size, num_examples, seed)
        return micro_batches(indices, 0, 1, accum)
    owned = owned_examples(num_examples, rank, world, block)
    share = batch_size // world
    size = share // accum
    mine = []
    for pos in range(step * share, (step + 1) * share):
        epoch, offset = divmod(pos, len(owned))
        mine.append(owned[_permutation(len(owned), seed * 7919 + rank + 1, epoch)[offset]])
    return [mine[a * size : (a + 1) * size] for a in range(accum)]


_OWNED: dict[tuple[int, int, int, int], list[int]] = {}


def owned_examples(num_examples: int, rank: int, world: int, block: int) -> list[int]:
    """The example indices rank ``rank`` of ``world`` trains on (``rank_batches``), ascending."""
    block = max(1, min(block, -(-num_examples // world)))
    key = (num_examples, rank, world, block)
    if key not in _OWNED:
        starts = range(rank * block, num_examples, world * block)
        _OWNED.clear()
        _OWNED[key] = [i for s in starts for i in range(s, min(s + block, num_examples))]
    return _OWNED[key]


def shard_batches(num_examples: int, batch_size: int, rank: int, world: int) -> list[range]:
    """Consecutive batches of ``batch_size`` (the last may be smaller), dealt round-robin to ranks.

    Used for scoring: cutting on scoring-batch boundaries keeps the batch-level absolute value of the
    ``grad`` score identical to a single-worker run.
    """
    starts = range(0, num_examples, batch_size)
    return [range(s, min(s + batch_size, num_examples)) for i, s in enumerate(starts) if i % world == rank]
