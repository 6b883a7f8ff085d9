"""The quickstart sweep's wall time with the teacher live in every trial against cached teacher signals.

Same sweep file, seed and trials; each mode in a fresh working directory (its own MLflow store, sweep
storage and caches) with one shared, already fine-tuned demo teacher, run one after the other in
subprocesses (a sweep takes the whole machine, so the two cannot be interleaved).

    python benchmarks/sweep_signals.py                      # the quickstart: 20 trials, about 20 minutes
    python benchmarks/sweep_signals.py --trials 6 --json benchmarks/results/sweep_signals.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write_json  # noqa: E402

FLEXKD = [sys.executable, "-m", "tuning.cli"]
REPO = Path(__file__).resolve().parent.parent


def run(root: Path, sweep: str, trials: int | None, modes: list[str]) -> list[dict]:
    teacher = root / "teacher"
    if not (teacher / "config.json").exists():
        subprocess.run(
            [*FLEXKD, "teacher", "demo", f"teacher.path={teacher}", "--quiet"], check=True, cwd=REPO
        )
    rows = []
    for mode in modes:
        work = root / mode
        work.mkdir(parents=True, exist_ok=True)
        args = [*FLEXKD, "sweep", sweep, f"teacher.path={teacher}", f"signals.mode={mode}"]
        if trials:
            args.append(f"trials={trials}")
        started = time.perf_counter()
        out = subprocess.run(args, cwd=work, capture_output=True, text=True, env=_env())
        wall = time.perf_counter() - started
        if out.returncode != 0:
            sys.exit(f"{mode}: exit {out.returncode}\n{out.stderr[-3000:]}")
        log = out.stdout + out.stderr
        prepared = re.search(r"teacher signals and scores ready in ([\d.]+)s", log)
        best = re.search(r"best trial: \S+ \(val/accuracy ([\d.]+)\)", log)
        rows.append(
            {
                "mode": mode,
                "wall s": wall,
                "signals + scores s": float(prepared.group(1)) if prepared else 0.0,
                "best val/accuracy": float(best.group(1)) if best else float("nan"),
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)
    base = rows[0]["wall s"]
    for row in rows:
        row["x live"] = row["wall s"] / base
    return rows


def _env() -> dict:
    import os

    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # each mode records into its own working directory's store
    env["PYTHONPATH"] = f"{REPO}:{env.get('PYTHONPATH', '')}"
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--sweep", default="quickstart")
    parser.add_argument("--trials", type=int, help="override the sweep's trial count")
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "flexkd-bench-sweep"))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = run(Path(args.root), args.sweep, args.trials, ["live", "auto"])
    print(f"# sweep {args.sweep} wall time, live teacher vs cached signals (auto)\n# {machine()}")
    print(table(rows, ["mode", "wall s", "x live", "signals + scores s", "best val/accuracy"]))
    write_json(args.json, {"sweep": args.sweep, "trials": args.trials, "rows": rows, "raw": json.dumps(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
