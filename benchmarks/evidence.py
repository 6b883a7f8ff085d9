"""Why does (or doesn't) gradient selection beat random units? Evidence from a finished science.py cell.

For one cell of `benchmarks/science.py` (default imdb:narrow; a generation cell such as debian:fresh works
too) it measures, on the fine-tuned teacher and the validation rows, with "the head's positions" meaning
position 0 for a classifier (its head reads nothing else) and the response positions for a causal LM (the
positions whose logits enter the loss):

1. where the task gradient is non-zero: the share of the squared gradient of the teacher's task loss with
   respect to each hidden layer that sits at the head's positions;
2. how concentrated the gradient scores are (selection.json of the Flex-KD run): the share of the total score
   in the top k units, what a random k would hold (k / d), and the largest score over the median;
3. which units the task uses: each last-layer unit's importance as the rise of the teacher's validation loss
   when that unit is replaced at the head's positions by its mean, passed through the teacher's own head
   (a causal LM's output layer, exactly, as a rank-one change of its logits), against the gradient scores
   (Spearman), and the share of the total importance each selection (gradient, variance, first, random)
   holds;
4. the per-unit correlation the students reached: for the Flex-KD runs of seed 0 at the chosen learning
   rate, the Pearson correlation of each aligned student dim with its teacher unit on validation rows, over
   every position and over the head's positions alone.

    python benchmarks/evidence.py --out bench-science --cell imdb:narrow
    python benchmarks/evidence.py --out bench-science --cell debian:fresh --ablation-examples 96
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import science  # noqa: E402
import torch  # noqa: E402
from common import table, write_json  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def pearson_per_unit(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(k,) Pearson correlation of column j of s with column j of t, over the rows."""
    s = s.double() - s.double().mean(0)
    t = t.double() - t.double().mean(0)
    return (s * t).sum(0) / (s.norm(dim=0) * t.norm(dim=0)).clamp_min(1e-12)


def _lr(folder: Path) -> str:
    return folder.name.split("-lr")[1].split("-s")[0]


