"""The run folder and checkpoint layout, shared by local runs, Ray Train checkpoints and MLflow artifacts.

student/            the student as a Hugging Face folder (weights + config + tokenizer)
projector.pt        the projector baseline's weights (never part of the student)
selection.json      per mapped layer: teacher layer, student layer, method, k, indices, scores, token count
config.yaml         the resolved config
metrics.json        final metrics (final checkpoint only)
trainer_state.pt    optimizer, scheduler, step, RNG states (checkpoints only; left out of an export)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STUDENT = "student"
PROJECTOR = "projector.pt"
SELECTION = "selection.json"
CONFIG = "config.yaml"
METRICS = "metrics.json"
TRAINER_STATE = "trainer_state.pt"
EXPORTED = (STUDENT, PROJECTOR, SELECTION, CONFIG, METRICS)


def write_metrics(folder: str | Path, metrics: dict) -> None:
    Path(folder, METRICS).write_text(json.dumps(metrics, indent=1, sort_keys=True))


def read_metrics(folder: str | Path) -> dict:
    path = Path(folder, METRICS)
    return json.loads(path.read_text()) if path.exists() else {}


def export(checkpoint: str | Path, dest: str | Path) -> Path:
    """Copy a checkpoint's artifacts (not its trainer state) into ``dest``, replacing older ones."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in EXPORTED:
        src = Path(checkpoint, name)
        target = dest / name
        if not src.exists():
            continue
        if target.is_dir():
            shutil.rmtree(target)
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)
    return dest
