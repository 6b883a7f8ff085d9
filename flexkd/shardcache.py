"""A bounded local copy of a cloud cache's shard files: fetched on first use, least recently used evicted first.

A run reading teacher signals from s3:// or gs:// needs each shard as a local file (it is memory-mapped, see
``flexkd.signals.SignalReader``), but a node's disk holds only so many of them. ``ShardCache`` keeps at most
``limit`` bytes of shard files in one folder that the processes of a node share:

- a shard is fetched once per node: under a per-shard ``fcntl`` lock, streamed to a temporary name while its
  sha256 is computed, checked against the manifest record and renamed into place, so no reader ever sees
  half a file or an unchecked one;
- a process reading a shard holds a shared ``flock`` on it; eviction takes an exclusive one without waiting,
  so a shard some process on the node is reading is never evicted (the others are, oldest first);
- recency is the file's mtime, set at every use, so every process evicts in the same order.

``fetch(name)`` yields the remote file's bytes in pieces (``flexkd.storage.Store.chunks`` in production); the
tests pass a copy from a local folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from flexkd.storage import Store

SUFFIX = ".safetensors"
# How long a fetch waits for room that other processes' shards in use take up before it gives up: they let go
# of a shard at their next gather, a step later.
WAIT_S = 300.0


def _error(message: str):
    from flexkd.signals import SignalError  # signals imports this module: imported here, no cycle at load

    return SignalError(message)


def _corrupt(where: str, why: str):
    from flexkd.signals import corrupt_shard

    return corrupt_shard(where, why)


def _missing(where: str):
    from flexkd.signals import missing_shard

    return missing_shard(where)


class ShardCache:
    """Fetched shard files in ``folder``, at most ``limit`` bytes of them (in-flight fetches included).

    remote: the cache folder the shards come from, named in errors. ``acquire`` returns a file descriptor
    holding the shard's shared lock: the caller opens the file by ``path(name)`` and closes the descriptor when
    it no longer reads the shard (until then the shard is not evicted).
    """

    def __init__(self, folder: str, limit: float, fetch: Callable[[str], Iterable[bytes]], remote: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limit = float(limit)
        self.fetch = fetch
        self.remote = remote.rstrip("/")
        self._locks = Store(str(self.folder))
        self.fetched = 0  # shards this process fetched (the others were already on the node)

    def path(self, name: str) -> Path:
        return self.folder / name

    def files(self) -> dict[str, int]:
        """The whole shard files present: name -> bytes."""
        return {
            p.name: p.stat().st_size
            for p in self.folder.iterdir()
            if p.name.endswith(SUFFIX) and not p.name.startswith(".")
        }

    def acquire(self, record: dict, keep: set[str]) -> int:
        """A descriptor holding shard ``record["file"]`` (fetched first if absent); ``keep``: the other shards
        of the caller's micro-batch, not evicted to make room for this one."""
        name = record["file"]
        fd = self._hold(name)
        if fd is None:
            with self._locks.lock(
                name
            ):  # one fetch per shard and node: a second process waits, then holds it
                fd = self._hold(name)
                if fd is None:
                    fd = self._fetch(record, keep)
        self.touch(name)
        return fd

    def touch(self, name: str) -> None:
        """Mark shard ``name`` (held) as just used."""
        now = time.time_ns()  # explicit: the kernel's own timestamps are a jiffy coarse, too coarse to order
        os.utime(self.path(name), ns=(now, now))

    def _hold(self, name: str) -> int | None:
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits out an eviction that has just locked it
        try:
            linked = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            linked = False
        if not linked:  # evicted between our open and our lock
            os.close(fd)
            return None
        return fd

    def _fetch(self, record: dict, keep: set[str]) -> int:
        name, size = record["file"], int(record["bytes"])
        where = f"{self.remote}/{name}"
        fd, part = self._reserve(name, size, keep)
        pieces = None
        try:
            pieces = self.fetch(name)
            # Checked as it streams in, never read back. A dup shares the lock; closing it keeps the lock.
            digest, written = hashlib.sha256(), 0
            with open(os.dup(fd), "wb") as out:
                for piece in pieces:
                    written += len(piece)
                    if written > size:
                        break
                    digest.update(piece)
                    out.write(piece)
            if written != size:
                got = f"more than {size}" if written > size else f"{written}"
                raise _corrupt(where, f"{got} bytes, the manifest says {size}")
            if digest.hexdigest() != record["sha256"]:
                raise _corrupt(where, "its sha256 is not the manifest's")
            with self._locks.lock(
                "lru"
            ):  # a scan sees the temporary file or the shard, never both or neither
                os.replace(part, self.path(name))
        except BaseException as err:
            os.close(fd)
            part.unlink(missing_ok=True)
            if isinstance(err, FileNotFoundError):
                raise _missing(where) from None
            raise
        finally:
            if hasattr(pieces, "close"):  # a generator streaming from the bucket: its stream closes now
                pieces.close()
        self.fetched += 1
        return fd

    def _reserve(self, name: str, size: int, keep: set[str]) -> tuple[int, Path]:
        """Make room for ``size`` bytes and create the temporary file that holds it, at its full size, so that
        every process counts it from now on. Returns the file's descriptor (holding its shared lock) and path."""
        deadline = time.monotonic() + WAIT_S
        while True:
            with self._locks.lock("lru"):
                used = self._make_room(size, keep)
                if used + size <= self.limit:
                    part = self.folder / f".{name}.{uuid.uuid4().hex}.part"
                    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    fcntl.flock(fd, fcntl.LOCK_SH)  # before the lru lock goes: a scan never sees it unheld
                    os.ftruncate(fd, size)
                    return fd, part
            if time.monotonic() > deadline:
                raise _error(
                    f"signals.local_cache_gb: {self.limit / 1e9:g} GB in {self.folder} stayed full of shards that "
                    f"other processes on this node read for {WAIT_S:g} s; raise it"
                )
            time.sleep(0.2)

    def _make_room(self, size: int, keep: set[str]) -> int:
        """Evict whole shards, least recently used first, until ``size`` more bytes fit; skips shards in use,
        those in ``keep``, and removes temporary files no live fetch holds. Returns the bytes still used."""
        used, shards = 0, []
        for p in self.folder.iterdir():
            if p.name.endswith(".part") and self._try_remove(p):
                continue  # a fetch that died
            try:
                stat = p.stat()
            except FileNotFoundError:  # a failed fetch removing its temporary file
                continue
            if p.name.endswith(".part"):
                used += stat.st_size
            elif p.name.endswith(SUFFIX):
                used += stat.st_size
                shards.append((stat.st_mtime_ns, p.name, stat.st_size))
        for _, name, nbytes in sorted(shards):
            if used + size <= self.limit:
                break
            if name not in keep and self._try_remove(self.path(name)):
                used -= nbytes
        return used

    @staticmethod
    def _try_remove(path: Path) -> bool:
        """Delete ``path`` unless some process holds it (its shared lock); True when deleted."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            path.unlink()
        finally:
            os.close(fd)
        return True
