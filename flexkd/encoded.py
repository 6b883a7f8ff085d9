"""The tokenised training table: every training row encoded once, kept as Arrow files, memory-mapped by every
process that trains on it.

``encode_table`` runs ``flexkd.data.encode`` over the train split with ``datasets.map`` (batched, in
``data.num_proc`` processes), writing ``<data.cache_dir>/<key>/`` as it goes, so neither the rows nor their
token ids are ever all in memory. The key is a fingerprint of what the ids depend on: the rows (the datasets
fingerprint of the train split, which follows the source files and the split's row indices), the tokenizers,
the tokenisation keys and the label names. Every later process with the same key (a Ray Train worker, the next
trial of a sweep, the Ray Data teacher actors) maps the same files: the page cache holds one copy for all of
them, and a process's memory is the examples it reads. Examples are read by index (``EncodedRows.take``), so
the loop's order, its resume and its workers' shards are as before.

Layout: ``<key>/meta.json`` (written last: a folder without it is rebuilt) and the Arrow files it names, one per
tokenising process, concatenated in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from flexkd.config import ConfigError, Data
from flexkd.data import _DIGESTS, IGNORE, encode, rows_digest
from flexkd.storage import Store

log = logging.getLogger("flexkd")

FORMAT = 1
META = "meta.json"
AUTO_PROCS_ROWS = 50_000  # below this, starting processes costs more than tokenising in one


def tokenizer_fingerprint(tok) -> str:
    """What a tokenizer's ids depend on: its whole serialised pipeline when it has one (vocabulary,
    normaliser, pre-tokeniser, post-processor), else its vocabulary and special tokens; and its chat template."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    extra = json.dumps([tok.all_special_tokens, getattr(tok, "chat_template", None), tok.eos_token_id])
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def table_key(rows, cfg: Data, tok_s, tok_t, label_names: list[str]) -> str:
    fields = [FORMAT, rows._fingerprint, cfg.task, cfg.template, cfg.max_length, cfg.max_response_length]
    fields += [tokenizer_fingerprint(tok_s), tokenizer_fingerprint(tok_t) if tok_t is not tok_s else ""]
    fields += [label_names]
    return hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:24]


class EncodedRows:
    """Encoded training examples read by index from memory-mapped Arrow files.

    ``rows[i]`` and ``rows.take(indices)`` give ``{"input_ids": [..], "labels": int | [..]}`` dicts (with
    ``teacher_input_ids`` when the tokenizers differ), exactly what ``flexkd.data.encode`` returns for the row.
    """

    def __init__(self, table, meta: dict, folder: str):
        self.table = table
        self.meta = meta
        self.folder = folder

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        return self.take([i])[0]

    def take(self, indices) -> list[dict]:
        """The examples at ``indices``, in that order (one Arrow read for all of them)."""
        cols = self.table[list(indices)]
        names = [n for n in ("input_ids", "labels", "teacher_input_ids") if n in cols]
        return [dict(zip(names, values)) for values in zip(*(cols[n] for n in names))]

    def __iter__(self):
        step = 1024
        for start in range(0, len(self), step):
            yield from self.take(range(start, min(start + step, len(self))))

    @property
    def tokens(self) -> int:
        return self.meta["tokens"]

    @property
    def positions(self) -> int:
        """Loss positions over all examples (one per example for classification)."""
        return self.meta["positions"]


def _encode_batch(batch: dict, indices: list[int], tok_s, tok_t, cfg: Data, label_names, key: str) -> dict:
    names = list(batch)
    out: dict[str, list] = {"input_ids": [], "labels": [], "positions": []}
    if tok_t is not tok_s:
        out["teacher_input_ids"] = []
    for i, values in zip(indices, zip(*(batch[n] for n in names))):
        row = dict(zip(names, values))
        ex = encode(row, tok_s, cfg, label_names)
        out["input_ids"].append(ex["input_ids"])
        out["labels"].append(ex["labels"])
        labels = ex["labels"]
        out["positions"].append(sum(v != IGNORE for v in labels) if isinstance(labels, list) else 1)
        if tok_t is not tok_s:
            t_ids = encode(row, tok_t, cfg, label_names)["input_ids"]
            if len(t_ids) != len(ex["input_ids"]):
                raise ConfigError(
                    f"{key}: teacher and student tokenizers split example {i} differently "
                    f"({len(t_ids)} vs {len(ex['input_ids'])} tokens); positions must align one to one"
                )
            out["teacher_input_ids"].append(t_ids)
    return out


