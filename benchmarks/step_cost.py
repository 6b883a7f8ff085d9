"""Step cost of SFT, logit KD, projector + KD and Flex-KD + KD, side by side on one teacher/student/batch.

Every method is one optimizer step of ``flexkd.objective.Objective`` (the loop's own loss code) on its own copy
of the same student. After warm-up the repeats are interleaved (one step of each method in turn), so a
noisy, shared machine slows every method alike; the table gives median step time, tokens/s, memory and
each method's ratio to logit KD. Goal: Flex-KD <= 1.03x logit KD, and no more memory than the projector.

Memory on CPU is what a step keeps for backward (the tensors autograd saves, counted as they are saved)
plus the trainable parameters, their gradients and the AdamW state; on CUDA it is the allocator's peak.

    python benchmarks/step_cost.py --pair tiny                  # seconds
    python benchmarks/step_cost.py --pair minilm6               # MPNet (768) -> MiniLM-L6 (384), from fetch.sh
    python benchmarks/step_cost.py --pair tiny --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ASSETS, machine, median, table, write_json  # noqa: E402

METHODS = {
    "sft": ["feature.loss=none", "kd.loss=none"],
    "logit_kd": ["feature.loss=none", "kd.loss=fkl"],
    "projector+kd": ["feature.loss=projector", "kd.loss=fkl"],
    "flexkd+kd": ["feature.loss=pearson", "kd.loss=fkl"],
}
PAIRS = {
    # name: (teacher, student); a dict is an architecture built from a config, a string a folder under ASSETS.
    "tiny": (
        {
            "model_type": "bert",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 128,
        },
        {
            "model_type": "bert",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    ),
    "small": (
        {
            "model_type": "bert",
            "hidden_size": 512,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "intermediate_size": 2048,
        },
        {
            "model_type": "bert",
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
        },
    ),
    "minilm6": ("models/all-mpnet-base-v2", "models/all-MiniLM-L6-v2"),
    "minilm3": ("models/all-mpnet-base-v2", "models/paraphrase-MiniLM-L3-v2"),
}


def tiny_classifier(spec: dict, seed: int, tok):
    """A fresh 2-class classifier of architecture ``spec`` over ``tok``'s vocabulary, seeded."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    fields = dict(spec)
    conf = AutoConfig.for_model(
        fields.pop("model_type"), vocab_size=len(tok), num_labels=2, pad_token_id=tok.pad_token_id, **fields
    )
    return AutoModelForSequenceClassification.from_config(conf)


