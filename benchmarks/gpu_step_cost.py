"""GPU step cost of the four methods in bf16, with tokens/s and an MFU estimate. Needs only torch and
transformers (no Ray, no MLflow, no package registry): run it from a checkout on any CUDA box.

Same measurement as benchmarks/step_cost.py (interleaved repeats after warm-up, the loop's own Objective),
on BERT-style pairs built from configs. MFU counts the dense matmul FLOPs of a step: 6 x student
parameters x tokens (forward and backward) plus 2 x teacher parameters x tokens (teacher forward; SFT
skips it), over the card's dense bf16 peak (--peak-tflops; H100/H200 SXM: 989).

    python benchmarks/gpu_step_cost.py                 # exits with a message where there is no CUDA device
    python benchmarks/gpu_step_cost.py --pair small --batch-size 64 --seq-len 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--pair", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--peak-tflops", type=float, help="dense bf16 peak of the card (default: by its name)"
    )
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_step_cost: no CUDA device here; nothing to measure (benchmarks/step_cost.py runs on CPU)")
        return 0
    from common import machine, table, write_json
    from step_cost import PAIRS, run

    PAIRS.setdefault(
        "medium",
        (
            {
                "model_type": "bert",
                "hidden_size": 1024,
                "num_hidden_layers": 12,
                "num_attention_heads": 16,
                "intermediate_size": 4096,
            },
            {
                "model_type": "bert",
                "hidden_size": 512,
                "num_hidden_layers": 6,
                "num_attention_heads": 8,
                "intermediate_size": 2048,
            },
        ),
    )
    result = run(
        args.pair,
        args.batch_size,
        args.seq_len,
        args.repeats,
        args.warmup,
        "cuda",
        "bf16",
        ["sft", "logit_kd", "projector+kd", "flexkd+kd"],
    )
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    from step_cost import build_pair

    teacher, student, _, _ = build_pair(args.pair, torch.device("cuda"), torch.bfloat16)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    tokens = result["tokens_per_step"]
    for row in result["rows"]:
        flops = 6 * n_s * tokens + (0 if row["method"] == "sft" else 2 * n_t * tokens)
        row["TFLOP/s"] = flops / row["median step s"] / 1e12
        row["MFU %"] = 100 * row["TFLOP/s"] / peak if peak else float("nan")
    print(
        f"# GPU step cost: {args.pair} (teacher {n_t / 1e6:.0f}M, student {n_s / 1e6:.0f}M params), batch "
        f"{args.batch_size} x {args.seq_len}, bf16, {args.repeats} interleaved repeats; peak {peak} TFLOP/s\n# {machine()}"
    )
    print(
        table(
            result["rows"],
            ["method", "median step s", "tokens/s", "x logit KD", "memory MiB", "TFLOP/s", "MFU %"],
        )
    )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