def num_proc(cfg: Data, rows: int) -> int:
    if cfg.num_proc:
        return cfg.num_proc
    return 1 if rows < AUTO_PROCS_ROWS else max(1, min(8, os.cpu_count() or 1))


def open_table(folder: Path) -> EncodedRows | None:
    """The table in ``folder`` if its build finished (its meta.json exists), else None."""
    from datasets import Dataset, concatenate_datasets

    meta_path = folder / META
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    parts = [Dataset.from_file(str(folder / name)) for name in meta["files"]]
    table = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return EncodedRows(table, meta, str(folder))


def encode_table(rows, tok_s, tok_t, cfg: Data, label_names: list[str], mismatch_key: str) -> EncodedRows:
    """The encoded train split: opened from ``data.cache_dir`` when another process wrote it, else tokenised
    now (under a lock per key: concurrent workers and trials tokenise once). ``rows``: a ``datasets.Dataset``.

    mismatch_key: the config key named when teacher and student tokenizers split an example differently."""
    key = table_key(rows, cfg, tok_s, tok_t, label_names)
    root = Path(cfg.cache_dir or "./flexkd-runs/data-cache")
    folder = root / key
    found = open_table(folder)
    if found is None:
        with Store(str(root)).lock(key):
            found = open_table(folder)  # a process that held the lock before us wrote it
            if found is None:
                found = _build(rows, tok_s, tok_t, cfg, label_names, mismatch_key, folder)
    # The rows' digest (the records' and the signal cache's identity of the data) is in the meta: no process
    # after the first reads every row again to compute it.
    _DIGESTS.setdefault(rows._fingerprint, found.meta["rows_digest"])
    return found


def _build(rows, tok_s, tok_t, cfg, label_names, mismatch_key, folder: Path) -> EncodedRows:
    import pyarrow.compute as pc

    if folder.exists():
        shutil.rmtree(folder)  # an interrupted build: its files are not named by a meta.json
    folder.mkdir(parents=True)
    procs = min(num_proc(cfg, len(rows)), max(1, len(rows)))
    started = time.perf_counter()
    log.info("data: tokenising %d training rows into %s (%d process(es))", len(rows), folder, procs)
    encoded = rows.map(
        _encode_batch,
        batched=True,
        batch_size=1000,
        with_indices=True,
        fn_kwargs={
            "tok_s": tok_s,
            "tok_t": tok_t,
            "cfg": cfg,
            "label_names": label_names,
            "key": mismatch_key,
        },
        remove_columns=rows.column_names,
        num_proc=procs if procs > 1 else None,
        cache_file_name=str(folder / "train.arrow"),
        new_fingerprint=folder.name,  # ours: datasets would otherwise hash the tokenizers for its own
        writer_batch_size=1000,
        desc="tokenising",
    )
    files = [Path(f["filename"]).name for f in encoded.cache_files]
    table = encoded.data  # Arrow: the totals are computed column-wise, without Python lists of ids
    tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
    positions = int(pc.sum(table.column("positions")).as_py() or 0)
    meta = {
        "format": FORMAT,
        "rows": len(encoded),
        "tokens": tokens,
        "positions": positions,
        "rows_digest": rows_digest(rows),
        "files": files,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (folder / META).write_text(json.dumps(meta, indent=1))  # last: the table now exists
    log.info("data: tokenised %d rows (%d tokens) in %.1fs", len(encoded), tokens, meta["seconds"])
    return open_table(folder)
