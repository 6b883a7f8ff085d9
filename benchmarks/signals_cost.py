"""Teacher signals: what caching the teacher saves per step, what the cache costs to build and store, and the
KD error of keeping only the top-k logits of a causal LM.

    python benchmarks/signals_cost.py step --pair minilm6      # Flex-KD + KD step, live teacher vs cached
    python benchmarks/signals_cost.py step --pair minilm3
    python benchmarks/signals_cost.py build                    # build time and bytes/token: demo, IMDB, causal LM
    python benchmarks/signals_cost.py topk                     # KD error of top-k vs full logits, k in 8 64 512

step: the loop's own ``Objective`` on one student, alternating (interleaved repeats) between a live teacher
and the same batch's signals read from a cache folder through ``SignalReader.gather``. Peak memory of the
trainer with and without the teacher is each mode's peak RSS in a fresh subprocess that runs a few steps
(the cached one never constructs the teacher).

build: ``tuning.signals.build`` (the Ray Data job ``flexkd signals`` runs) on the demo, on IMDB with MPNet
as teacher (the pretrained MPNet with a fresh classification head: size and time do not depend on its
fine-tuning) and on ChatterBot Q/A with SmolLM2-135M-Instruct as teacher (top-64 logits and full logits).

topk: SmolLM2-135M-Instruct as teacher and a fresh 4-layer Llama of hidden 192 with its tokenizer as
student, on ChatterBot Q/A rows: each KD loss with the top k teacher logits (k + 1 buckets) against the
full-vocabulary loss, and the cosine between the two gradients with respect to the student's logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ASSETS, machine, median, table, write_json  # noqa: E402

SMOLLM = "models/SmolLM2-135M-Instruct"
CHATTERBOT = "data/chatterbot_qa.jsonl"


def _require(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            sys.exit(f"{path} is missing: run ../shared/assets/fetch.sh {ASSETS} (or set FLEXKD_ASSETS)")


# ---------------------------------------------------------------------------------------------------------
# step: live vs cached


def _student_only(pair: str):
    """(None, student, teacher tokenizer, student tokenizer): what a trainer from cached signals loads."""
    from step_cost import PAIRS, tiny_classifier
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flexkd import demo

    t_spec, s_spec = PAIRS[pair]
    if isinstance(s_spec, dict):
        tok = demo.build_tokenizer("classification")
        return None, tiny_classifier(s_spec, 1, tok), tok, tok
    student = AutoModelForSequenceClassification.from_pretrained(ASSETS / s_spec, num_labels=2)
    tok_t, tok_s = (
        AutoTokenizer.from_pretrained(ASSETS / t_spec),
        AutoTokenizer.from_pretrained(ASSETS / s_spec),
    )
    return None, student, tok_t, tok_s


def _step_setup(pair: str, batch_size: int, seq_len: int, folder: Path, mode: str):
    """(objective pieces, student, batch, reader) for one pair. mode: "parent" (teacher and student; writes
    the batch's signals into ``folder``), "live" (teacher and student) or "cached" (student and reader: the
    teacher is never constructed)."""
    import json as _json

    import torch
    from step_cost import build_pair, make_batch

    from flexkd import signals as sig
    from flexkd.config import load_config

    with_teacher = mode != "cached"
    if with_teacher:
        teacher, student, tok_t, tok_s = build_pair(pair, torch.device("cpu"), torch.float32)
        teacher_layers = teacher.config.num_hidden_layers
    else:
        teacher, student, tok_t, tok_s = _student_only(pair)
        teacher_layers = _json.loads(Path(folder, "bench", sig.MANIFEST).read_text())["spec"]["layers"][0]
    batch = make_batch(tok_t, tok_s, batch_size, seq_len, torch.device("cpu"))
    cfg = load_config("demo", ["feature.loss=pearson", "kd.loss=fkl", "teacher.path=/unused"])
    layers = [teacher_layers]
    spec = sig.ShardSpec(layers, "float32", False, 0, [], 0, None)
    lengths = batch["attention_mask"].sum(1).tolist()
    examples = [
        {"index": i, "input_ids": batch["input_ids"][i, :n].tolist(), "labels": int(batch["labels"][i])}
        for i, n in enumerate(lengths)
    ]
    if mode == "parent":  # the cache is written once
        if "teacher_input_ids" in batch:
            for i, ex in enumerate(examples):
                ex["teacher_input_ids"] = batch["teacher_input_ids"][i, : lengths[i]].tolist()

        def batch_fn(chunk):
            from flexkd.data import collate

            pad_t = tok_t.pad_token_id if tok_t is not tok_s else None
            return collate(chunk, tok_s.pad_token_id, pad_t)

        tensors = sig.compute_shard(teacher, examples, spec, batch_fn, batch_size)
        data = sig.encode_shard(tensors)
        store = sig.Store(str(folder))
        store.write(data, "bench", sig.shard_name(0))
        sig.write_manifest(store, "bench", {}, spec, [sig.shard_record(0, data, tensors)], {})
    reader = None
    if mode != "live":
        reader = sig.SignalReader(str(folder / "bench"))  # memory-mapped: the first gather maps the shard
    d_s = student.config.hidden_size
    units = [torch.arange(d_s)]
    return cfg, layers, units, student, batch, reader, lengths, teacher


def step_memory(pair: str, batch_size: int, seq_len: int, folder: str, mode: str, steps: int) -> None:
    """Child process: a few optimizer steps in one mode, then print the peak RSS (MiB) as JSON."""
    import torch

    from flexkd.objective import Objective

    with_teacher = mode == "live"
    cfg, layers, units, student, batch, reader, lengths, teacher = _step_setup(
        pair, batch_size, seq_len, Path(folder), mode
    )
    student.train()
    objective = Objective(cfg, teacher, [(layers[0], -1)], units, None, vocab=0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    for _ in range(steps):
        b = dict(batch)
        if not with_teacher:
            b["signals"] = reader.gather(list(range(batch_size)), lengths, layers, 1.0, "cpu")
        objective.total(objective(student, b)).backward()
        optimizer.step()
        optimizer.zero_grad()
    print(json.dumps({"peak_rss_mib": _peak_rss_mib()}))


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space exec made, whereas
    getrusage's ru_maxrss survives exec and would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_step(pair: str, batch_size: int, seq_len: int, repeats: int, warmup: int) -> dict:
    import torch

    from flexkd.objective import Objective

    folder = Path(tempfile.mkdtemp(prefix="flexkd-bench-signals-"))
    cfg, layers, units, student0, batch, reader, lengths, teacher = _step_setup(
        pair, batch_size, seq_len, folder, "parent"
    )
    mapped = [(layers[0], -1)]
    modes = {}
    for mode in ("live", "cached"):
        student = copy.deepcopy(student0).train()
        objective = Objective(cfg, teacher if mode == "live" else None, mapped, units, None, vocab=0)
        modes[mode] = (objective, student, torch.optim.AdamW(student.parameters(), lr=1e-5))
    sft_cfg = copy.deepcopy(cfg)
    sft_cfg.kd.loss, sft_cfg.feature.loss = "none", "none"
    sft_student = copy.deepcopy(student0).train()
    modes["sft (no teacher term)"] = (
        Objective(sft_cfg, None, mapped, [None], None, vocab=0),
        sft_student,
        torch.optim.AdamW(sft_student.parameters(), lr=1e-5),
    )

    def step(mode: str) -> float:
        objective, student, optimizer = modes[mode]
        start = time.perf_counter()
        b = dict(batch)
        if mode == "cached":
            b["signals"] = reader.gather(list(range(batch_size)), lengths, layers, 1.0, "cpu")
        objective.total(objective(student, b)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return time.perf_counter() - start

    for _ in range(warmup):
        for mode in modes:
            step(mode)
    times = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            times[mode].append(step(mode))
    memory = {}
    for mode in ("live", "cached"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "step-memory",
                "--pair",
                pair,
                "--batch-size",
                str(batch_size),
                "--seq-len",
                str(seq_len),
                "--folder",
                str(folder),
                "--mode",
                mode,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    # Storage error: each loss term from bf16 / fp16 signals (the gathered tensors rounded as the shards
    # would store them) against the float32 ones, on this batch.
    import torch

    objective, student, _ = modes["cached"]
    exact = dict(batch, signals=reader.gather(list(range(batch_size)), lengths, layers, 1.0, "cpu"))
    student.eval()  # no dropout: the two forwards differ by the stored signals only
    with torch.no_grad():
        reference = {k: float(v) for k, v in objective(student, exact).items()}
    storage_error = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        rounded = exact["signals"]
        rounded = {
            "hidden": {k: v.to(dtype).float() for k, v in rounded["hidden"].items()},
            "rows": rounded["rows"].to(dtype).float(),
        }
        with torch.no_grad():
            got = {k: float(v) for k, v in objective(student, dict(batch, signals=rounded)).items()}
        storage_error[name] = {k: abs(got[k] - reference[k]) / abs(reference[k]) for k in reference}
    live = median(times["live"])
    tokens = int(batch["attention_mask"].sum())
    rows = [
        {
            "mode": mode,
            "median step s": median(times[mode]),
            "tokens/s": tokens / median(times[mode]),
            "x live": median(times[mode]) / live,
            "trainer peak RSS MiB": memory.get(mode, ""),
        }
        for mode in modes
    ]
    return {
        "pair": pair,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "rows": rows,
        "raw_seconds": times,
        "cached_over_live": median(times["cached"]) / live,
        "storage_relative_error": storage_error,
    }


# ---------------------------------------------------------------------------------------------------------
# build: time and bytes per token


BUILDS = {
    # name: (preset, overrides)
    "demo": ("demo", ["feature.layers=uniform:2"]),
    "imdb-mpnet": (
        "imdb-bert",
        [
            f"teacher.path={ASSETS / 'models/all-mpnet-base-v2'}",
            "teacher.base=",
            f"data.source={ASSETS / 'data/imdb_sentiment.jsonl'}",
            f"student.path={ASSETS / 'models/all-MiniLM-L6-v2'}",
            "data.max_train_examples=1000",
            "data.max_length=128",
            "data.test_size=0",
            "signals.batch_size=16",
        ],
    ),
    "chatterbot-smollm2-top64": (
        "demo-instruct",
        [
            f"teacher.path={ASSETS / SMOLLM}",
            "teacher.arch=",
            "teacher.tokenizer=",
            f"data.source={ASSETS / CHATTERBOT}",
            "data.val_split=",
            "data.test_split=",
            "data.val_size=200",
            "data.max_train_examples=1000",
            "data.max_length=64",
            "data.max_response_length=32",
            "student.arch={model_type: llama, hidden_size: 192, num_hidden_layers: 4, num_attention_heads: 3, num_key_value_heads: 3, intermediate_size: 512}",
            "feature.layers=-1:-1",
            "kd.top_k=64",
            "signals.batch_size=16",
        ],
    ),
}
BUILDS["chatterbot-smollm2-full"] = (
    BUILDS["chatterbot-smollm2-top64"][0],
    [o for o in BUILDS["chatterbot-smollm2-top64"][1] if not o.startswith("kd.top_k")] + ["kd.top_k=0"],
)


def run_build(names: list[str], root: str) -> list[dict]:
    from flexkd import signals as sig
    from flexkd.checks import preflight
    from flexkd.config import load_config
    from flexkd.runs import ensure_teacher
    from tuning.signals import build

    rows = []
    for name in names:
        preset, overrides = BUILDS[name]
        cfg = load_config(preset, [*overrides, f"signals.path={root}/{name}"])
        ensure_teacher(cfg, quiet=True)
        plan = preflight(cfg)
        for folder, _ in sig.manifests(sig.Store(cfg.signals.path)):  # measure a build, not a cache hit
            sig.Store(cfg.signals.path).delete(folder)
        started = time.perf_counter()
        manifest = build(cfg, plan, quiet=True, num_cpus=2)
        wall = time.perf_counter() - started
        sizes, spec = manifest["sizes"], manifest["spec"]
        item = 4 if spec["dtype"] == "float32" else 2
        hidden_bytes = sizes["tokens"] * len(spec["layers"]) * plan.teacher.hidden * item
        rows.append(
            {
                "signals": name,
                "examples": manifest["examples"],
                "tokens": sizes["tokens"],
                "layers": len(spec["layers"]),
                "logits": f"top-{spec['top_k']}" if spec["top_k"] else "all",
                "MB": sizes["bytes"] / 1e6,
                "B/token": sizes["bytes_per_token"],
                "logits B/token": (sizes["bytes"] - hidden_bytes) / sizes["tokens"],
                "logits B/position": (sizes["bytes"] - hidden_bytes) / sizes["positions"],
                "build s": manifest["build_s"],
                "wall s (with set-up)": wall,
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# topk: KD error against the full vocabulary


def run_topk(ks: list[int], examples: int, losses: list[str]) -> list[dict]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from flexkd.config import load_config
    from flexkd.data import IGNORE, collate, encode, load_task_data
    from flexkd.losses import kd_on_rows, top_k_logits

    teacher_path, data_path = ASSETS / SMOLLM, ASSETS / CHATTERBOT
    _require(teacher_path, data_path)
    tok = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    torch.manual_seed(0)
    conf = AutoConfig.from_pretrained(teacher_path)
    conf.update(
        {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3, "num_key_value_heads": 3}
    )
    conf.intermediate_size = 512
    student = AutoModelForCausalLM.from_config(conf).eval()
    cfg = load_config(
        "demo-instruct",
        [
            f"data.source={data_path}",
            "data.val_split=",
            "data.test_split=",
            "data.max_length=64",
            "data.max_response_length=32",
            "teacher.path=/unused",
        ],
    )
    rows_in = load_task_data(cfg.data).train[:examples]
    encoded = [encode(r, tok, cfg.data, []) for r in rows_in]
    batch = collate(encoded, tok.pad_token_id)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"] != IGNORE
    vocab = len(tok)
    t_rows, s_rows = t_logits[mask][..., :vocab], s_logits[mask][..., :vocab].detach()
    out = []
    for temperature in (1.0, 2.0):
        for name in losses:
            s_full = s_rows.clone().requires_grad_(True)
            full = kd_on_rows(name, s_full, t_rows, temperature)
            (g_full,) = torch.autograd.grad(full, s_full)
            for k in ks:
                s_k = s_rows.clone().requires_grad_(True)
                approx = kd_on_rows(name, s_k, top_k_logits(t_rows, k, temperature), temperature)
                (g_k,) = torch.autograd.grad(approx, s_k)
                cosine = torch.nn.functional.cosine_similarity(g_full.flatten(), g_k.flatten(), dim=0)
                mass = torch.softmax(t_rows / temperature, -1).topk(k, -1).values.sum(-1).mean()
                out.append(
                    {
                        "loss": name,
                        "T": temperature,
                        "k": k,
                        "teacher mass in top k": float(mass),
                        "full KD": float(full),
                        "top-k KD": float(approx),
                        "rel. error": float((approx - full) / full),
                        "grad cosine": float(cosine),
                    }
                )
    return out, int(mask.sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("step", help="Flex-KD + KD step, live vs cached")
    p.add_argument("--pair", default="minilm6", choices=["tiny", "small", "minilm6", "minilm3"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json")
    m = sub.add_parser("step-memory", help=argparse.SUPPRESS)
    m.add_argument("--pair")
    m.add_argument("--batch-size", type=int)
    m.add_argument("--seq-len", type=int)
    m.add_argument("--folder")
    m.add_argument("--mode")
    m.add_argument("--steps", type=int, default=3)
    b = sub.add_parser("build", help="build time and bytes/token")
    b.add_argument("--names", nargs="+", default=list(BUILDS), choices=list(BUILDS))
    b.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "flexkd-bench-signals"))
    b.add_argument("--json")
    t = sub.add_parser("topk", help="KD error of top-k logits")
    t.add_argument("--k", nargs="+", type=int, default=[8, 64, 512])
    t.add_argument("--examples", type=int, default=64)
    t.add_argument("--losses", nargs="+", default=["fkl", "rkl", "jsd"])
    t.add_argument("--json")
    args = parser.parse_args(argv)

    if args.what == "step-memory":
        step_memory(args.pair, args.batch_size, args.seq_len, args.folder, args.mode, args.steps)
        return 0
    if args.what == "step":
        if args.pair.startswith("minilm"):
            _require(ASSETS / "models/all-mpnet-base-v2")
        result = run_step(args.pair, args.batch_size, args.seq_len, args.repeats, args.warmup)
        print(
            f"# Flex-KD + KD step, live teacher vs cached signals: {args.pair}, batch {args.batch_size} x "
            f"{args.seq_len} tokens, {args.repeats} interleaved repeats\n# {machine()}"
        )
        print(table(result["rows"], ["mode", "median step s", "tokens/s", "x live", "trainer peak RSS MiB"]))
        errors = [
            {"storage": d, **{f"rel. error {k}": v for k, v in e.items()}}
            for d, e in result["storage_relative_error"].items()
        ]
        print(table(errors, list(errors[0])))
        write_json(args.json, result)
        return 0
    if args.what == "build":
        rows = run_build(args.names, args.root)
        print(f"# teacher-signal builds (Ray Data, local Ray, 2 CPUs)\n# {machine()}")
        print(table(rows, list(rows[0])))
        write_json(args.json, {"rows": rows})
        return 0
    rows, positions = run_topk(args.k, args.examples, args.losses)
    print(
        f"# top-k KD against full-vocabulary KD: SmolLM2-135M-Instruct teacher, fresh 4x192 student, "
        f"{args.examples} ChatterBot rows ({positions} response positions)\n# {machine()}"
    )
    print(table(rows, list(rows[0])))
    write_json(args.json, {"rows": rows, "positions": positions})
    return 0


if __name__ == "__main__":
    sys.exit(main())
