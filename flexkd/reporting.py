"""The run folder, written the same way by every mode, and the sinks that watch it.

``RunRecorder`` is the one implementation of a run's reports: the loop's ``report`` in this process, and
what the Ray Train driver (``tuning.ray_train``) feeds with rank 0's reports, whether for `flexkd train` or
for a sweep trial. It writes, under ``out``:

    metrics.jsonl          one line per reported step: {"step": N, "train/...": ..., "val/...": ...}
    events.jsonl           one-off facts: {"event": "scored_s" | "scores_cached" | "resumed_from_step" |
                           "checkpoint", "value": ..., "step": N}
    checkpoints/latest/    the newest checkpoint (layout in flexkd.artifacts); what --resume continues from
    config.yaml            the resolved config
    student/ selection.json metrics.json projector.pt   the final artifacts (``finish``)

A resumed run repeats the steps between its checkpoint and the interruption, and a restarted Ray Train worker
group does the same: the first report of each step wins, here and nowhere else. Sinks (the progress line,
MLflow, Tune) see the de-duplicated reports, in order, after the folder has them.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from flexkd import artifacts

EVENT_PREFIX = "event/"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
CHECKPOINT_DIR = "checkpoints/latest"
RUN_FILES = (METRICS_FILE, EVENTS_FILE, artifacts.CONFIG, *artifacts.EXPORTED)


class Sink(Protocol):
    """Receives a run's de-duplicated reports. ``checkpoint`` is the run folder's checkpoint, when one came."""

    def report(self, metrics: dict, step: int, checkpoint: Path | None) -> None: ...

    def event(self, name: str, value: Any, step: int) -> None: ...


class RunRecorder:
    """The ``report(metrics, step, checkpoint=None)`` every mode ends in; see the module docstring.

    resume: keep the folder's history and continue it (``--resume``); otherwise a fresh run replaces it.
    """

    def __init__(self, out: str | Path, sinks: list[Sink] = (), resume: bool = False, config_text: str = ""):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sinks = list(sinks)
        if not resume:
            for name in (METRICS_FILE, EVENTS_FILE):
                (self.out / name).unlink(missing_ok=True)
        if config_text:
            (self.out / artifacts.CONFIG).write_text(config_text)
        self.last_step = max((r["step"] for r in self.read(METRICS_FILE)), default=0)
        self.history: list[tuple[int, dict]] = []

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def read(self, name: str) -> list[dict]:
        path = self.out / name
        return (
            [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.exists()
            else []
        )

    def __call__(self, metrics: dict, step: int, checkpoint: str | None = None, origin: str = "") -> None:
        """origin: where the checkpoint came from, for the event (Ray's storage path); default its folder here."""
        metrics = dict(metrics)
        for key in [k for k in metrics if k.startswith(EVENT_PREFIX)]:
            self._event(key[len(EVENT_PREFIX) :], metrics.pop(key), step)
        fresh = step > self.last_step
        if fresh and metrics:
            self.last_step = step
            self.history.append((step, metrics))
            self._append(METRICS_FILE, {"step": step, **metrics})
        kept = None
        if checkpoint:
            kept = self._keep(checkpoint)
            self._event("checkpoint", origin or CHECKPOINT_DIR, step)
        if (fresh and metrics) or kept:
            for sink in self.sinks:
                sink.report(metrics if fresh else {}, step, kept)

    def finish(self) -> dict:
        """Copy the final checkpoint's artifacts into the folder; return its final metrics."""
        if not (self.checkpoint_dir / artifacts.METRICS).exists():
            raise RuntimeError(f"{self.checkpoint_dir}: the run ended without a final checkpoint")
        artifacts.export(self.checkpoint_dir, self.out)
        return artifacts.read_metrics(self.out)

    def _event(self, name: str, value: Any, step: int) -> None:
        self._append(EVENTS_FILE, {"event": name, "value": value, "step": step})
        for sink in self.sinks:
            sink.event(name, value, step)

    def _append(self, name: str, record: dict) -> None:
        with (self.out / name).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _keep(self, checkpoint: str) -> Path:
        # Move in under a temporary name, then swap: a crash mid-copy never leaves a broken 'latest'.
        target = self.checkpoint_dir
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name("incoming")
        if staging.exists():
            shutil.rmtree(staging)
        shutil.move(checkpoint, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return target


# ---------------------------------------------------------------------------------------------------------
# The progress line: a sink

SHORT = {
    "train/loss": "loss",
    "train/loss_task": "task",
    "train/loss_kd": "kd",
    "train/loss_feat": "feat",
    "val/accuracy": "val_acc",
    "val/macro_f1": "val_f1",
    "val/rouge_l": "val_rougeL",
    "val/exact_match": "val_em",
    "test/accuracy": "test_acc",
    "test/rouge_l": "test_rougeL",
}


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """Prints ``step 40/300 | loss 0.812 task 0.69 ... | 5.1k tok/s | eta 0:00:52`` per report."""

    def __init__(self, total_steps: int, stream=sys.stderr):
        self.total = total_steps
        self.stream = stream
        self.first: tuple[float, int] | None = (
            None  # (time, step) of the first report: a resumed run starts late
        )

    def report(self, metrics: dict, step: int, checkpoint: Path | None = None) -> None:
        if not metrics:
            return
        parts = [f"step {step}/{self.total}"]
        values = " ".join(f"{SHORT[k]} {metrics[k]:.4g}" for k in SHORT if k in metrics)
        if values:
            parts.append(values)
        if "perf/tokens_per_s" in metrics:
            parts.append(f"{metrics['perf/tokens_per_s'] / 1000:.1f}k tok/s")
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, step)
        elif step > self.first[1] and step < self.total:
            rate = (now - self.first[0]) / (step - self.first[1])
            parts.append(f"eta {_eta(rate * (self.total - step))}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def event(self, name: str, value: Any, step: int) -> None:
        if name == "resumed_from_step":
            print(f"resumed from the checkpoint of step {int(value)}", file=self.stream, flush=True)


def progress_sinks(total_steps: int, quiet: bool) -> list[Sink]:
    return [] if quiet else [ProgressLine(total_steps)]
