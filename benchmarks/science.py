"""Flex-KD against the strongest baselines on real pairs: classification and generation, 3 seeds, paired CIs.

A cell is a task and a student. Tasks: IMDB and SpamAssassin (teacher all-mpnet-base-v2 fine-tuned; students
paraphrase-MiniLM-L3-v2, all-MiniLM-L6-v2, or a fresh narrow BERT of hidden 64 on the MiniLM tokenizer, a
12x hidden ratio), ChatterBot Q/A and Debian descriptions -> synopsis (teacher SmolLM2-135M-Instruct fine-tuned;
student a fresh Llama of hidden 128, 4.5x). In each cell every method (SFT, logit KD, projector + KD, CKA + KD,
Gram + KD, Flex-KD + KD) gets its learning rate from a sweep on validation (seed 0, --lrs), then runs on every
seed at that rate; on the narrow students Flex-KD also runs with random, variance and first selection at
k = the student's hidden size, with gradient and random selection at k = --small-k, and with the alignment
on the positions the classifier's head reads (feature.tokens=head, the variant issue 15's evidence points to);
on the fresh Llama it also runs with random units at k = its hidden size, and with gradient units aligned on
the response positions alone (feature.tokens=head: a causal LM's head reads no others), once every seed has
its main runs.

Everything goes through the project's CLI, one subprocess per run: `flexkd teacher` fine-tunes each teacher
once, `flexkd signals` stores its outputs once (every run then trains from them: signals.mode=auto), and
`flexkd train` runs each cell. A run whose metrics.json exists is not run again, so the script resumes where it
stopped; cells run in the order given. The report prints per cell the mean and std over seeds of the test
metric, the paired difference Flex-KD - baseline with a 95% t-interval over seeds, the selection ablation,
the teachers' accuracy and calibration, each run's wall time and whether its feature term converged; writes
science.json and science.png (methods per cell, ablation, feature-loss curves).

    python benchmarks/science.py --out bench-science --cells imdb:narrow spam:narrow chatterbot:fresh
    python benchmarks/science.py --out bench-science --cells imdb:narrow --report   # tables and plot only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ASSETS, METHODS, STRATEGIES, cli, machine, table, write_json  # noqa: E402

FLEX = "Flex-KD + KD"

MPNET = "models/all-mpnet-base-v2"
MINILM6 = "models/all-MiniLM-L6-v2"
SMOLLM = "models/SmolLM2-135M-Instruct"
NARROW = (
    "student.path=",
    f"student.tokenizer={ASSETS / MINILM6}",
    "student.arch={model_type: bert, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 1, "
    "intermediate_size: 256}",
)

# Each task: the preset it starts from, its data and teacher settings, and the metric the report reads.
TASKS = {
    "imdb": {
        "preset": "imdb-bert",
        "metric": "accuracy",
        "overrides": [
            f"data.source={ASSETS / 'data/imdb_sentiment.jsonl'}",
            "data.max_length=128",
            "data.max_train_examples=4000",
            "data.val_size=500",
            "data.test_size=1000",
            f"teacher.base={ASSETS / MPNET}",
            "teacher.steps=250",
            "teacher.warmup_steps=25",
            "teacher.eval_every=125",
        ],
    },
    "spam": {
        "preset": "imdb-bert",
        "metric": "accuracy",
        "unseen_test": True,  # 66 of its 1000 test emails repeat a training email
        "overrides": [
            f"data.source={ASSETS / 'data/spamassassin.jsonl'}",
            "data.max_length=128",
            "data.max_train_examples=3000",
            "data.val_size=400",
            "data.test_size=1000",
            f"teacher.base={ASSETS / MPNET}",
            "teacher.steps=150",
            "teacher.warmup_steps=15",
            "teacher.eval_every=75",
        ],
    },
    "chatterbot": {
        "preset": "smollm-chatterbot",
        "metric": "rouge_l",
        "unseen_test": True,  # 143 of its 200 test questions are asked in training too (the corpus repeats them)
        "plot_unseen": True,
        "overrides": [
            f"data.source={ASSETS / 'data/chatterbot_qa.jsonl'}",
            f"teacher.base={ASSETS / SMOLLM}",
            "teacher.steps=200",
        ],
    },
    "debian": {
        "preset": "smollm-debian",
        "metric": "rouge_l",
        "steps": 1000,  # the student's budget here (4 epochs of its 4000 rows), over the student's default
        "unseen_test": True,
        "plot_unseen": True,
        "overrides": [
            f"data.source={ASSETS / 'data/debian_descriptions.jsonl'}",
            f"teacher.base={ASSETS / SMOLLM}",
            # 74% of the rows fit whole (85% at the preset's 160), longer documents lose their tail; a
            # teacher step at 160 costs 17 s on 2 CPUs.
            "data.max_length=128",
            "teacher.steps=250",
            "teacher.warmup_steps=25",
            "teacher.eval_every=50",  # its validation ROUGE-L every 50 steps: has it converged?
        ],
    },
}

# Each student: its overrides, hidden size, its selection ablation ("full": every strategy at k = hidden and
# --small-k, and the head's positions; "random": random units at k = hidden beside the gradient's, and the
# gradient's on the head's positions after every seed's main runs; None), and
# its training budget.
STUDENTS = {
    "narrow": {
        "overrides": list(NARROW),
        "hidden": 64,
        "ablation": "full",
        "steps": 1500,
        "lrs": [3e-4, 1e-3, 3e-3],
    },
    "minilm3": {
        # bf16 autocast with fused AdamW: 0.59x the old fp32 step of this student here (benchmarks/cpu_step.py),
        # from the same fp32 teacher signals; every method of the cell runs so. The narrow cells ran fp32.
        "overrides": [f"student.path={ASSETS / 'models/paraphrase-MiniLM-L3-v2'}", "run.precision=bf16"],
        "hidden": 384,
        "ablation": None,
        "steps": 500,
        "lrs": [5e-5, 2e-4],
    },
    "minilm6": {
        "overrides": [f"student.path={ASSETS / MINILM6}", "run.precision=bf16"],
        "hidden": 384,
        "ablation": None,
        "steps": 500,
        # Unlike MiniLM-L3 (whose grid top won every method), on IMDB this student's SFT got better at each
        # step down (val 0.824, 0.852, 0.870 at 3e-4, 1e-4, 3e-5; 1e-3 never left ln 2): the grid reaches 1e-5.
        "lrs": [1e-5, 3e-5, 1e-4, 3e-4],
    },
    "fresh": {"overrides": [], "hidden": 128, "ablation": "random", "steps": 600, "lrs": [1e-3, 3e-3]},
}
CLASSIFICATION_STUDENTS = ("narrow", "minilm3", "minilm6")


def parse_cell(text: str) -> tuple[str, str]:
    task, _, student = text.partition(":")
    if task not in TASKS or student not in STUDENTS:
        raise SystemExit(
            f"--cells {text}: expected TASK:STUDENT with TASK in {list(TASKS)}, STUDENT in {list(STUDENTS)}"
        )
    generation = TASKS[task]["metric"] == "rouge_l"
    if generation != (student == "fresh"):
        raise SystemExit(
            f"--cells {text}: generation tasks take the 'fresh' Llama student, classification ones {CLASSIFICATION_STUDENTS}"
        )
    return task, student


def task_overrides(task: str, out: Path) -> list[str]:
    folder = out / task
    return [
        *TASKS[task]["overrides"],
        f"teacher.path={folder / 'teacher'}",
        f"signals.path={folder / 'signals'}",
        f"scoring.cache={folder / 'score-cache'}",  # scores once per setting, not once per run
        "train.eval_every=0",
        "scaling.num_workers=0",
    ]


def run_name(method: str, lr: float, seed: int, extra: str = "") -> str:
    return f"{method}{'-' + extra if extra else ''}-lr{lr:g}-s{seed}".replace(" + ", "_").replace(" ", "")


def stamp(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Cell:
    """One task x student: its folder, its common overrides, and its runs."""

    def __init__(self, task: str, student: str, out: Path, args):
        self.task, self.student, self.args = task, student, args
        self.spec, self.who = TASKS[task], STUDENTS[student]
        self.out = out
        self.root = out / task
        self.folder = self.root / student
        self.steps = args.steps or self.spec.get("steps") or self.who["steps"]
        self.lrs = args.lrs or self.who["lrs"]
        self.base = [
            *task_overrides(task, out),
            *self.who["overrides"],
            f"train.steps={self.steps}",
            f"train.log_every={max(self.steps // 30, 1)}",
            f"optim.warmup_steps={max(self.steps // 20, 1)}",
        ]
        self.metric = self.spec["metric"]

    def words(self, overrides: list[str], name: str) -> list[str]:
        return [
            "train",
            self.spec["preset"],
            *self.base,
            *overrides,
            f"run.output_dir={self.folder / 'runs' / name}",
            f"run.name={self.task}-{self.student}-{name}",
        ]

    def run(self, overrides: list[str], name: str) -> dict | None:
        """metrics.json of the run, running it first unless --report; None when absent under --report."""
        folder = self.folder / "runs" / name
        if not (folder / "metrics.json").exists():
            if self.args.report:
                return None
            (self.folder / "logs").mkdir(parents=True, exist_ok=True)
            wall = cli(self.words(overrides, name), self.folder / "logs" / f"{name}.log")
            (folder / "wall.json").write_text(json.dumps({"wall_s": wall}))
            stamp(f"{self.task}:{self.student} {name}: {wall:.0f}s")
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics.update(self.unseen(folder, name))
        wall = folder / "wall.json"
        metrics["wall_s"] = json.loads(wall.read_text())["wall_s"] if wall.exists() else float("nan")
        metrics["curve"] = feature_curve(folder)
        return metrics

    def unseen(self, folder: Path, name: str) -> dict:
        """test_unseen/* of a finished run: its student on the test rows whose input no training row has
        (`flexkd eval --split test-unseen`), once; {} for a task without repeats or under --report."""
        path = folder / "unseen.json"
        if self.spec.get("unseen_test") and not path.exists() and not self.args.report:
            log = self.folder / "logs" / f"{name}-unseen.log"
            config = str(folder / "config.yaml")
            cli(["eval", config, "--model", str(folder / "student"), "--split", "test-unseen"], log)
            text = log.read_text()
            path.write_text(text[text.index("{") : text.rindex("}") + 1])
        return json.loads(path.read_text()) if path.exists() else {}

    def prepare(self) -> None:
        """The task's teacher (fine-tuned once) and its signals (stored once), shared by every student."""
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        common = [self.spec["preset"], *task_overrides(self.task, self.out), "run.seed=0"]
        if not (self.root / "teacher" / "config.json").exists():
            stamp(f"{self.task}: fine-tuning the teacher")
            wall = cli(["teacher", *common], logs / "teacher.log")
            (self.root / "teacher" / "wall.json").write_text(json.dumps({"wall_s": wall}))
        evaluated = self.root / "teacher-test.json"
        if (
            not evaluated.exists()
        ):  # `flexkd eval`: the test metrics with calibration, whichever code trained it
            log = logs / "teacher-eval.log"
            cli(["eval", *common, "--model", str(self.root / "teacher"), "--split", "test"], log)
            text = log.read_text()
            evaluated.write_text(text[text.index("{") : text.rindex("}") + 1])
        unseen = self.root / "teacher-test-unseen.json"
        if self.spec.get("unseen_test") and not unseen.exists():
            log = logs / "teacher-eval-unseen.log"
            cli(["eval", *common, "--model", str(self.root / "teacher"), "--split", "test-unseen"], log)
            text = log.read_text()
            unseen.write_text(text[text.index("{") : text.rindex("}") + 1])
        if not (self.root / "signals.done").exists():
            stamp(f"{self.task}: storing the teacher's signals")
            wall = cli(["signals", *common], logs / "signals.log")
            (self.root / "signals.done").write_text(json.dumps({"wall_s": wall}))

    def sweep_lr(self, method: str) -> float:
        """The learning rate of ``method`` in this cell: the best validation metric on seed 0."""
        best, best_lr = -math.inf, self.lrs[0]
        for lr in self.lrs:
            m = self.run([*METHODS[method], f"optim.lr={lr}", "run.seed=0"], run_name(method, lr, 0))
            if m is not None and m[f"val/{self.metric}"] > best:
                best, best_lr = m[f"val/{self.metric}"], lr
        return best_lr

    def execute(self) -> dict:
        """Every run of the cell, in the order that keeps a cut-short cell useful: the lr sweep, then seed by seed."""
        if not self.args.report:
            self.prepare()
        lr = {method: self.sweep_lr(method) for method in METHODS}
        results: dict = {"lr": lr, "runs": []}

        def record(method: str, seed: int, overrides: list[str], strategy="gradient", k=0, tokens="all"):
            extra = "" if (strategy, k, tokens) == ("gradient", 0, "all") else f"{strategy}-k{k}-{tokens}"
            m = self.run(
                [*overrides, f"optim.lr={lr[method]}", f"run.seed={seed}"],
                run_name(method, lr[method], seed, extra),
            )
            if m is not None:
                results["runs"].append(
                    {
                        "method": method,
                        "seed": seed,
                        "strategy": strategy,
                        "k": k or self.who["hidden"],
                        "tokens": tokens,
                        **m,
                    }
                )

        for seed in self.args.seeds:
            for method, over in METHODS.items():
                record(method, seed, over)
            if self.who["ablation"] == "random":
                record(
                    FLEX, seed, [*METHODS[FLEX], "selection.strategy=random"], "random", self.who["hidden"]
                )
            if self.who["ablation"] != "full":
                continue
            for k in (self.who["hidden"], self.args.small_k):
                for strategy in STRATEGIES if k == self.who["hidden"] else self.args.small_k_strategies:
                    if (strategy, k) == ("gradient", self.who["hidden"]):
                        continue  # the main Flex-KD run
                    record(
                        FLEX,
                        seed,
                        [*METHODS[FLEX], f"selection.strategy={strategy}", f"selection.k={k}"],
                        strategy,
                        k,
                    )
            for strategy in ("gradient", "random"):
                record(
                    FLEX,
                    seed,
                    [*METHODS[FLEX], f"selection.strategy={strategy}", "feature.tokens=head"],
                    strategy,
                    self.who["hidden"],
                    "head",
                )
        if self.who["ablation"] == "random":
            # Debian's evidence: the last layer's task gradient sits wholly at the response positions, under a
            # tenth of the tokens the default loss aligns. Run after the main runs so a cut-short cell keeps them.
            for seed in self.args.seeds:
                record(
                    FLEX,
                    seed,
                    [*METHODS[FLEX], "feature.tokens=head"],
                    "gradient",
                    self.who["hidden"],
                    "head",
                )
        return results


def feature_curve(folder: Path) -> list[tuple[int, float]]:
    """(step, train/loss_feat) from the run's metrics.jsonl."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["train/loss_feat"]) for r in rows if "train/loss_feat" in r]


def converged(curve: list[tuple[int, float]]) -> float:
    """Relative change of the feature loss over the last fifth of training (mean of the last two tenths):
    near 0 when the term has flattened out; NaN without a curve."""
    if len(curve) < 10:
        return float("nan")
    values = [v for _, v in curve]
    tenth = max(len(values) // 10, 1)
    late, last = statistics.mean(values[-2 * tenth : -tenth]), statistics.mean(values[-tenth:])
    return (last - late) / abs(late) if late else float("nan")


UNSEEN = "unseen test rows"  # the metric on the test rows whose input no training row has
UNSEEN_DIFF = "Flex-KD − this, unseen"
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """Mean of the paired differences a - b and the half-width of its 95% t-interval over the pairs."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n < 2:
        return (diffs[0] if diffs else float("nan")), float("nan"), n
    return statistics.mean(diffs), T95.get(n - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(n), n


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"  # one seed: no spread to quote
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarise(cell: Cell, results: dict) -> dict:
    metric = f"test/{cell.metric}"
    runs = results["runs"]

    unseen = f"test_unseen/{cell.metric}"

    def by_seed(method, strategy="gradient", k=None, tokens="all", key=metric) -> dict[int, float]:
        k = k or cell.who["hidden"]
        return {
            r["seed"]: r[key]
            for r in runs
            if r["method"] == method
            and r["strategy"] == strategy
            and r["k"] == k
            and r["tokens"] == tokens
            and key in r
        }

    def paired(a: dict[int, float], b: dict[int, float]) -> str:
        seeds = sorted(set(a) & set(b))
        d, h, n = paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
        return f"{d:+.4f} ± {h:.4f}" if n > 1 else (f"{d:+.4f}" if n else "")

    main = []
    flex, flex_unseen = by_seed(FLEX), by_seed(FLEX, key=unseen)
    has_unseen = any(unseen in r for r in runs)
    for method in METHODS:
        scores = by_seed(method)
        row = {
            "method": method,
            "lr": results["lr"][method],
            "seeds": len(scores),
            cell.metric: _mean_std(list(scores.values())),
        }
        if has_unseen:
            row[UNSEEN] = _mean_std(list(by_seed(method, key=unseen).values()))
            if method != FLEX:
                row[UNSEEN_DIFF] = paired(flex_unseen, by_seed(method, key=unseen))
        mine = [
            r
            for r in runs
            if r["method"] == method
            and r["strategy"] == "gradient"
            and r["tokens"] == "all"
            and r["k"] == cell.who["hidden"]
        ]
        row["wall s/run"] = f"{statistics.mean(r['wall_s'] for r in mine):.0f}" if mine else ""
        if method != "SFT" and method != "logit KD":
            conv = [converged(r["curve"]) for r in mine]
            row["feat. loss start→end"] = (
                f"{mine[0]['curve'][0][1]:.3f}→{mine[0]['curve'][-1][1]:.3f}"
                if mine and mine[0]["curve"]
                else ""
            )
            row["last-fifth change"] = (
                f"{statistics.mean(conv):+.1%}" if conv and not any(map(math.isnan, conv)) else ""
            )
        if method != FLEX:
            seeds = sorted(set(flex) & set(scores))
            d, h, n = paired_interval([flex[s] for s in seeds], [scores[s] for s in seeds])
            row["Flex-KD − this (95% CI)"] = f"{d:+.4f} ± {h:.4f}" if n > 1 else (f"{d:+.4f}" if n else "")
            row["_diff"], row["_half"] = d, h
        row["_scores"] = scores
        row["_unseen"] = by_seed(method, key=unseen)
        main.append(row)
    ablation = []
    if cell.who["ablation"]:
        variants = [(s, k, "all") for k in (cell.who["hidden"], cell.args.small_k) for s in STRATEGIES]
        variants += [("gradient", cell.who["hidden"], "head"), ("random", cell.who["hidden"], "head")]
        for strategy, k, tokens in variants:
            scores = by_seed(FLEX, strategy, k, tokens)
            if not scores:
                continue
            row = {
                "selection": strategy,
                "k": k,
                "tokens": tokens,
                "seeds": len(scores),
                cell.metric: _mean_std(list(scores.values())),
            }
            if has_unseen:
                row[UNSEEN] = _mean_std(list(by_seed(FLEX, strategy, k, tokens, unseen).values()))
            ref = by_seed(FLEX, "random", k, tokens)
            if strategy != "random" and ref:
                seeds = sorted(set(ref) & set(scores))
                d, h, n = paired_interval([scores[s] for s in seeds], [ref[s] for s in seeds])
                row["this − random (95% CI)"] = f"{d:+.4f} ± {h:.4f}" if n > 1 else f"{d:+.4f}"
            row["_scores"] = scores
            ablation.append(row)
    return {"main": main, "ablation": ablation}


def teacher_line(root: Path, metric: str) -> dict:
    path = root / "teacher-test.json"
    if not path.exists():
        return {}
    m = json.loads(path.read_text())
    wall = root / "teacher" / "wall.json"
    out = {k: m[k] for k in m if k.startswith("test/")}
    unseen = root / "teacher-test-unseen.json"
    if unseen.exists():
        out.update(json.loads(unseen.read_text()))
    out["wall_s"] = json.loads(wall.read_text())["wall_s"] if wall.exists() else float("nan")
    done = root / "signals.done"
    if done.exists():
        out["signals_wall_s"] = json.loads(done.read_text())["wall_s"]
    return out


def kept_cells(path: Path, cells: list[Cell], out: Path, args) -> tuple[list[Cell], dict, dict]:
    """The cells of an earlier science.json that this invocation does not run: their Cell, their results
    (the learning rates each method won and every run's metrics, as that report stored them) and their
    teachers' lines, so that one report and one plot cover cells run on different days or machines."""
    stored = json.loads(path.read_text())
    here = {f"{c.task}:{c.student}" for c in cells}
    kept, results, teachers = [], {}, {}
    for key, cell in stored["cells"].items():
        if key in here:
            continue
        c = Cell(*parse_cell(key), out, args)
        c.lrs = cell.get("lrs", STUDENTS[c.student]["lrs"])  # what it swept, not this invocation's --lrs
        kept.append(c)
        lr = {row["method"]: row["lr"] for row in cell["summary"]["main"]}
        results[key] = {"lr": lr, "runs": cell["runs"], "kept_from": f"{path} ({stored.get('time', '?')})"}
        # The teacher the cell ran with: a teacher fine-tuned again since (same settings) is another model.
        teachers[key] = cell.get("teacher") or stored["teachers"].get(key.split(":")[0], {})
    return kept, results, teachers


def report(cells: list[Cell], cell_results: dict, out: Path, kept_teachers: dict | None = None) -> dict:
    print(f"# Flex-KD vs baselines, seeds {cells[0].args.seeds}; {machine()}")
    payload = {"cells": {}, "teachers": {}, "settings": {k: v for k, v in vars(cells[0].args).items()}}
    for cell in cells:
        key = f"{cell.task}:{cell.student}"
        results = cell_results[key]
        kept_t = (kept_teachers or {}).get(key) if "kept_from" in results else None
        t = kept_t if kept_t is not None else teacher_line(cell.root, cell.metric)
        payload["teachers"][cell.task] = t
        s = summarise(cell, results)
        payload["cells"][key] = {
            "summary": s,
            "runs": [{k: v for k, v in r.items()} for r in results["runs"]],
            "lrs": cell.lrs,
            "teacher": t,
            **({"kept_from": results["kept_from"]} if "kept_from" in results else {}),
        }
        tline = ", ".join(
            f"{k} {v:.4f}" for k, v in t.items() if isinstance(v, float) and not k.endswith("wall_s")
        )
        print(
            f"\n## {cell.task} : {cell.student} (hidden {cell.who['hidden']}, {cell.steps} steps of batch 16)"
        )
        spent = [
            f"{t['wall_s'] / 60:.1f} min to fine-tune" if t and not math.isnan(t["wall_s"]) else "",
            f"{t['signals_wall_s'] / 60:.1f} min to store its signals" if "signals_wall_s" in t else "",
        ]
        spent = ", ".join(x for x in spent if x)
        print(f"teacher: {tline or 'not trained yet'}" + (f" ({spent})" if spent else ""))
        if "kept_from" in results:
            print(f"(runs kept from {results['kept_from']}; not rerun by this invocation)")
        cols = [
            "method",
            "lr",
            "seeds",
            cell.metric,
            "Flex-KD − this (95% CI)",
            *([UNSEEN, UNSEEN_DIFF] if any(UNSEEN in r for r in s["main"]) else []),
            "feat. loss start→end",
            "last-fifth change",
            "wall s/run",
        ]
        print(table(s["main"], cols))
        walls = [r["wall_s"] for r in results["runs"] if not math.isnan(r["wall_s"])]
        sweep = len(list((cell.folder / "runs").glob("*-s0"))) if (cell.folder / "runs").exists() else 0
        print(
            f"{len(results['runs'])} runs reported"
            + ("" if "kept_from" in results else f" ({sweep} on seed 0, the lr sweep's included)")
            + f", {sum(walls) / 60:.1f} min of runs in the table; lr swept over {cell.lrs} on val/{cell.metric}"
        )
        if s["ablation"]:
            print("\n### Flex-KD + KD: which teacher units, how many, which positions")
            print(
                table(
                    s["ablation"],
                    ["selection", "k", "tokens", "seeds", cell.metric, "this − random (95% CI)"]
                    + ([UNSEEN] if any(UNSEEN in r for r in s["ablation"]) else []),
                )
            )
    if any(cell_results[f"{c.task}:{c.student}"]["runs"] for c in cells):
        plot(cells, payload, out / "science.png")
    write_json(str(out / "science.json"), payload)
    return payload


def seeds_and_mean(ax, rows: list[dict], key: str = "_scores") -> None:
    """Row i at x = i: one dot per seed, and beside them the mean with a bar of one std."""
    ax.set_xlim(-0.5, len(rows) - 0.5)
    for i, row in enumerate(rows):
        seeds = list(row.get(key, {}).values())
        if not seeds:
            ax.annotate(
                "not run",
                (i, 0.5),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="center",
                rotation=90,
                c="gray",
            )
        if seeds:
            ax.scatter([i] * len(seeds), seeds, s=14, alpha=0.5, color="C0")
            sd = statistics.stdev(seeds) if len(seeds) > 1 else 0.0
            ax.errorbar(i + 0.15, statistics.mean(seeds), yerr=sd, fmt="o", color="C3", capsize=4)


def plot(cells: list[Cell], payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(cells), figsize=(5.2 * len(cells), 12), squeeze=False)
    for j, cell in enumerate(cells):
        key = f"{cell.task}:{cell.student}"
        s = payload["cells"][key]["summary"]
        ax = axes[0, j]
        # A task whose test split is mostly repeats of training rows is plotted on its unseen rows.
        split = "test_unseen" if cell.spec.get("plot_unseen") else "test"
        seeds_and_mean(ax, s["main"], "_unseen" if split == "test_unseen" else "_scores")
        teacher = payload["cells"][key]["teacher"].get(f"{split}/{cell.metric}")
        if teacher is not None:
            ax.axhline(teacher, ls="--", c="gray", label=f"teacher {teacher:.3f}")
            ax.legend(loc="best")
        ax.set_xticks(range(len(METHODS)), list(METHODS), rotation=30, ha="right")
        seeds = max(len(r["_scores"]) for r in s["main"])
        ax.set_title(
            f"{cell.task}: {cell.student} (hidden {cell.who['hidden']}, {seeds} seed{'s' * (seeds != 1)})"
        )
        where = "test rows no training row asks" if split == "test_unseen" else "test"
        ax.set_ylabel(f"{cell.metric}, {where}\n(dots: seeds; red: mean ± std)")
        ax = axes[1, j]
        if s["ablation"]:
            labels = [
                f"{r['selection']} k={r['k']}" + (", head positions only" if r["tokens"] == "head" else "")
                for r in s["ablation"]
            ]
            seeds_and_mean(ax, s["ablation"])
            ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30, ha="right")
            ax.set_title("Flex-KD + KD: which units, how many, where")
            ax.set_ylabel(f"test {cell.metric}")
        else:
            ax.set_axis_off()
        ax = axes[2, j]
        for r in payload["cells"][key]["runs"]:
            main_variant = (
                r["strategy"] == "gradient" and r["tokens"] == "all" and r["k"] == cell.who["hidden"]
            )
            if r["seed"] == 0 and r["curve"] and main_variant:
                steps, values = zip(*r["curve"])
                # Each method's own loss on its own scale: divided by its first logged value to compare shapes.
                ax.plot(
                    steps, [v / values[0] for v in values], label=f"{r['method']} ({values[0]:.3g} at start)"
                )
        ax.set_xlabel("step")
        ax.set_ylabel("train/loss_feat / its first value (seed 0)")
        ax.set_title("feature term: has it converged?")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--out", default="bench-science", help="folder for teachers, signals, runs, logs, JSON, plot"
    )
    parser.add_argument(
        "--cells",
        nargs="+",
        default=["imdb:narrow", "spam:narrow", "chatterbot:fresh"],
        help="TASK:STUDENT, run in this order",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lrs", type=float, nargs="+", help="learning rates of the per-method sweep (default: per student)"
    )
    parser.add_argument("--steps", type=int, default=0, help="student steps (default: per student)")
    parser.add_argument(
        "--small-k", type=int, default=16, help="the 'k well below the student hidden size' of the ablation"
    )
    parser.add_argument(
        "--small-k-strategies",
        nargs="+",
        default=["gradient", "random"],
        choices=STRATEGIES,
        help="selections run at --small-k (at k = the student hidden size all four run)",
    )
    parser.add_argument(
        "--report", action="store_true", help="only print the tables and plot from finished runs"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="an earlier science.json: its cells that --cells does not name join the report and plot as stored",
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = [Cell(*parse_cell(text), out, args) for text in args.cells]
    for cell in cells:
        missing = [
            o.split("=", 1)[1]
            for o in cell.spec["overrides"]
            if o.startswith(("data.source=", "teacher.base="))
        ]
        missing = [m for m in missing if not Path(m).exists()]
        if missing:
            sys.exit(f"{missing[0]} is missing: run ../shared/assets/fetch.sh {ASSETS}")
    kept, results, kept_teachers = kept_cells(args.keep, cells, out, args) if args.keep else ([], {}, {})
    for cell in cells:
        results[f"{cell.task}:{cell.student}"] = cell.execute()
    report(kept + cells, results, out, kept_teachers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
