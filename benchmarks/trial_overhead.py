"""Per-trial overhead of a sweep: wall time minus time in the loop, split into its parts, before and after.

"before" is the naive Tune + Train pattern: every trial fits a TorchTrainer with one Ray Train worker, so it
starts a worker group (placement group, worker process, imports, process group). "after" is what the
quickstart does: the trial fits a TorchTrainer in Ray Train's local mode, in its own process. Both run the
quickstart sweep (same sampled trials: same Optuna seed), sequentially and without ASHA, through the
project's own `run_sweep`, in a scratch folder with its own MLflow store; the parts come from the trials'
MLflow tags (`flexkd.perf.trial.*`, `flexkd.perf.setup_*`, `flexkd.perf.loop_s`).

    python benchmarks/trial_overhead.py --trials 4          # about 6 minutes on 2 CPUs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write_json  # noqa: E402

PARTS = [
    ("process start + imports", "perf/trial/process_start_s"),
    ("MLflow run + params", "perf/trial/mlflow_open_s"),
    ("data + teacher load", "perf/setup_data_s"),
    ("student build", "perf/setup_student_s"),
    ("scoring or cache hit", "perf/setup_selection_s"),
    ("Train start (fit - loop - setup)", "train_start"),
    ("MLflow per-step logging", "perf/trial/mlflow_steps_s"),
    ("MLflow artifacts + close", "perf/trial/mlflow_close_s"),
]


def sweep_once(variant: str, trials: int, teacher: str, workdir: Path, extra: list[str]) -> dict:
    from tuning import tracking
    from tuning.space import load_sweep
    from tuning.sweep import run_sweep

    os.chdir(workdir)
    overrides = [
        f"trials={trials}",
        "concurrency=1",
        "scheduler.name=none",
        f"teacher.path={teacher}",
        f"tracking.experiment=overhead-{variant}",
        "tracking.register_top=0",
        f"scaling.num_workers={1 if variant == 'before' else 0}",
        *extra,
    ]
    spec, raw = load_sweep("quickstart", overrides)
    spec.name = f"overhead-{variant}"
    start = time.perf_counter()
    summary = run_sweep(spec, raw, quiet=True)
    wall = time.perf_counter() - start
    uri = tracking.tracking_uri()
    rows = []
    for run in tracking.children(uri, summary["parent_run_id"], summary["experiment_id"]):
        # One-off timings are tags (flexkd.perf.setup_s for perf/setup_s): read them back under their names.
        m = {
            k.removeprefix("flexkd.").replace(".", "/"): float(v)
            for k, v in run.data.tags.items()
            if k.startswith("flexkd.perf.")
        }
        total = m.get("perf/trial/process_start_s", 0) + m["perf/trial/in_trial_s"]
        setup = m["perf/setup_s"]
        m["train_start"] = m["perf/trial/fit_s"] - setup - m["perf/loop_s"]
        m.setdefault("perf/trial/mlflow_steps_s", float("nan"))
        rows.append(
            {
                "trial": run.data.tags[tracking.TRIAL_TAG],
                "total_s": total,
                "loop_s": m["perf/loop_s"],
                "fixed_s": total - m["perf/loop_s"],
                **{name: m.get(key, float("nan")) for name, key in PARTS},
            }
        )
    return {"variant": variant, "sweep_wall_s": wall, "trials": rows}


def summarize(result: dict) -> dict:
    rows = result["trials"]
    n = len(rows)

    def mean(key):
        values = [r[key] for r in rows if r[key] == r[key]]  # skip NaN
        return sum(values) / len(values) if values else float("nan")

    total, loop = mean("total_s"), mean("loop_s")
    out = {
        "variant": result["variant"],
        "trials": n,
        "sweep wall / trial s": result["sweep_wall_s"] / max(n, 1),
        "trial total s": total,
        "in loop s": loop,
        "fixed s": total - loop,
        "fixed %": 100 * (total - loop) / total,
    }
    out.update({name: mean(name) for name, _ in PARTS})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument(
        "--teacher",
        default=str(Path("./flexkd-runs/teachers/demo-classification").resolve()),
        help="a fine-tuned demo teacher (flexkd teacher demo); missing: fine-tuned first",
    )
    parser.add_argument("--variants", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--override", action="append", default=[], help="extra key=value for the sweep")
    parser.add_argument("--json")
    parser.add_argument(
        "--keep", help="run in this folder and keep its MLflow store (default: a temp folder)"
    )
    args = parser.parse_args(argv)
    if args.json:
        args.json = str(Path(args.json).resolve())  # each sweep runs from its own scratch folder
    teacher = str(Path(args.teacher).resolve())
    if not Path(teacher, "config.json").exists():
        from flexkd.config import load_config
        from flexkd.runs import prepare_teacher

        prepare_teacher(load_config("demo", [f"teacher.path={teacher}"]), quiet=True)
    results = []
    keep = Path(args.keep).resolve() if args.keep else None
    with tempfile.TemporaryDirectory(prefix="flexkd-overhead-") as tmp:
        for variant in args.variants:
            workdir = Path(keep or tmp, variant)
            workdir.mkdir(parents=True)
            results.append(sweep_once(variant, args.trials, teacher, workdir, args.override))
    summaries = [summarize(r) for r in results]
    print(
        f"# per-trial overhead of the quickstart sweep ({args.trials} trials each, sequential, no ASHA)\n# {machine()}"
    )
    print(
        table(
            summaries,
            ["variant", "trials", "sweep wall / trial s", "trial total s", "in loop s", "fixed s", "fixed %"],
        )
    )
    print("\n# the fixed part, mean seconds per trial")
    print(table(summaries, ["variant", *[name for name, _ in PARTS]]))
    write_json(args.json, {"summaries": summaries, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
