"""Helpers shared by the benchmark scripts: pairs of models, timing, tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ASSETS = Path(os.environ.get("FLEXKD_ASSETS", "~/kd-assets")).expanduser()

# The methods the quality benchmarks compare, as `flexkd train` overrides (logit KD is the presets' default).
METHODS = {
    "SFT": ["feature.loss=none", "kd.loss=none"],
    "logit KD": ["feature.loss=none"],
    "projector + KD": ["feature.loss=projector"],
    "CKA + KD": ["feature.loss=cka"],
    "Gram + KD": ["feature.loss=gram"],
    "Flex-KD + KD": ["feature.loss=pearson"],
}
STRATEGIES = ["gradient", "random", "variance", "first"]


def _stop(signum, frame):
    raise SystemExit(128 + signum)


def cli(words: list[str], log: Path) -> float:
    """Run `flexkd WORDS --quiet` in a subprocess, its output into ``log``; its wall seconds. Exits on failure.

    A script stopped (SIGTERM, Ctrl-C) stops the run too: left running, it would finish beside the next
    invocation's runs and both their timings would lie."""
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "tuning.cli", *words, "--quiet"]
    started = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        previous = signal.signal(signal.SIGTERM, _stop)
        try:
            proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n  log: {log}")
    return time.time() - started


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        payload = {
            "machine": machine(),
            "argv": sys.argv,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            **payload,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {path}")
