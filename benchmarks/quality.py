"""Quality with real models and real data: IMDB, an MPNet teacher, two MiniLM students, every baseline.

Everything goes through the project's CLI (`flexkd teacher`, `flexkd train`), one subprocess per run, on the
`imdb-bert` preset plus the overrides below; a run whose metrics.json exists is not run again, so the script
resumes where it stopped. It prints the mean and std over seeds of test accuracy and macro-F1 per student
and method (SFT, logit KD, projector + KD, Flex-KD + KD), the teacher's, and a selection ablation (gradient
vs random vs variance vs first) for Flex-KD; writes JSON and a PNG plot.

Sizes are chosen for a 2-CPU machine (say so when quoting): reviews cut to --max-length tokens, the student
sees --train-examples reviews for --steps steps of batch 16, and the test split is --test-examples reviews
held out from the 50k. The teacher is fine-tuned first on the rest of the training split (--teacher-steps).

    python benchmarks/quality.py --out bench-quality            # about 2 hours on 2 CPUs
    python benchmarks/quality.py --out bench-quality --report   # tables and plot from what is there
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import ASSETS, STRATEGIES, machine, table, write_json  # noqa: E402

# The four methods its README table was measured with (benchmarks/science.py runs all six).
METHODS = {m: common.METHODS[m] for m in ("SFT", "logit KD", "projector + KD", "Flex-KD + KD")}
STUDENTS = {"MiniLM-L6": "models/all-MiniLM-L6-v2", "MiniLM-L3": "models/paraphrase-MiniLM-L3-v2"}


def common_overrides(args, out: Path) -> list[str]:
    return [
        f"data.source={ASSETS / 'data/imdb_sentiment.jsonl'}",
        f"data.max_length={args.max_length}",
        f"data.max_train_examples={args.train_examples}",
        f"data.test_size={args.test_examples}",
        "data.val_size=200",
        f"teacher.base={ASSETS / 'models/all-mpnet-base-v2'}",
        f"teacher.path={out / 'teacher'}",
        f"teacher.steps={args.teacher_steps}",
        f"train.steps={args.steps}",
        "train.batch_size=16",
        "train.eval_every=0",
        f"train.log_every={max(args.steps // 4, 1)}",
        f"optim.warmup_steps={max(args.steps // 10, 1)}",
        f"scoring.cache={out / 'score-cache'}",  # scores once per student setting, not once per run
        f"feature.weight={args.feature_weight}",
    ]


def flexkd(*words: str, log: Path) -> None:
    common.cli(list(words), log)


def runs(args) -> list[dict]:
    # Seed by seed, so that a run cut short still has every method on the seeds it finished.
    plan = []
    for seed in args.seeds:
        for student, path in STUDENTS.items():
            for method, over in METHODS.items():
                plan.append(
                    {
                        "student": student,
                        "method": method,
                        "seed": seed,
                        "strategy": "gradient",
                        "overrides": [f"student.path={ASSETS / path}", *over, f"run.seed={seed}"],
                    }
                )
    for seed in args.ablation_seeds or args.seeds:
        for strategy in STRATEGIES[1:]:
            plan.append(
                {
                    "student": args.ablation_student,
                    "method": "Flex-KD + KD",
                    "seed": seed,
                    "strategy": strategy,
                    "overrides": [
                        f"student.path={ASSETS / STUDENTS[args.ablation_student]}",
                        *METHODS["Flex-KD + KD"],
                        f"run.seed={seed}",
                        f"selection.strategy={strategy}",
                    ],
                }
            )
    for item in plan:
        item["name"] = f"{item['student']}-{item['method']}-{item['strategy']}-s{item['seed']}".replace(
            " ", ""
        ).replace("+", "_")
    return plan


def execute(args, out: Path) -> None:
    base = common_overrides(args, out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not (out / "teacher" / "config.json").exists():
        print(
            f"[{time.strftime('%H:%M:%S')}] fine-tuning the teacher ({args.teacher_steps} steps)", flush=True
        )
        flexkd("teacher", "imdb-bert", *base, "run.seed=0", log=logs / "teacher.log")
    for item in runs(args):
        folder = out / "runs" / item["name"]
        if (folder / "metrics.json").exists():
            continue
        started = time.time()
        flexkd(
            "train",
            "imdb-bert",
            *base,
            *item["overrides"],
            f"run.output_dir={folder}",
            f"run.name={item['name']}",
            log=logs / f"{item['name']}.log",
        )
        print(f"[{time.strftime('%H:%M:%S')}] {item['name']}: {time.time() - started:.0f}s", flush=True)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(args, out: Path) -> dict:
    teacher = (
        json.loads((out / "teacher" / "metrics.json").read_text())
        if (out / "teacher" / "metrics.json").exists()
        else {}
    )
    results = []
    for item in runs(args):
        path = out / "runs" / item["name"] / "metrics.json"
        if path.exists():
            m = json.loads(path.read_text())
            results.append(
                {
                    **{k: item[k] for k in ("student", "method", "seed", "strategy")},
                    "accuracy": m["test/accuracy"],
                    "macro_f1": m["test/macro_f1"],
                }
            )
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["student"], r["method"], r["strategy"]), []).append(r)
    rows = []
    for (student, method, strategy), rs in groups.items():
        acc, acc_sd = _mean_std([r["accuracy"] for r in rs])
        f1, f1_sd = _mean_std([r["macro_f1"] for r in rs])
        rows.append(
            {
                "student": student,
                "method": method,
                "selection": strategy,
                "seeds": len(rs),
                "accuracy": f"{acc:.4f} ± {acc_sd:.4f}",
                "macro-F1": f"{f1:.4f} ± {f1_sd:.4f}",
                "_acc": acc,
                "_sd": acc_sd,
            }
        )
    main_rows = [r for r in rows if r["selection"] == "gradient" or r["method"] != "Flex-KD + KD"]
    ablation = [r for r in rows if r["method"] == "Flex-KD + KD" and r["student"] == args.ablation_student]
    print(
        f"# IMDB quality: teacher all-mpnet-base-v2 fine-tuned {args.teacher_steps} steps; students see "
        f"{args.train_examples} reviews x {args.steps} steps (batch 16), reviews cut to {args.max_length} tokens; "
        f"test = {args.test_examples} held-out reviews; seeds {args.seeds}\n# {machine()}"
    )
    if teacher:
        print(
            f"teacher: test accuracy {teacher.get('test/accuracy', float('nan')):.4f}, "
            f"macro-F1 {teacher.get('test/macro_f1', float('nan')):.4f}"
        )
    print(table(main_rows, ["student", "method", "seeds", "accuracy", "macro-F1"]))
    print("\n# selection ablation (Flex-KD + KD)")
    print(table(ablation, ["student", "selection", "seeds", "accuracy", "macro-F1"]))
    if rows:
        plot(rows, teacher, args.ablation_student, out / "quality.png")
    payload = {
        "teacher": teacher,
        "runs": results,
        "summary": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "settings": vars(args),
    }
    write_json(str(out / "quality.json"), payload)
    return payload


def plot(rows: list[dict], teacher: dict, ablation_student: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))

    def points(ax, categories: list[str], picked: dict[str, dict], nudge: float, label: str) -> None:
        """Mean ± std per category, at the category's tick (nudged so that students do not overlap)."""
        xs = [c for c in categories if c in picked]
        ax.errorbar(
            [categories.index(c) + nudge for c in xs],
            [picked[c]["_acc"] for c in xs],
            yerr=[picked[c]["_sd"] for c in xs],
            fmt="o",
            capsize=4,
            label=label,
        )
        ax.set_xticks(range(len(categories)), categories, rotation=15 if ax is axes[0] else 0)
        ax.set_xlim(-0.5, len(categories) - 0.5)

    methods = list(METHODS)
    for i, student in enumerate(sorted({r["student"] for r in rows})):
        picked = {r["method"]: r for r in rows if r["student"] == student and r["selection"] == "gradient"}
        points(axes[0], methods, picked, 0.1 * i, student)
    if "test/accuracy" in teacher:
        axes[0].axhline(teacher["test/accuracy"], ls="--", c="gray", label="teacher")
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[0].set_title("IMDB: methods per student")
    axes[0].legend(loc="upper left", bbox_to_anchor=(0.01, 0.9))  # below the teacher line, above the points
    ablation = {
        r["selection"]: r for r in rows if r["method"] == "Flex-KD + KD" and r["student"] == ablation_student
    }
    if ablation:
        points(axes[1], STRATEGIES, ablation, 0.0, ablation_student)
    axes[1].set_title(f"Flex-KD + KD on {ablation_student}: which teacher units")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--out", default="bench-quality", help="folder for runs, logs, JSON and the plot")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--ablation-student", default="MiniLM-L3", choices=list(STUDENTS))
    parser.add_argument(
        "--ablation-seeds",
        type=int,
        nargs="+",
        help="seeds of the random/variance/first runs (default: --seeds)",
    )
    parser.add_argument(
        "--report", action="store_true", help="only print the tables and plot from finished runs"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if not (ASSETS / "data/imdb_sentiment.jsonl").exists():
        sys.exit(f"{ASSETS}/data/imdb_sentiment.jsonl is missing: run ../shared/assets/fetch.sh {ASSETS}")
    if not args.report:
        execute(args, out)
    report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