def build_pair(name: str, device, dtype):
    """(teacher, student, teacher tokenizer, student tokenizer) for a pair name."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flexkd import demo
    from flexkd.models import freeze

    t_spec, s_spec = PAIRS[name]
    if isinstance(t_spec, dict):
        tok = demo.build_tokenizer("classification")

        def make(spec, seed):
            return tiny_classifier(spec, seed, tok)

        teacher, student, tok_t, tok_s = make(t_spec, 0), make(s_spec, 1), tok, tok
    else:
        t_path, s_path = ASSETS / t_spec, ASSETS / s_spec
        for path in (t_path, s_path):
            if not path.exists():
                sys.exit(f"{path} is missing: run ../shared/assets/fetch.sh {ASSETS} (or set FLEXKD_ASSETS)")
        teacher = AutoModelForSequenceClassification.from_pretrained(t_path, num_labels=2)
        student = AutoModelForSequenceClassification.from_pretrained(s_path, num_labels=2)
        tok_t, tok_s = AutoTokenizer.from_pretrained(t_path), AutoTokenizer.from_pretrained(s_path)
    return freeze(teacher.to(device, dtype)), student.to(device, dtype), tok_t, tok_s


def make_batch(tok_t, tok_s, batch_size: int, seq_len: int, device):
    """Real sentences (the demo's reviews, repeated to length), tokenized by both tokenizers."""
    import torch

    from flexkd import demo

    rows = demo.make_split("validation", "classification")[:batch_size]
    texts = [" ".join([r["text"]] * 20) for r in rows]
    s = tok_s(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    batch = {
        "input_ids": s["input_ids"],
        "attention_mask": s["attention_mask"],
        "labels": torch.tensor([int(r["label"] == "positive") for r in rows]),
    }
    if tok_t is not tok_s:
        t = tok_t(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
        batch["teacher_input_ids"], batch["teacher_attention_mask"] = t["input_ids"], t["attention_mask"]
    return {k: v.to(device) for k, v in batch.items()}


class SavedBytes:
    """Counts the bytes autograd saves for backward during a forward (a CPU stand-in for peak memory)."""

    def __init__(self):
        self.total = 0

    def __enter__(self):
        import torch

        self.total = 0

        def pack(t):
            self.total += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def run(
    pair: str,
    batch_size: int,
    seq_len: int,
    repeats: int,
    warmup: int,
    device_name: str,
    dtype_name: str,
    methods: list[str],
) -> dict:
    import torch

    from flexkd.config import load_config
    from flexkd.objective import Objective

    device = torch.device(device_name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    teacher, student0, tok_t, tok_s = build_pair(pair, device, dtype)
    batch = make_batch(tok_t, tok_s, batch_size, seq_len, device)
    d_t, d_s = teacher.config.hidden_size, student0.config.hidden_size
    tokens = int(batch["attention_mask"].sum())
    precision = "bf16" if dtype_name == "bf16" else "fp32"

    setups = {}
    for name in methods:
        cfg = load_config("demo", [*METHODS[name], f"run.precision={precision}", "teacher.path=/unused"])
        student = copy.deepcopy(student0).train()
        projector = None
        if cfg.feature.loss == "projector":
            projector = torch.nn.ModuleList([torch.nn.Linear(d_s, d_t)]).to(device, dtype)
        units = [torch.arange(min(d_s, d_t), device=device)] if cfg.feature.loss == "pearson" else [None]
        needs_teacher = cfg.kd.loss != "none" or cfg.feature.loss != "none"
        objective = Objective(cfg, teacher if needs_teacher else None, [(-1, -1)], units, projector, vocab=0)
        params = list(student.parameters()) + (list(projector.parameters()) if projector is not None else [])
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        setups[name] = (objective, student, params, optimizer)

    def step(name: str) -> tuple[float, int]:
        objective, student, params, optimizer = setups[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with SavedBytes() as saved:
            terms = objective(student, batch)
            loss = objective.total(terms)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers: they are part of the footprint
        if device.type == "cuda":
            torch.cuda.synchronize()
            memory = torch.cuda.max_memory_allocated()
        else:
            state = sum(
                t.numel() * t.element_size()
                for s in optimizer.state.values()
                for t in s.values()
                if torch.is_tensor(t)
            )
            weights = sum(p.numel() * p.element_size() for p in params)
            memory = saved.total + 2 * weights + state  # activations + parameters + gradients + AdamW state
        return time.perf_counter() - start, memory

    for _ in range(warmup):
        for name in methods:
            step(name)
    times = {name: [] for name in methods}
    memory = {}
    for _ in range(repeats):
        for name in methods:  # interleaved
            seconds, mem = step(name)
            times[name].append(seconds)
            memory[name] = mem
    base = median(times["logit_kd"]) if "logit_kd" in times else None
    rows = []
    for name in methods:
        t = median(times[name])
        rows.append(
            {
                "method": name,
                "median step s": t,
                "tokens/s": tokens / t,
                "x logit KD": t / base if base else float("nan"),
                "memory MiB": memory[name] / 2**20,
            }
        )
    return {
        "pair": pair,
        "teacher_hidden": d_t,
        "student_hidden": d_s,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": tokens,
        "repeats": repeats,
        "device": device_name,
        "dtype": dtype_name,
        "rows": rows,
        "raw_seconds": times,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--pair", default="tiny", choices=sorted(PAIRS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    result = run(
        args.pair,
        args.batch_size,
        args.seq_len,
        args.repeats,
        args.warmup,
        args.device,
        args.dtype,
        args.methods,
    )
    print(
        f"# step cost: {args.pair} (teacher hidden {result['teacher_hidden']}, student hidden "
        f"{result['student_hidden']}), batch {args.batch_size} x {args.seq_len} tokens, {args.repeats} interleaved "
        f"repeats, {args.device} {args.dtype}\n# {machine()}"
    )
    print(table(result["rows"], ["method", "median step s", "tokens/s", "x logit KD", "memory MiB"]))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
