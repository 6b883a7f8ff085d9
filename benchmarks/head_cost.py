"""A causal LM's training step with its output layer on every position against on the loss positions only.

A generation task's losses read the logits at the response positions alone, but a model's forward computes
them at every position: (B, T, V) logits, their softmax and its backward, with V = 49,152 for SmolLM2's
vocabulary. `flexkd.losses.head_on_rows` runs the output layer on the loss positions only. This measures
one optimizer step of the task loss both ways on the same batch of real rows (Debian descriptions ->
synopsis from fetch.sh, else the demo's instruction task), after warm-up, the two interleaved, for the
students of the science benchmark's generation cells and for the teacher's own fine-tune:

    python benchmarks/head_cost.py                     # ~3 min on 2 CPUs
    python benchmarks/head_cost.py --models fresh-128 --repeats 20 --json benchmarks/results/head_cost.json

"whole" is the loop's step before this change (logits at every position, then the loss over the labelled
ones); "rows" is the loop's step now. Both give the same loss and gradients (tests/test_seams.py). Memory is
what autograd saves for backward (`step_cost.SavedBytes`) plus parameters, gradients and AdamW state.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ASSETS, machine, median, table, write_json  # noqa: E402
from step_cost import SavedBytes  # noqa: E402

SMOLLM = ASSETS / "models/SmolLM2-135M-Instruct"
DEBIAN = ASSETS / "data/debian_descriptions.jsonl"
# Fresh students are the science benchmark's (hidden 128, 4 layers) and a wider one; "smollm2" is the
# teacher itself, as `flexkd teacher` fine-tunes it.
MODELS = {
    "fresh-128": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "intermediate_size": 512,
    },
    "fresh-256": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    "smollm2": None,
}


def build(name: str, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if MODELS[name] is None:
        return AutoModelForCausalLM.from_pretrained(SMOLLM, dtype=torch.float32)
    base = AutoConfig.from_pretrained(SMOLLM)
    conf = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        num_key_value_heads=MODELS[name]["num_attention_heads"],
        tie_word_embeddings=base.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        **MODELS[name],
    )
    return AutoModelForCausalLM.from_config(conf)


def real_batch(batch_size: int, max_length: int):
    """(batch, tokenizer, where the rows came from): the first rows of Debian's descriptions, encoded as
    the loop encodes them (prompt template, response, EOS; labels shifted), right-padded."""
    from transformers import AutoTokenizer

    from flexkd.config import Data
    from flexkd.data import collate, encode

    tok = AutoTokenizer.from_pretrained(SMOLLM)
    if DEBIAN.exists():
        rows = [json.loads(line) for _, line in zip(range(batch_size), DEBIAN.open())]
        cfg = Data(task="summarization", max_length=max_length, max_response_length=24)
        source = f"{DEBIAN.name}, first {batch_size} rows"
    else:
        from flexkd import demo

        rows = demo.make_split("train", "instruction")[:batch_size]
        cfg = Data(task="instruction", max_length=max_length)
        source = "the demo's instruction rows"
    examples = [encode(r, tok, cfg, []) for r in rows]
    return collate(examples, pad_id=tok.pad_token_id), tok, source


def measure(name: str, batch: dict, tok, repeats: int, warmup: int) -> tuple[list[dict], dict]:
    """Table rows (whole, rows) for one model, and the raw step seconds."""
    import copy

    import torch

    from flexkd.config import load_config
    from flexkd.losses import task_loss
    from flexkd.objective import Objective

    cfg = load_config("demo-instruct", ["feature.loss=none", "kd.loss=none", "teacher.path=/unused"])
    objective = Objective(cfg, None, [], [], None, vocab=len(tok))
    model0 = build(name, tok).train()

    def whole(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return task_loss(out.logits, batch["labels"])

    def rows(model):
        return objective.total(objective(model, batch))

    variants = {"whole": whole, "rows": rows}
    setups = {}
    for variant in variants:
        model = copy.deepcopy(model0)
        setups[variant] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5))
    losses: dict[str, float] = {}

    def step(variant: str) -> tuple[float, int]:
        model, optimizer = setups[variant]
        start = time.perf_counter()
        with SavedBytes() as saved:
            loss = variants[variant](model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        seconds = time.perf_counter() - start
        losses.setdefault(variant, float(loss.detach()))  # the first step's loss, before any update
        state = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        return seconds, saved.total + 2 * weights + state

    for _ in range(warmup):
        for variant in variants:
            step(variant)
    times: dict[str, list[float]] = {v: [] for v in variants}
    memory = {}
    for _ in range(repeats):
        for variant in variants:  # interleaved: a noisy machine slows both alike
            seconds, memory[variant] = step(variant)
            times[variant].append(seconds)
    params = sum(p.numel() for p in model0.parameters())
    positions = int(batch["attention_mask"].numel())
    out = []
    for variant in variants:
        t = median(times[variant])
        out.append(
            {
                "model": name,
                "params": f"{params / 1e6:.1f}M",
                "head": variant,
                "median step s": t,
                "tokens/s": positions / t,
                "x whole": t / median(times["whole"]),
                "memory MiB": memory[variant] / 2**20,
                "first loss": losses[variant],
            }
        )
    return out, times


def run(models: list[str], batch_size: int, max_length: int, repeats: int, warmup: int) -> dict:
    from flexkd.data import IGNORE

    batch, tok, source = real_batch(batch_size, max_length)
    rows, raw = [], {}
    for name in models:
        more, raw[name] = measure(name, batch, tok, repeats, warmup)
        rows += more
    return {
        "source": source,
        "batch_size": batch_size,
        "max_length": max_length,
        "positions": int(batch["attention_mask"].numel()),
        "labelled_positions": int((batch["labels"] != IGNORE).sum()),
        "vocab": len(tok),
        "repeats": repeats,
        "rows": rows,
        "raw_seconds": raw,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not SMOLLM.exists():
        sys.exit(f"{SMOLLM} is missing: run ../shared/assets/fetch.sh {ASSETS} (or set FLEXKD_ASSETS)")
    result = run(args.models, args.batch_size, args.max_length, args.repeats, args.warmup)
    print(
        f"# output layer on every position (whole) vs on the loss positions (rows): {result['source']}, batch "
        f"{args.batch_size}, {result['positions']} positions of which {result['labelled_positions']} labelled, "
        f"vocab {result['vocab']}, {args.repeats} interleaved repeats\n# {machine()}"
    )
    cols = ["model", "params", "head", "median step s", "tokens/s", "x whole", "memory MiB", "first loss"]
    print(table(result["rows"], cols))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
