"""End what a driver's local Ray cluster left behind when the driver dies without shutting it down.

``kill -9`` of a driver that started a private local Ray (``ray.init(address="local")``) leaves Ray's
DashboardAgent and RuntimeEnvAgent (children of the raylet) alive, re-parented to init. `start_ray` starts
this watcher beside the driver: it notes the driver's descendants (pid and start time, so a reused pid is
never touched) once a second, and when the driver is gone it ends those still alive, and their children:
SIGTERM, then SIGKILL after a grace period. It touches nothing the driver did not start.

Run as ``python -m tuning.reaper DRIVER_PID``; Linux only (reads /proc); elsewhere it exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

POLL_S = 1.0
GRACE_S = 5.0  # after the driver dies: Ray's own shutdown (a clean exit) finishes in this time


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process; None when it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _processes() -> dict[int, tuple[int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                out[int(entry)] = stat
    return out


def descendants(roots: dict[int, int], table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """pid -> start time of every live process below ``roots`` (pid -> start time), roots excluded."""
    table = _processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, int] = {}
    todo = [pid for pid, start in roots.items() if table.get(pid, (0, -1))[1] == start]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


def alive(known: dict[int, int]) -> dict[int, int]:
    """The processes of ``known`` still alive as the same process (same start time)."""
    return {pid: start for pid, start in known.items() if (_stat(pid) or (0, -1))[1] == start}


def end(known: dict[int, int]) -> int:
    """SIGTERM the live ones of ``known`` and what they started since; SIGKILL what is left after GRACE_S.
    Returns how many needed ending."""
    known = {**known, **descendants(alive(known))}
    left = alive(known)
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + GRACE_S
    while alive(left) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive(left):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(left)


def watch(driver: int) -> int:
    me = os.getpid()
    start = (_stat(driver) or (0, -1))[1]
    if start < 0:
        return 0
    known: dict[int, int] = {}
    while (_stat(driver) or (0, -1))[1] == start:
        known.update(descendants({driver: start}))
        known.pop(me, None)
        time.sleep(POLL_S)
    time.sleep(GRACE_S)  # a clean exit's ray.shutdown() is still ending its processes
    known.pop(me, None)
    return end(known)


def main(argv: list[str]) -> int:
    if not Path("/proc/self/stat").exists() or len(argv) != 1:
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver's process group
    watch(int(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
