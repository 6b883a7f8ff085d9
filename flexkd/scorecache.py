"""A score cache: teachers are scored once per scoring setting, not once per run or trial.

The key is a content hash: a fingerprint of the teacher's files (names, sizes, modification times and the
first MiB of each, so that a re-fine-tuned teacher at the same path is a new key), the scoring rows
themselves, the tokenisation settings, the scoring batch size and the teacher layers. Every scoring method
comes out of one pass, so all methods share one entry.

Entries are kept through ``flexkd.storage.Store``: written whole or not at all, and on a local or shared
POSIX filesystem locked per key, so a second trial that asks while the first is scoring waits for the result
instead of scoring too. Cloud URIs (``s3://``, ``gs://``) have no lock: two trials may then both score, and the
second write replaces an identical file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import torch

from flexkd.config import is_local_path
from flexkd.scoring import ScoreSet, UnitScores
from flexkd.storage import Store

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
        self.store = Store(root)
        self.root = self.store.root
        self.hits = 0
        self.misses = 0

    def key(self, material: dict) -> str:
        material = dict(material)
        material["teacher"] = fingerprint_model(material["teacher"])
        return cache_key(material)

    def load(self, key: str) -> ScoreSet | None:
        if not self.store.exists(f"{key}.pt"):
            return None
        found = _decode(self.store.read(f"{key}.pt"))
        self.hits += 1
        log.info("scores loaded from the cache (%s)", key)
        return found

    def save(self, key: str, scores: ScoreSet) -> None:
        self.store.write(_encode(scores), f"{key}.pt")
        self.misses += 1

    def lock(self, key: str):
        """Exclusive per key across processes on one (shared POSIX) filesystem; a no-op for cloud URIs."""
        return self.store.lock(key)


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
