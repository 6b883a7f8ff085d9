"""Data beyond memory: what a run's memory and set-up cost as its rows and teacher-signal cache grow.

    python benchmarks/data_scale.py scale                  # demo rows at 2k / 20k / 200k: cached and live
    python benchmarks/data_scale.py big --gb 36            # a synthetic cache 1.5x this machine's RAM, 200 steps

scale: for each row count, one JSON-lines file of demo reviews (flexkd/demo.py), a tiny random teacher (BERT,
hidden 64, 4 layers) and the demo student. In this order, each in a fresh subprocess whose peak RSS is its
VmHWM: the teacher-signal build (in process: the same ShardWriter and tokenised table as the Ray Data job);
a run from the cached signals, the shards memory-mapped (this revision's reader); the same run with every
shard read into memory first (the previous revision's reader, kept below as the baseline of step time); a
run with the teacher live. Every run is Flex-KD + logit KD, 100 steps of batch 32, log every 10, after one
run that warms the score cache. "set-up" is
the run's own ``perf/setup_s`` (tokenisers, data, student, scores from the cache) of a run that finds the
tokenised table already written, as every run after the first does; "tokenise" is the first process's one-off
``datasets.map``. Step time is the median of the run's ``perf/step_s`` windows after the first.

big: a cache in the real format (shards, manifest, material of a real config) written with random hidden
states of a teacher of hidden 1024 (two mapped layers, float32), over as many demo rows as make ``--gb``;
then ``flexkd train`` logic (``flexkd.runs.distil``) for 200 steps reading it. Reports the cache size, the
run's peak RSS and its resident file-backed and anonymous memory at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, median, table, write_json  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# The work of one subprocess


def _memory() -> dict:
    """Peak and current resident memory of this process, MiB (from /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
    return out


def _overrides(work: Path, rows: int, name: str, extra: list[str]) -> list[str]:
    return [
        f"teacher.path={work / 'teacher'}",
        f"data.source={work / f'rows-{rows}.jsonl'}",
        "data.val_split=",
        "data.test_split=",
        "data.val_size=200",
        "data.max_train_examples=0",
        f"data.cache_dir={work / 'data-cache'}",
        f"signals.path={work / 'signals'}",
        f"run.output_dir={work / 'runs' / name}",
        "feature.loss=pearson",
        "feature.layers=uniform:2",
        f"scoring.cache={work / 'score-cache'}",
        "train.steps=100",
        "train.log_every=10",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "eval.max_examples=64",
        *extra,
    ]


def child(kind: str, overrides: list[str]) -> dict:
    import logging

    logging.basicConfig(level=logging.WARNING)
    from flexkd.checks import preflight
    from flexkd.config import load_config

    cfg = load_config("demo", overrides)
    started = time.perf_counter()
    if kind == "build":
        from flexkd import signals as sig
        from flexkd.workbench import open_workbench

        plan = preflight(cfg)
        bench = open_workbench(cfg, need_teacher=False)
        bp = sig.plan_build(cfg, bench, plan.teacher_layers)
        manifest = sig.build_in_process(cfg, bp, bench.data.label_names)
        meta = bench.encode_table(bench.data.train).meta
        return {
            "seconds": time.perf_counter() - started,
            "tokenise_s": meta["seconds"],
            "bytes": manifest["sizes"]["bytes"],
            "shards": len(manifest["shards"]),
            **_memory(),
        }
    if kind == "in-memory":
        import flexkd.train

        flexkd.train.SignalReader = InMemoryReader
    from flexkd.runs import distil

    metrics = distil(cfg, quiet=True)
    windows = [
        r["perf/step_s"]
        for r in (
            json.loads(line) for line in Path(cfg.run.output_dir, "metrics.jsonl").read_text().splitlines()
        )
        if "perf/step_s" in r
    ]
    return {
        "seconds": time.perf_counter() - started,
        "setup_s": metrics["perf/setup_s"],
        "setup_data_s": metrics["perf/setup_data_s"],
        "step_s": median(windows[1:] or windows),
        "loss": metrics.get("train/loss"),
        **_memory(),
    }


class InMemoryReader:
    """The previous revision's reader (flexkd/signals.py at c2ed42f), the baseline of step time: every shard
    read whole and decoded into memory at start, one dict entry per example."""

    def __init__(self, folder: str, **_):
        from safetensors.torch import load

        from flexkd.signals import ShardSpec
        from flexkd.storage import Store

        self.folder = folder.rstrip("/")
        store = Store(self.folder)
        self.manifest = json.loads(store.read("manifest.json"))
        self.spec = ShardSpec.from_dict(self.manifest["spec"])
        self.shards = self.manifest["shards"]
        self.opened = {r["file"] for r in self.shards}
        self._where = {}
        for s_i, record in enumerate(self.shards):
            for j in range(record["count"]):
                self._where[record["first"] + j] = (s_i, j)
        self._loaded = {s_i: load(store.read(r["file"])) for s_i, r in enumerate(self.shards)}

    @property
    def examples(self) -> int:
        return self.manifest["examples"]

    def check_covers(self, n: int) -> None:
        assert self.examples == n

    def unit_columns(self, layer: int, units: list[int]) -> list[int]:
        return list(units)

    def gather(self, indices, lengths, layers, temperature, device) -> dict:
        import torch

        width = max(lengths)
        parts = []
        for i in indices:
            s_i, j = self._where[i]
            shard = self._loaded[s_i]
            parts.append(
                (shard, shard["tok_offsets"][j : j + 2].tolist(), shard["pos_offsets"][j : j + 2].tolist())
            )
        hidden = {}
        for layer in layers:
            name = f"hidden.{layer}"
            out = torch.zeros(len(indices), width, parts[0][0][name].shape[-1])
            for b, (shard, (t0, t1), _) in enumerate(parts):
                out[b, : t1 - t0] = shard[name][t0:t1].float()
            hidden[layer] = out.to(device)
        rows = torch.cat([shard["logits"][p0:p1].float() for shard, _, (p0, p1) in parts]).to(device)
        return {"hidden": hidden, "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# Inputs


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` demo reviews (text, label) as JSON lines; the first n of a larger file are the same rows."""
    from flexkd import demo

    if path.exists():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".partial")
    with tmp.open("w") as f:
        for _ in range(n):
            r = demo.make_review(rng)
            f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
    tmp.rename(path)
    return path


def write_teacher(path: Path, hidden: int, layers: int) -> Path:
    from tests.fixtures import save_model

    if not (path / "config.json").exists():
        save_model(path, "classification", hidden=hidden, layers=layers)
    return path


def run_child(kind: str, overrides: list[str], log: Path) -> dict:
    cmd = [sys.executable, __file__, "child", kind, json.dumps(overrides)]
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{kind} failed ({proc.returncode}); log: {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# scale


def scale(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_teacher(work / "teacher", 64, 4)
    results = []
    for n in args.rows:
        write_rows(work / f"rows-{n}.jsonl", n)
        shutil.rmtree(work / "data-cache", ignore_errors=True)  # each size's first process tokenises
        build = run_child("build", _overrides(work, n, f"build-{n}", []), work / f"build-{n}.log")
        print(f"{n} rows: build {build['seconds']:.1f}s, peak {build['VmHWM']:.0f} MiB", flush=True)
        runs = {}
        # Mapped and in-memory alternate, twice, so that a slow minute of this shared machine hits both.
        # A first run warms the score cache: every measured run then scores nothing (as in a sweep).
        run_child("cached", _overrides(work, n, f"warm-{n}", ["signals.mode=cached"]), work / f"warm-{n}.log")
        for kind in ("cached", "in-memory", "cached", "in-memory", "live"):
            mode = ["signals.mode=live"] if kind == "live" else ["signals.mode=cached"]
            out = run_child(kind, _overrides(work, n, f"{kind}-{n}", mode), work / f"{kind}-{n}.log")
            runs.setdefault(kind, []).append(out)
            print(f"{n} rows: {kind} peak {out['VmHWM']:.0f} MiB, set-up {out['setup_s']:.2f}s", flush=True)
        results.append({"rows": n, "build": build, "runs": runs})
        shutil.rmtree(work / "signals", ignore_errors=True)
    base = results[0]
    lines = []
    for r in results:
        runs = r["runs"]

        def peak(kind: str, runs=runs) -> float:
            return max(x["VmHWM"] for x in runs[kind])

        def first(kind: str, key: str, res=r) -> float:
            return median([x[key] for x in res["runs"][kind]])

        lines.append(
            {
                "rows": r["rows"],
                "cache MB": round(r["build"]["bytes"] / 1e6, 1),
                "tokenise s (once)": round(r["build"]["tokenise_s"], 2),
                "build peak MiB": round(r["build"]["VmHWM"]),
                "cached peak MiB": round(peak("cached")),
                "cached peak / 1x": round(
                    peak("cached") / max(x["VmHWM"] for x in base["runs"]["cached"]), 3
                ),
                "live peak MiB": round(peak("live")),
                "live peak / 1x": round(peak("live") / max(x["VmHWM"] for x in base["runs"]["live"]), 3),
                "set-up s cached": round(first("cached", "setup_s"), 2),
                "set-up s live": round(first("live", "setup_s"), 2),
                "step mapped / in-memory": round(first("cached", "step_s") / first("in-memory", "step_s"), 3),
                "in-memory peak MiB": round(peak("in-memory")),
            }
        )
    print()
    print(machine())
    print(table(lines, list(lines[0])))
    write_json(args.json, {"results": results, "table": lines})


# ---------------------------------------------------------------------------------------------------------
# big: a synthetic cache larger than this machine's memory


def big(args) -> None:
    import torch

    from flexkd import signals as sig
    from flexkd.checks import preflight
    from flexkd.config import load_config
    from flexkd.workbench import open_workbench

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hidden, layers = 1024, 2
    write_teacher(work / "teacher-1024", hidden, 2)
    # Demo reviews are ~17 tokens; two float32 layers of 1024 units: ~140 KB per row.
    n = int(args.gb * 1e9 / (17.3 * hidden * 4 * layers))
    write_rows(work / f"rows-{n}.jsonl", n)
    overrides = _overrides(
        work, n, "big", ["signals.mode=cached", f"train.steps={args.steps}", "train.log_every=20"]
    )
    overrides = [
        o.replace(str(work / "teacher"), str(work / "teacher-1024")) if o.startswith("teacher.") else o
        for o in overrides
    ]
    overrides += ["signals.shard_examples=1024"]
    cfg = load_config("demo", overrides)
    plan = preflight(cfg)
    bench = open_workbench(cfg, need_teacher=False)
    rows = bench.encode_table(bench.data.train)
    mat = sig.material(cfg, bench, plan.teacher_layers)
    key = sig.signal_key(mat)
    store = sig.Store(cfg.signals.path)
    spec = sig.ShardSpec(
        layers=mat["layers"],
        dtype="float32",
        causal=False,
        top_k=0,
        temperatures=[],
        vocab=len(bench.tok_s),
        units=None,
    )
    chunks = sig.Chunks(rows, cfg.signals.shard_examples)
    if sig.read_manifest(store, key) is None:
        started = time.perf_counter()
        records = []
        gen = torch.Generator().manual_seed(0)
        for i in range(len(chunks)):
            span = chunks.range(i)
            lengths = [len(e["input_ids"]) for e in rows.take(span)]
            tokens = sum(lengths)
            offsets = torch.tensor([0, *lengths]).cumsum(0)
            tensors = {
                "index": torch.tensor(list(span), dtype=torch.int64),
                "tok_offsets": offsets,
                "pos_offsets": torch.arange(len(span) + 1, dtype=torch.int64),
                "logits": torch.randn(len(span), 2, generator=gen),
            }
            for layer in spec.layers:
                tensors[f"hidden.{layer}"] = torch.randn(tokens, hidden, generator=gen)
            data = sig.encode_shard(tensors)
            store.write(data, key, sig.shard_name(i))
            records.append(sig.shard_record(i, data, tensors))
            del data, tensors
            if i % 50 == 0:
                gb = sum(r["bytes"] for r in records) / 1e9
                print(
                    f"shard {i + 1}/{len(chunks)}: {gb:.1f} GB ({time.perf_counter() - started:.0f}s)",
                    flush=True,
                )
        sig.write_manifest(
            store, key, mat, spec, records, {"build_s": time.perf_counter() - started, "synthetic": True}
        )
    manifest = sig.read_manifest(store, key)
    size = manifest["sizes"]["bytes"]
    del bench, rows
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(
        f"cache: {size / 1e9:.1f} GB in {len(manifest['shards'])} shards ({size / ram:.2f}x this machine's RAM)"
    )
    out = run_child("cached", overrides, work / "big-run.log")
    row = {
        "cache GB": round(size / 1e9, 1),
        "x RAM": round(size / ram, 2),
        "rows": n,
        "steps": args.steps,
        "peak RSS MiB": round(out["VmHWM"]),
        "end RSS anon MiB": round(out["RssAnon"]),
        "end RSS file MiB": round(out["RssFile"]),
        "set-up s": round(out["setup_s"], 2),
        "step s": round(out["step_s"], 4),
    }
    print()
    print(machine())
    print(table([row], list(row)))
    write_json(args.json, {"result": out, "table": [row]})
    if not args.keep:
        shutil.rmtree(cfg.signals.path, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        print(json.dumps(child(sys.argv[2], json.loads(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--rows", type=int, nargs="+", default=[2000, 20000, 200000])
    s.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "flexkd-data-scale"))
    s.add_argument("--json", default=str(ROOT / "benchmarks/results/data_scale.json"))
    b = sub.add_parser("big")
    b.add_argument("--gb", type=float, default=36.0)
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "flexkd-data-big"))
    b.add_argument("--keep", action="store_true", help="keep the synthetic cache")
    b.add_argument("--json", default=str(ROOT / "benchmarks/results/data_scale_big.json"))
    args = parser.parse_args()
    {"scale": scale, "big": big}[args.what](args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
