"""Scoring cost: one scoring pass against the training run it serves, and how it grows.

The scorer computes all four methods (grad, grad_token, taylor, fisher) and the activation moments in one
pass, so "per method" is one number. The training run is the preset's ``train.steps`` times the median
Flex-KD + KD step measured in the same process (benchmarks/step_cost.py), so the ratio holds on a noisy
machine. Goal: scoring <= 2% of training.

    python benchmarks/scoring_cost.py --pair tiny                 # seconds
    python benchmarks/scoring_cost.py --pair minilm6 --steps 500  # MPNet -> MiniLM-L6 (fetch.sh assets)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, table, write_json  # noqa: E402
from step_cost import build_pair, make_batch, run  # noqa: E402


def scoring_seconds(teacher, tok_t, tok_s, examples: int, batch_size: int, seq_len: int, device) -> float:
    import torch

    from flexkd.scoring import score_units

    batch = make_batch(tok_t, tok_s, batch_size, seq_len, device)
    batches = [batch] * -(-examples // batch_size)  # ceil: the last batch is whole here (an upper bound)
    dim = teacher.config.hidden_size
    start = time.perf_counter()
    score_units(teacher, batches, [teacher.config.num_hidden_layers], dim)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--pair", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300, help="train.steps of the run the scores serve")
    parser.add_argument("--examples", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device)
    step = run(
        args.pair,
        args.train_batch_size,
        args.seq_len,
        repeats=10,
        warmup=2,
        device_name=args.device,
        dtype_name="fp32",
        methods=["logit_kd", "flexkd+kd"],
    )
    step_s = next(r["median step s"] for r in step["rows"] if r["method"] == "flexkd+kd")
    training_s = step_s * args.steps
    teacher, _, tok_t, tok_s = build_pair(args.pair, device, torch.float32)

    def timed(examples, batch_size):
        return median(
            [
                scoring_seconds(teacher, tok_t, tok_s, examples, batch_size, args.seq_len, device)
                for _ in range(args.repeats)
            ]
        )

    default = timed(512, 8)
    rows = [
        {
            "what": "default: 512 examples, batch 8, all four methods in one pass",
            "scoring s": default,
            "% of training": 100 * default / training_s,
        }
    ]
    by_size = [{"examples": n, "batch": 8, "scoring s": timed(n, 8)} for n in args.examples]
    by_batch = [{"examples": 512, "batch": b, "scoring s": timed(512, b)} for b in args.batch_sizes]
    for r in by_size + by_batch:
        r["% of training"] = 100 * r["scoring s"] / training_s
    print(
        f"# scoring cost: {args.pair}, sequences of {args.seq_len} tokens; training = {args.steps} steps x "
        f"{step_s:.3f} s (median Flex-KD + KD step, batch {args.train_batch_size}) = {training_s:.1f} s\n# {machine()}"
    )
    print(table(rows, ["what", "scoring s", "% of training"]))
    print("\n# growth with the scoring set size")
    print(table(by_size, ["examples", "batch", "scoring s", "% of training"]))
    print("\n# growth with the scoring batch size")
    print(table(by_batch, ["examples", "batch", "scoring s", "% of training"]))
    write_json(
        args.json,
        {
            "pair": args.pair,
            "training_s": training_s,
            "step_s": step_s,
            "default": rows[0],
            "by_size": by_size,
            "by_batch": by_batch,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
