"""What a student step costs under the loop's optimizer and precision choices, side by side in one run.

A run that trains from stored teacher signals spends its step on the student alone: forward (with hidden
states, as the feature term needs), loss, backward, AdamW. This times that step for AdamW's per-tensor loop
(torch's default on CPU), its foreach and fused kernels (the loop uses fused), each in fp32 and under bf16
autocast (run.precision=bf16), interleaved so a noisy machine slows every setting alike. It also checks that
the fused kernel moves the weights as the per-tensor loop does: the largest weight difference after the
timed steps, from the same start and batches (fp32).

    python benchmarks/cpu_step.py                       # paraphrase-MiniLM-L3-v2 from fetch.sh, batch 16 x 128
    python benchmarks/cpu_step.py --student tiny        # no assets needed
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ASSETS, machine, median, table, write_json  # noqa: E402

STUDENTS = {
    "tiny": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "minilm3": "models/paraphrase-MiniLM-L3-v2",
    "minilm6": "models/all-MiniLM-L6-v2",
}
SETTINGS = [  # (optimizer kernel, precision); the first is the baseline of the ratio column
    ("per-tensor", "fp32"),
    ("foreach", "fp32"),
    ("fused", "fp32"),
    ("per-tensor", "bf16"),
    ("fused", "bf16"),
]


def build_student(name: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = STUDENTS[name]
    if isinstance(spec, dict):
        fields = dict(spec)
        conf = AutoConfig.for_model(
            fields.pop("model_type"), vocab_size=30522, num_labels=2, intermediate_size=256, **fields
        )
        return AutoModelForSequenceClassification.from_config(conf)
    path = ASSETS / spec
    if not path.exists():
        sys.exit(f"{path} is missing: run ../shared/assets/fetch.sh {ASSETS} (or set FLEXKD_ASSETS)")
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def make_optimizer(model, kernel: str):
    import torch

    flags = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kernel]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **flags)


def run(student: str, batch_size: int, seq_len: int, repeats: int, warmup: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = build_student(student)
    batches = [
        (torch.randint(1000, 30000, (batch_size, seq_len)), torch.randint(0, 2, (batch_size,)))
        for _ in range(4)
    ]
    setups = {}
    for kernel, precision in SETTINGS:
        model = copy.deepcopy(base).train()
        setups[(kernel, precision)] = (model, make_optimizer(model, kernel))

    def step(key, i: int) -> float:
        model, optimizer = setups[key]
        ids, labels = batches[i % len(batches)]
        torch.manual_seed(i)  # the same dropout masks for every setting at step i
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=key[1] == "bf16")
        start = time.perf_counter()
        with autocast:
            out = model(input_ids=ids, labels=labels, output_hidden_states=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {key: [] for key in setups}
    for i in range(warmup + repeats):
        for key in setups:  # interleaved
            seconds = step(key, i)
            if i >= warmup:
                times[key].append(seconds)
    baseline = median(times[SETTINGS[0]])
    reference = dict(setups[("per-tensor", "fp32")][0].named_parameters())
    rows = []
    for key in setups:
        t = median(times[key])
        drift = float("nan")
        if key[1] == "fp32":
            drift = max(
                float((p.detach() - reference[n].detach()).abs().max())
                for n, p in setups[key][0].named_parameters()
            )
        rows.append(
            {
                "AdamW": key[0],
                "precision": key[1],
                "median step s": t,
                "tokens/s": batch_size * seq_len / t,
                "x per-tensor fp32": t / baseline,
                "max weight diff vs per-tensor": drift,
            }
        )
    return {
        "student": student,
        "params": sum(p.numel() for p in base.parameters()),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "raw_seconds": {f"{k[0]}/{k[1]}": v for k, v in times.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--student", default="minilm3", choices=sorted(STUDENTS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    result = run(args.student, args.batch_size, args.seq_len, args.repeats, args.warmup, args.threads)
    print(
        f"# student step: {args.student} ({result['params'] / 1e6:.1f}M parameters), batch {args.batch_size} x "
        f"{args.seq_len} tokens, {args.repeats} interleaved repeats, {result['threads']} threads\n# {machine()}"
    )
    columns = [
        "AdamW",
        "precision",
        "median step s",
        "tokens/s",
        "x per-tensor fp32",
        "max weight diff vs per-tensor",
    ]
    print(table(result["rows"], columns))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
