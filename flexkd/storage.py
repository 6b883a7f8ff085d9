"""Where caches live: a local folder (or shared POSIX filesystem) or a cloud URI (s3://, gs://).

The score cache and the teacher-signal cache both keep their files through ``Store``: local writes go to a
temporary name and are renamed (a reader sees the old state or the whole file); cloud URIs go through
pyarrow's filesystems, where one object's write is atomic. ``lock`` is an ``fcntl`` lock per key on local
and shared POSIX filesystems (a second writer waits for the first), and a no-op for cloud URIs.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


class Store:
    """Files under ``root``, addressed by path parts (``store.read(key, "manifest.json")``)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.local = "://" not in self.root or self.root.startswith("file://")
        if self.local:
            self.root = self.root.removeprefix("file://")

    def _fs(self):
        from pyarrow import fs

        return fs.FileSystem.from_uri(self.root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        if self.local:
            return Path(self.path(*parts)).exists()
        from pyarrow import fs

        filesystem, base = self._fs()
        return filesystem.get_file_info("/".join([base, *parts])).type != fs.FileType.NotFound

    def read(self, *parts: str) -> bytes:
        if self.local:
            return Path(self.path(*parts)).read_bytes()
        filesystem, base = self._fs()
        with filesystem.open_input_stream("/".join([base, *parts])) as f:
            return f.read()

    def chunks(self, *parts: str, size: int = 1 << 24) -> Iterator[bytes]:
        """The file's bytes in pieces of at most ``size``: a large file streamed, never held whole."""
        if self.local:
            with open(self.path(*parts), "rb") as f:
                while piece := f.read(size):
                    yield piece
            return
        filesystem, base = self._fs()
        with filesystem.open_input_stream("/".join([base, *parts])) as f:
            while piece := f.read(size):
                yield piece

    def write(self, data: bytes, *parts: str) -> None:
        if self.local:
            target = Path(self.path(*parts))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return
        filesystem, base = self._fs()
        filesystem.create_dir("/".join([base, *parts[:-1]]), recursive=True)
        with filesystem.open_output_stream("/".join([base, *parts])) as f:
            f.write(data)

    def folders(self) -> list[str]:
        if self.local:
            root = Path(self.root)
            return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        from pyarrow import fs

        filesystem, base = self._fs()
        infos = filesystem.get_file_info(fs.FileSelector(base, allow_not_found=True))
        return sorted(Path(i.path).name for i in infos if i.type == fs.FileType.Directory)

    def delete(self, name: str) -> None:
        if self.local:
            import shutil

            shutil.rmtree(self.path(name), ignore_errors=True)
            return
        filesystem, base = self._fs()
        filesystem.delete_dir(f"{base}/{name}")

    @contextlib.contextmanager
    def lock(self, key: str):
        """Exclusive per key across processes on one (shared POSIX) filesystem; a no-op for cloud URIs."""
        if not self.local:
            yield
            return
        import fcntl

        Path(self.root).mkdir(parents=True, exist_ok=True)
        with open(Path(self.root) / f".{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