def chosen_run(runs: Path, flex: list[Path], metric: str) -> Path:
    """The seed-0 Flex-KD + KD run at the lr the sweep chose, the one the cell's table reports: science.py runs
    the later seeds and the selection ablation only at that lr; before they exist, the best validation score
    (ties to the smaller lr, as the sweep breaks them on its ascending grid)."""
    later = {_lr(p) for p in runs.glob("Flex-KD_KD-lr*-s[1-9]*")}
    later |= {_lr(p) for p in runs.glob("Flex-KD_KD-random-*-s0")}
    picked = [p for p in flex if _lr(p) in later]
    if picked:
        return picked[0]
    scored = [
        (p, json.loads((p / "metrics.json").read_text())) for p in flex if (p / "metrics.json").exists()
    ]
    if not scored:
        return flex[0]
    return max(scored, key=lambda pm: (pm[1].get(f"val/{metric}", -math.inf), -float(_lr(pm[0]))))[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-science")
    parser.add_argument("--cell", default="imdb:narrow")
    parser.add_argument("--examples", type=int, default=256, help="validation rows measured")
    parser.add_argument(
        "--ablation-examples",
        type=int,
        default=0,
        help="rows of part 3 (0: --examples); a causal LM's ablation costs d x positions x vocab",
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    task, student = science.parse_cell(args.cell)
    metric = science.TASKS[task]["metric"]

    from flexkd.config import load_config
    from flexkd.selection import load_selection
    from flexkd.workbench import open_workbench

    runs = out / task / student / "runs"
    flex = sorted(p for p in runs.glob("Flex-KD_KD-lr*-s0") if (p / "selection.json").exists())
    if not flex:
        sys.exit(
            f"{runs}: no finished Flex-KD + KD run on seed 0 yet (run benchmarks/science.py --cells {args.cell})"
        )
    run = chosen_run(runs, flex, metric)
    lr = _lr(run)
    cfg = load_config(str(run / "config.yaml"), ["signals.mode=live"])
    bench = open_workbench(cfg, need_teacher=True)
    teacher = bench.teacher.eval()
    rows = bench.data.val[: args.examples]
    examples = bench.encode_rows(rows)
    torch.manual_seed(0)
    report: dict = {"cell": args.cell, "run": run.name, "examples": len(rows)}

    # 1. Where the task gradient is.
    from flexkd.data import IGNORE
    from flexkd.losses import task_loss
    from flexkd.objective import feature_positions
    from flexkd.scoring import task_gradients

    causal = cfg.data.task != "classification"
    where = "the response positions" if causal else "position 0"
    layers = list(range(1, teacher.config.num_hidden_layers + 1))
    share = torch.zeros(len(layers) + 1, dtype=torch.float64)
    total = torch.zeros(len(layers) + 1, dtype=torch.float64)
    head_hidden, labels = [], []  # the last layer at the head's positions, and what the head must predict
    ablated_rows = args.ablation_examples or len(examples)
    for i in range(0, len(examples), 16):
        batch = bench.batch(examples[i : i + 16])
        hidden, grads = task_gradients(teacher, batch, layers)
        attn = batch.get("teacher_attention_mask", batch["attention_mask"])
        at_head = feature_positions("head", attn, batch["labels"] != IGNORE).unsqueeze(-1)
        for layer, g in zip(layers, grads):
            if g is not None:
                g = g.double() ** 2
                share[layer] += (g * at_head).sum()
                total[layer] += g.sum()
        if i < ablated_rows:
            if causal:  # (M, d) rows and (M,) next tokens
                head_hidden.append(hidden[-1][at_head.squeeze(-1)].detach())
                labels.append(batch["labels"][at_head.squeeze(-1)])
            else:  # (N, 1, d): what the classifier head reads
                head_hidden.append(hidden[-1][:, :1].detach())
                labels.append(batch["labels"])
    at_head_share = (share[1:] / total[1:].clamp_min(1e-300)).tolist()
    report["head_positions"] = where
    report["gradient_share_at_head_positions"] = {
        str(layer): v for layer, v in enumerate(at_head_share, start=1)
    }
    print(
        f"# evidence: {args.cell}, teacher {cfg.teacher.path}, {len(rows)} validation rows; Flex-KD run {run.name}"
    )
    print(f"\n## 1. share of the task gradient's squared norm at {where}, per teacher layer")
    print(
        table(
            [
                {"layer": layer, f"share at {where}": f"{v:.4f}"}
                for layer, v in enumerate(at_head_share, start=1)
            ],
            ["layer", f"share at {where}"],
        )
    )

    # 2. Score concentration.
    # The deepest aligned pair (feature.layers=last: the only one).
    sel = load_selection(run / "selection.json")[0][-1]
    scores = torch.tensor(sel.scores, dtype=torch.float64)
    d, k = scores.numel(), sel.k
    order = scores.argsort(descending=True)
    conc = {
        "d": d,
        "k": k,
        "top_k_share": float(scores[order[:k]].sum() / scores.sum()),
        "random_k_share": k / d,
        "top_half_share": float(scores[order[: d // 2]].sum() / scores.sum()),
        "max_over_median": float(scores.max() / scores.median()),
    }
    report["score_concentration"] = conc
    print("\n## 2. how concentrated the gradient scores are")
    print(table([{k_: (f"{v:.4f}" if isinstance(v, float) else v) for k_, v in conc.items()}], list(conc)))

    # 3. Which units the task uses: mean-ablation at the head's positions through the teacher's own head.
    h0 = torch.cat(head_hidden).detach()  # (N, 1, d) for a classifier, (M, d) for a causal LM
    y = torch.cat(labels)
    with torch.no_grad():
        importance = torch.empty(d, dtype=torch.float64)
        if causal:
            # hidden_states[-1] of a causal LM is what its output layer reads (after the final norm), so
            # replacing unit j by its mean changes the logits by (mean_j - h_j) times column j of the
            # output weights: a rank-one update, exact, without rerunning the layer per unit.
            out_layer = teacher.get_output_embeddings()
            logits = out_layer(h0)
            base = float(task_loss(logits, y))
            mean = h0.mean(0)
            for unit in range(d):
                shift = (mean[unit] - h0[:, unit]).unsqueeze(-1) * out_layer.weight[:, unit]
                importance[unit] = float(task_loss(logits + shift, y)) - base
        else:
            head = teacher.classifier
            base = float(task_loss(head(h0), y))
            mean = h0.mean(0, keepdim=True)
            for unit in range(d):
                h = h0.clone()
                h[:, :, unit] = mean[:, :, unit]
                importance[unit] = float(task_loss(head(h), y)) - base
    used = importance.clamp_min(0)
    picks = {"gradient": order[:k]}
    selections = sorted(
        p for p in runs.glob(f"Flex-KD_KD-*-k{k}-all-lr{lr}-s0") if (p / "selection.json").exists()
    )
    for p in selections:
        other = load_selection(p / "selection.json")[0][-1]
        picks[other.strategy] = torch.tensor(other.indices)
    imp = {
        name: {
            "importance_share": float(used[idx].sum() / used.sum()),
            "overlap_with_gradient": len(set(idx.tolist()) & set(picks["gradient"].tolist())) / k,
        }
        for name, idx in picks.items()
    }
    # What any k units drawn at random hold on average, whether or not a random run exists to read.
    imp.setdefault("random", {"importance_share": k / d, "overlap_with_gradient": k / d, "expected": True})
    top_imp = importance.argsort(descending=True)[:k]
    report["task_use"] = {
        "base_val_loss": base,
        "spearman_score_vs_importance": spearman(scores, importance),
        "best_possible_share": float(used[top_imp].sum() / used.sum()),
        "by_selection": imp,
    }
    print(f"\n## 3. which units the head uses: mean-ablation at {where} (val loss {base:.4f} intact)")
    print(
        f"Spearman(gradient score, ablation importance) = {report['task_use']['spearman_score_vs_importance']:.3f};"
        f" the {k} most important units hold {report['task_use']['best_possible_share']:.1%} of the importance"
    )
    print(
        table(
            [
                {
                    "selection": n + (" (expected, k/d)" if v.get("expected") else ""),
                    "importance held": f"{v['importance_share']:.1%}",
                    "overlap with gradient": f"{v['overlap_with_gradient']:.1%}",
                }
                for n, v in imp.items()
            ],
            ["selection", "importance held", "overlap with gradient"],
        )
    )

    # 4. Per-unit correlation reached by the students.
    from flexkd.models import model_class

    teacher_hidden: dict[int, list[torch.Tensor]] = {}  # the teacher's states per layer, once per batch

    def teacher_states(layer: int) -> list[torch.Tensor]:
        if layer not in teacher_hidden:
            with torch.no_grad():
                teacher_hidden[layer] = [
                    teacher(
                        input_ids=b.get("teacher_input_ids", b["input_ids"]),
                        attention_mask=b.get("teacher_attention_mask", b["attention_mask"]),
                        output_hidden_states=True,
                    ).hidden_states[layer]
                    for b in batches
                ]
        return teacher_hidden[layer]

    batches = [bench.batch(examples[i : i + 32]) for i in range(0, len(examples), 32)]
    reached = []
    for p in sorted(runs.glob(f"Flex-KD_KD*-lr{lr}-s0")):
        if not (p / "student").exists() or not (p / "selection.json").exists():
            continue
        ps = load_selection(p / "selection.json")[0][-1]
        model = model_class(cfg.data.task).from_pretrained(p / "student").eval()
        units = torch.tensor(ps.indices)
        s_all, t_all, s0, t0 = [], [], [], []
        with torch.no_grad():
            for batch, th in zip(batches, teacher_states(ps.teacher_layer)):
                sh = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=True,
                ).hidden_states[ps.student_layer]
                mask = batch["attention_mask"].bool()
                at_head = feature_positions("head", batch["attention_mask"], batch["labels"] != IGNORE)
                s_all.append(sh[..., : ps.k][mask])
                t_all.append(th[..., units][mask])
                s0.append(sh[..., : ps.k][at_head])
                t0.append(th[..., units][at_head])
        r_all = pearson_per_unit(torch.cat(s_all), torch.cat(t_all))
        r_0 = pearson_per_unit(torch.cat(s0), torch.cat(t0))
        tokens = "head" if "-head-" in p.name else "all"
        metrics = json.loads((p / "metrics.json").read_text())
        reached.append(
            {
                "run": p.name,
                "selection": ps.strategy,
                "k": ps.k,
                "aligned": tokens,
                "mean r, every position": f"{float(r_all.mean()):.3f}",
                "mean r, head positions": f"{float(r_0.mean()):.3f}",
                f"test {metric}": f"{metrics[f'test/{metric}']:.4f}",
            }
        )
    report["correlation_reached"] = reached
    print("\n## 4. per-unit Pearson correlation the students reached on validation rows (seed 0)")
    print(
        table(
            reached,
            [
                "selection",
                "k",
                "aligned",
                "mean r, every position",
                "mean r, head positions",
                f"test {metric}",
            ],
        )
    )
    write_json(str(out / f"evidence-{task}-{student}.json"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
