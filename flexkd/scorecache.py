"""A score cache: teachers are scored once per scoring setting, not once per run or trial.

The key is a content hash: a fingerprint of the teacher's files (names, sizes, modification times and the
first MiB of each, so that a re-fine-tuned teacher at the same path is a new key), the scoring rows
themselves, the tokenisation settings, the scoring batch size and the teacher layers. Every scoring method
comes out of one pass, so all methods share one entry.

Entries are written to a temporary name and renamed, so a reader never sees half a file; on a local or
shared POSIX filesystem an ``fcntl`` lock per key makes a second trial that asks while the first is scoring
wait for the result instead of scoring too. Cloud URIs (``s3://``, ``gs://``) go through pyarrow's
filesystems without the lock: two trials may then both score, and the second write replaces an identical file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import uuid
from pathlib import Path

import torch

from flexkd.config import is_local_path
from flexkd.scoring import ScoreSet, UnitScores

log = logging.getLogger("flexkd")
FORMAT = 1


def fingerprint_model(source: str) -> dict:
    """Identity of a model folder by its files, or of a Hub model by its name."""
    if not is_local_path(source):
        return {"hub": source}
    files = {}
    for path in sorted(Path(source).rglob("*")):
        if path.is_file():
            stat = path.stat()
            with path.open("rb") as f:
                head = hashlib.sha256(f.read(1 << 20)).hexdigest()
            files[str(path.relative_to(source))] = [stat.st_size, stat.st_mtime_ns, head]
    return {"files": files}


def cache_key(material: dict) -> str:
    blob = json.dumps({"format": FORMAT, **material}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class ScoreCache:
    """Scores stored under ``root`` by content key (the loop's ``score_cache``).

    The loop uses ``key`` / ``lock`` / ``load`` / ``save`` (``flexkd.train.compute_scores``): in a
    distributed run only rank 0 takes the lock and reads, and the other ranks follow its answer (they must
    join the collective scoring pass, so they cannot wait on the lock themselves). ``hits`` and ``misses``
    count what this object did.
    """

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.local = "://" not in root or root.startswith("file://")
        self.hits = 0
        self.misses = 0

    def key(self, material: dict) -> str:
        material = dict(material)
        material["teacher"] = fingerprint_model(material["teacher"])
        return cache_key(material)

    def load(self, key: str) -> ScoreSet | None:
        found = self._read(key)
        if found is not None:
            self.hits += 1
            log.info("scores loaded from the cache (%s)", key)
        return found

    def save(self, key: str, scores: ScoreSet) -> None:
        self._write(key, scores)
        self.misses += 1

    # --- storage ---------------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}.pt"

    @contextlib.contextmanager
    def lock(self, key: str):
        """Exclusive per key across processes on one (shared POSIX) filesystem; a no-op for cloud URIs."""
        if not self.local:
            yield
            return
        import fcntl

        root = Path(self.root.removeprefix("file://"))
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # a second trial waits here while the first scores
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _fs(self):
        from pyarrow import fs

        return fs.FileSystem.from_uri(self.root)

    def _read(self, key: str) -> ScoreSet | None:
        if self.local:
            path = Path(self._path(key).removeprefix("file://"))
            if not path.exists():
                return None
            data = path.read_bytes()
        else:
            filesystem, base = self._fs()
            target = f"{base}/{key}.pt"
            from pyarrow import fs

            if filesystem.get_file_info(target).type == fs.FileType.NotFound:
                return None
            with filesystem.open_input_stream(target) as f:
                data = f.read()
        return _decode(data)

    def _write(self, key: str, scores: ScoreSet) -> None:
        data = _encode(scores)
        if self.local:
            path = Path(self._path(key).removeprefix("file://"))
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: readers see the old state or the whole file
            return
        filesystem, base = self._fs()
        filesystem.create_dir(base, recursive=True)
        with filesystem.open_output_stream(f"{base}/{key}.pt") as f:
            f.write(data)


def _encode(scores: ScoreSet) -> bytes:
    buf = io.BytesIO()
    widths = {layer: s.act_sum.numel() for layer, s in scores.layers.items()}
    torch.save({"widths": widths, "flat": scores.flatten()}, buf)
    return buf.getvalue()


def _decode(data: bytes) -> ScoreSet:
    doc = torch.load(io.BytesIO(data), weights_only=True)
    layout = ScoreSet(
        {int(layer): UnitScores.zeros(int(layer), int(w)) for layer, w in doc["widths"].items()}
    )
    return layout.unflatten(doc["flat"])
