"""Bad inputs, before and after: every case of tests/test_bad_inputs.py run as a user runs it (`flexkd ...`
in a fresh process, in a folder holding only its inputs) against two checkouts side by side.

    python benchmarks/bad_inputs.py --before <git ref>      # e.g. the commit before the checks landed

Prints one row per case: exit code, seconds, whether anything was written (./flexkd-runs, mlflow.db, ...),
and the first line of the error, for the old code (a `git worktree` of the ref) and for this checkout. A
case the old code accepted shows "ran" (still running after --limit seconds: it started training).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from benchmarks.common import table  # noqa: E402
from tests.test_bad_inputs import CASES, files_under  # noqa: E402


def run_case(root: Path, case, limit: float) -> dict:
    name, inputs, argv, _ = case
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rel, text in inputs.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        before = files_under(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(root))
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuning.cli", *argv],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group: an accepted case's Ray and workers end with it
        )
        try:
            _, err = proc.communicate(timeout=limit)
            code = str(proc.returncode)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            code = "ran"
        seconds = time.perf_counter() - start
        wrote = files_under(tmp) != before
    lines = [line for line in err.splitlines() if line.strip()]
    traceback = any(line.startswith("Traceback") for line in lines)
    first = next((line for line in lines if line.startswith("flexkd: error:")), lines[-1] if lines else "")
    return {
        "exit": code,
        "s": round(seconds, 2),
        "wrote": "yes" if wrote else "no",
        "message": ("traceback: " if traceback else "") + first.removeprefix("flexkd: error: ")[:90],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git ref of the old code")
    parser.add_argument("--limit", type=float, default=30, help="seconds before a case counts as accepted")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    old = Path(tempfile.mkdtemp(prefix="flexkd-before-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(old), args.before],
        cwd=HERE,
        check=True,
        capture_output=True,
    )
    rows = []
    try:
        for case in CASES:
            a, b = run_case(old, case, args.limit), run_case(HERE, case, args.limit)
            rows.append(
                {
                    "case": case[0],
                    "before": f"{a['exit']} {a['s']:.1f}s{' wrote' if a['wrote'] == 'yes' else ''}",
                    "before message": a["message"][:60],
                    "after": f"{b['exit']} {b['s']:.1f}s{' wrote' if b['wrote'] == 'yes' else ''}",
                    "after message": b["message"],
                }
            )
            print(f"{case[0]}: before {rows[-1]['before']}, after {rows[-1]['after']}", file=sys.stderr)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=HERE, capture_output=True)
    print(table(rows, ["case", "before", "before message", "after", "after message"]))
    fixed = sum(r["after"].startswith("2 ") and not r["before"].startswith("2 ") for r in rows)
    print(f"\n{len(rows)} cases; {fixed} no longer end in a traceback, a late failure or an accepted run")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
