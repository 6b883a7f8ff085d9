"""Reports of a run in this process: a one-line progress view, metrics.jsonl and the latest checkpoint."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

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
    """Formats ``step 40/300 | loss 0.812 task 0.69 ... | 5.1k tok/s | eta 0:00:52`` lines."""

    def __init__(self, total_steps: int, stream=sys.stderr):
        self.total = total_steps
        self.stream = stream
        self.first: tuple[float, int] | None = (
            None  # (time, step) of the first report: a resumed run starts late
        )

    def __call__(self, metrics: dict, step: int) -> None:
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


class LocalReporter:
    """The ``report`` of a run in this process.

    Appends every report to ``<output_dir>/metrics.jsonl``, prints a progress line (unless quiet), and keeps
    the newest checkpoint as ``<output_dir>/checkpoints/latest`` (the one ``--resume`` continues from).
    """

    def __init__(self, output_dir: str | Path, total_steps: int, quiet: bool = False):
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = None if quiet else ProgressLine(total_steps)
        self.latest: Path | None = None
        self.history: list[tuple[int, dict]] = []
        # A resumed run repeats the steps between its checkpoint and the interruption: keep the first report.
        self.last_step = max((json.loads(line)["step"] for line in self._lines()), default=0)

    def _lines(self) -> list[str]:
        path = self.out / "metrics.jsonl"
        return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints" / "latest"

    def __call__(self, metrics: dict, step: int, checkpoint: str | None = None) -> None:
        if metrics and step > self.last_step:
            self.last_step = step
            self.history.append((step, dict(metrics)))
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if self.progress:
                self.progress(metrics, step)
        if checkpoint:
            # Move in under a temporary name, then swap: a crash mid-copy never leaves a broken 'latest'.
            target = self.checkpoint_dir
            staging = target.with_name("incoming")
            if staging.exists():
                shutil.rmtree(staging)
            shutil.move(checkpoint, staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
            self.latest = target
