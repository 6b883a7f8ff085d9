"""Teacher signals: cached outputs equal the live teacher's for every loss; the cache is refused when it does
not match the run; interrupted or damaged caches are never read; runs, Ray Train and sweeps train from it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexkd import signals as sig
from flexkd.checks import preflight
from flexkd.config import ConfigError, load_config
from flexkd.models import build_student, hidden_size
from flexkd.objective import Objective
from flexkd.workbench import open_workbench

LOSSES = [
    # (name, overrides): every KD kind with Flex-KD, the other feature losses, task only through SFT-style KD off
    ("fkl+pearson", ["kd.loss=fkl", "feature.loss=pearson"]),
    ("rkl+pearson", ["kd.loss=rkl", "feature.loss=pearson"]),
    ("skl+mse_std", ["kd.loss=skl", "feature.loss=mse_std"]),
    ("srkl+projector", ["kd.loss=srkl", "feature.loss=projector"]),
    ("jsd+pearson/response", ["kd.loss=jsd", "feature.loss=pearson", "feature.tokens=response"]),
    ("fkl+pearson/head", ["kd.loss=fkl", "feature.loss=pearson", "feature.tokens=head"]),
    ("fkl/T2 only", ["kd.loss=fkl", "feature.loss=none", "kd.temperature=2.0"]),
]


def _config(disk, tmp_path, task, extra=()):
    preset, teacher = (
        ("demo", disk["teacher_cls"]) if task == "classification" else ("demo-instruct", disk["teacher_lm"])
    )
    return load_config(
        preset,
        [
            f"teacher.path={teacher}",
            f"signals.path={tmp_path / 'signals'}",
            f"run.output_dir={tmp_path / 'run'}",
            "data.max_train_examples=48",
            "signals.shard_examples=20",
            "signals.batch_size=7",  # other batches than the loop's: padding must not matter
            "feature.layers=uniform:2",
            "run.seed=7",  # the student's init: the LM fixture teacher has the demo student's shape and seed 0
            *extra,
        ],
    )


def _build(cfg, temperatures=None):
    plan = preflight(cfg)
    bench = open_workbench(cfg, need_teacher=False)
    bp = sig.plan_build(cfg, bench, plan.teacher_layers, temperatures)
    manifest = sig.build_in_process(cfg, bp, bench.data.label_names)
    return bp, manifest


def _terms_live_and_cached(cfg, folder, indices):
    """The objective's terms for one micro-batch, with the live teacher and from the cache."""
    plan = preflight(cfg)
    bench = open_workbench(cfg, need_teacher=True)
    examples = bench.encode_rows(bench.data.train)
    student = build_student(cfg, bench.tok_s, bench.data.label_names, bench.teacher_config).train()
    d_t = plan.teacher.hidden
    units = [torch.randperm(d_t)[: plan.k] for _ in plan.layer_map]
    projector = None
    if cfg.feature.loss == "projector":
        units = [None] * len(plan.layer_map)
        projector = torch.nn.ModuleList(
            torch.nn.Linear(hidden_size(student.config), d_t) for _ in plan.layer_map
        )
    reader = sig.SignalReader(folder)
    chosen = [examples[i] for i in indices]
    batch = bench.batch(chosen)
    live = Objective(cfg, bench.teacher, plan.layer_map, units, projector, vocab=len(bench.tok_s))
    cached = Objective(cfg, None, plan.layer_map, units, projector, vocab=len(bench.tok_s))
    torch.manual_seed(1)
    a = live(student, batch)
    b_batch = dict(batch)
    b_batch["signals"] = reader.gather(
        indices, [len(e["input_ids"]) for e in chosen], plan.teacher_layers, cfg.kd.temperature, "cpu"
    )
    torch.manual_seed(1)
    b = cached(student, b_batch)
    return a, b


@pytest.mark.parametrize("task", ["classification", "instruction"])
def test_cached_signals_give_the_live_teachers_losses_for_every_loss(disk, tmp_path, task):
    """float32 storage: every term equal to 1e-6, whatever batches the build ran in."""
    base = _config(disk, tmp_path, task)
    bp, manifest = _build(base, temperatures=[1.0, 2.0] if task != "classification" else None)
    assert manifest["examples"] == 48 and len(manifest["shards"]) == 3
    indices = [0, 19, 20, 33, 47, 5]  # across shard boundaries, in no order
    for name, extra in LOSSES:
        if "feature.tokens=response" in extra and task == "classification":
            continue  # a generation-task setting
        cfg = _config(disk, tmp_path, task, extra)
        live, cached = _terms_live_and_cached(cfg, bp.folder, indices)
        assert set(live) == set(cached) and "kd" in live, name
        for term in live:
            assert float(live[term].detach()) > 0, (name, term)
            assert float(cached[term].detach()) == pytest.approx(
                float(live[term].detach()), abs=1e-6, rel=1e-6
            ), (name, term)


def test_top_k_signals_give_the_live_top_k_losses_and_bound_the_full_kl(disk, tmp_path):
    """kd.top_k: cached and live agree (the same k + 1 buckets); the coarsened KL is at most the full one,
    and with k = vocabulary - 1 (a one-token tail) it is the full one."""
    vocab = len(open_workbench(_config(disk, tmp_path, "instruction"), need_teacher=False).tok_s)
    results = {}
    for k in (4, vocab - 1):
        cfg = _config(disk, tmp_path, "instruction", [f"kd.top_k={k}", "kd.loss=fkl", "feature.loss=pearson"])
        bp, manifest = _build(cfg)
        assert manifest["spec"]["top_k"] == k
        live, cached = _terms_live_and_cached(cfg, bp.folder, [1, 2, 30])
        assert float(cached["kd"]) == pytest.approx(float(live["kd"]), abs=1e-6)
        results[k] = float(live["kd"])
    full_cfg = _config(disk, tmp_path, "instruction", ["kd.loss=fkl", "feature.loss=pearson"])
    full, _ = _terms_live_and_cached(full_cfg, _build(full_cfg)[0].folder, [1, 2, 30])
    assert results[4] <= float(full["kd"]) + 1e-7
    assert results[vocab - 1] == pytest.approx(float(full["kd"]), rel=1e-5)
    # k >= the vocabulary means the full vocabulary: the same cache and the same loss as kd.top_k=0.
    wide = _config(
        disk, tmp_path, "instruction", [f"kd.top_k={vocab + 5}", "kd.loss=fkl", "feature.loss=pearson"]
    )
    bp_wide, manifest = _build(wide)
    assert manifest["spec"]["top_k"] == 0 and bp_wide.folder == _build(full_cfg)[0].folder


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 1e-2), ("float16", 5e-3)])
def test_half_precision_signals_stay_within_the_documented_error(disk, tmp_path, dtype, tolerance):
    """bf16 / fp16 storage: each term within the relative error the README states."""
    cfg = _config(disk, tmp_path, "classification", [f"signals.dtype={dtype}"])
    bp, manifest = _build(cfg)
    f32 = _config(disk, tmp_path / "f32", "classification")
    full_bytes = _build(f32)[1]["sizes"]["bytes"]
    assert manifest["sizes"]["bytes"] < 0.6 * full_bytes
    live, cached = _terms_live_and_cached(cfg, bp.folder, list(range(16)))
    for term in live:
        assert abs(float(cached[term]) - float(live[term])) <= tolerance * abs(float(live[term])), term


# ---------------------------------------------------------------------------------------------------------
# Refusals and faults


def test_a_cache_for_other_inputs_is_refused_naming_the_key(disk, tmp_path):
    cfg = _config(disk, tmp_path, "classification", ["feature.layers=last"])
    bp, _ = _build(cfg)
    direct = [f"signals.path={bp.folder}", "signals.mode=cached"]
    cases = {
        "data.max_length": ["data.max_length=24"],
        "data.source": ["data.max_train_examples=40"],
        "feature.layers": ["feature.layers=1:1"],  # layer 1 was not stored (only the last)
        "teacher.path": [f"teacher.path={disk['teacher_lm']}"],
        "signals.dtype": ["signals.dtype=bfloat16"],
    }
    for key, extra in cases.items():
        other = _config(disk, tmp_path, "classification", ["feature.layers=last", *direct, *extra])
        with pytest.raises(ConfigError, match=f"^{key}: "):
            sig.attach(other, preflight(other))
    # A pretrained student whose tokenizer splits the same way but is another tokenizer (one token more).
    from transformers import AutoTokenizer

    student = tmp_path / "student_more_tokens"
    shutil.copytree(disk["student_cls"], student)
    tok = AutoTokenizer.from_pretrained(student)
    tok.add_tokens(["zzzunused"])
    tok.save_pretrained(student)
    other = _config(
        disk,
        tmp_path,
        "classification",
        ["feature.layers=last", *direct, f"student.path={student}", "student.arch="],
    )
    with pytest.raises(ConfigError, match="^student.path: "):
        sig.attach(other, preflight(other))
    # The same run finds it, directly and by scanning the root; a run with fewer layers is served too, and a
    # bf16 run by this fp32 cache (a bf16 cache would not serve an fp32 run: tested on `differences`).
    same = _config(disk, tmp_path, "classification", ["feature.layers=last", *direct])
    assert sig.attach(same, preflight(same)).signals == bp.folder
    bf16 = _config(disk, tmp_path, "classification", ["feature.layers=last", *direct, "run.precision=bf16"])
    assert sig.attach(bf16, preflight(bf16)).signals == bp.folder
    built = json.loads((Path(bp.folder) / "manifest.json").read_text())["material"]
    assert sig.differences({**built, "precision": "bf16"}, built) == ["precision"]
    scan = _config(disk, tmp_path, "classification", ["feature.layers=last", "signals.mode=cached"])
    plan = sig.attach(scan, preflight(scan))
    assert plan.signals == bp.folder and not plan.loads_teacher
    # cached with nothing that fits: the nearest cache's difference is named.
    missing = _config(
        disk, tmp_path, "classification", ["feature.layers=last", "signals.mode=cached", "data.max_length=30"]
    )
    with pytest.raises(ConfigError, match="^data.max_length: .*built for max_length 40; this run needs 30"):
        sig.attach(missing, preflight(missing))
    # auto with nothing that fits: live, said in the plan's notes.
    auto = _config(disk, tmp_path, "classification", ["feature.layers=last", "data.max_length=30"])
    plan = sig.attach(auto, preflight(auto))
    assert plan.loads_teacher and not plan.signals and "live" in plan.notes[-1]


def test_an_interrupted_build_is_never_read_and_resumes(disk, tmp_path):
    cfg = _config(disk, tmp_path, "classification")
    plan = preflight(cfg)
    bench = open_workbench(cfg, need_teacher=False)
    bp = sig.plan_build(cfg, bench, plan.teacher_layers)
    writer = sig.ShardWriter(
        __import__("flexkd.config", fromlist=["to_dict"]).to_dict(cfg),
        bench.data.label_names,
        bp.spec.to_dict(),
        bp.folder,
    )
    first = writer(0, bp.chunks[0])  # the build dies after one shard: no manifest
    Path(bp.folder, sig.shard_name(1)).write_bytes(b"half a shard")  # and one cut short
    auto = sig.attach(cfg, preflight(cfg))
    assert not auto.signals and auto.loads_teacher  # never read
    with pytest.raises(ConfigError, match="no teacher signals"):
        strict = _config(disk, tmp_path, "classification", ["signals.mode=cached"])
        sig.attach(strict, preflight(strict))
    with pytest.raises(ConfigError, match="did not finish"):
        sig.SignalReader(bp.folder)
    manifest = sig.build_in_process(cfg, bp, bench.data.label_names)  # resumes: shard 0 kept, 1 recomputed
    assert manifest["shards"][0]["sha256"] == first["sha256"]
    assert sig.SignalReader(bp.folder).examples == 48


def test_a_missing_or_corrupt_shard_is_an_error_naming_the_file(disk, tmp_path):
    """Raised at the first gather that reads the shard, in one line naming the file. A local shard is checked
    by its size and its header when first opened, not checksummed at every start: a payload byte flipped at the
    same size goes unseen here (the writer hashed the file; a fetched shard is checked against the sha256 as it
    arrives, tests/test_signal_reading.py)."""
    cfg = _config(disk, tmp_path, "classification")
    bp, manifest = _build(cfg)
    shard = Path(bp.folder, manifest["shards"][1]["file"])
    original = shard.read_bytes()
    bench = open_workbench(cfg, need_teacher=False)
    examples = bench.encode_rows(bench.data.train)

    def gather(reader, i):
        return reader.gather([i], [len(examples[i]["input_ids"])], bp.spec.layers, 1.0, "cpu")

    reader = sig.SignalReader(bp.folder)  # start-up reads no shard: the damage is found when shard 1 is read
    shard.write_bytes(original[:-3])  # cut short
    gather(reader, 0)
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(shard))}: corrupt signal shard \\(.*bytes, the manifest says"
    ):
        gather(reader, 25)
    garbled = bytearray(original)
    garbled[8:12] = b"\x00\x01\x02\x03"  # inside the JSON header, at the same size
    shard.write_bytes(bytes(garbled))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(shard))}: corrupt signal shard") as err:
        gather(sig.SignalReader(bp.folder), 25)
    assert "\n" not in str(err.value)
    shard.unlink()
    with pytest.raises(ConfigError, match=f"^{re.escape(str(shard))}: missing signal shard; delete"):
        gather(sig.SignalReader(bp.folder), 25)


def test_an_oversized_build_stops_before_writing(disk, tmp_path):
    cfg = _config(disk, tmp_path, "classification", ["signals.max_gb=0.0001"])
    plan = preflight(cfg)
    bench = open_workbench(cfg, need_teacher=False)
    bp = sig.plan_build(cfg, bench, plan.teacher_layers)
    assert bp.estimate > 1e5
    with pytest.raises(ConfigError, match="^signals.max_gb: these signals would take"):
        sig.check_budget(bp.estimate, cfg)
    # The estimate is what the build writes, to within the shards' headers.
    _, manifest = _build(_config(disk, tmp_path, "classification"))
    assert abs(manifest["sizes"]["bytes"] - bp.estimate) < 4096 * len(manifest["shards"])


# ---------------------------------------------------------------------------------------------------------
# Runs from the cache: in process, on Ray Train, in a sweep; and the Ray Data build


def _events(root: Path) -> dict:
    return {e["event"]: e["value"] for e in map(json.loads, (root / "events.jsonl").read_text().splitlines())}


def _metrics(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


def test_ray_data_build_then_local_and_two_worker_runs_train_from_it(ray_cluster, disk, tmp_path):
    """`flexkd signals` through Ray Data writes the cache the in-process build writes; a local run and a
    2-worker Ray Train run read it, load no teacher, and match a live run's losses."""
    from flexkd.runs import distil
    from tuning.ray_train import fit
    from tuning.signals import build

    common = [
        "train.steps=6",
        "train.log_every=2",
        "train.eval_every=3",
        "train.batch_size=8",
        "eval.max_examples=16",
        "scoring.num_examples=16",
        f"scaling.storage_path={tmp_path / 'ray'}",
        f"scoring.cache={tmp_path / 'scores'}",
    ]
    cfg = _config(disk, tmp_path, "classification", common)
    manifest = build(cfg, preflight(cfg), quiet=True)
    reference = _config(disk, tmp_path / "ref", "classification", common)
    _, in_process = _build(reference)
    # The same tensors (to float rounding: the actors run other thread counts than this process).
    assert [(s["first"], s["count"]) for s in manifest["shards"]] == [
        (s["first"], s["count"]) for s in in_process["shards"]
    ]
    ray_built, here = (
        sig.SignalReader(manifest["folder"]),
        sig.SignalReader(sig.Store(reference.signals.path).path(in_process["key"])),
    )
    for record, other in zip(ray_built.shards, here.shards):
        a = load_file(Path(ray_built.folder, record["file"]))
        b = load_file(Path(here.folder, other["file"]))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name].double(), b[name].double(), atol=1e-6, rtol=1e-5), name
    assert manifest["actors"] >= 1

    live = _config(
        disk,
        tmp_path,
        "classification",
        [*common, "signals.mode=live", f"run.output_dir={tmp_path / 'live'}"],
    )
    cached = _config(
        disk,
        tmp_path,
        "classification",
        [*common, "signals.mode=cached", f"run.output_dir={tmp_path / 'cached'}"],
    )
    distil(live, quiet=True)
    distil(cached, quiet=True)
    ray_cached = _config(
        disk,
        tmp_path,
        "classification",
        [
            *common,
            "signals.mode=cached",
            "scaling.num_workers=2",
            f"run.output_dir={tmp_path / 'ray_cached'}",
        ],
    )
    fit(ray_cached, quiet=True)
    ray_live = _config(
        disk,
        tmp_path,
        "classification",
        [*common, "signals.mode=live", "scaling.num_workers=2", f"run.output_dir={tmp_path / 'ray_live'}"],
    )
    fit(ray_live, quiet=True)
    ev_live, ev_cached, ev_ray = (_events(tmp_path / n) for n in ("live", "cached", "ray_cached"))
    assert ev_live["teacher_source"] == "live" and ev_live["teacher_loads"] == 1
    assert ev_cached["teacher_source"] == "cached" and ev_cached["teacher_loads"] == 0  # scores were cached
    assert ev_ray["teacher_source"] == "cached" and ev_ray["teacher_loads"] == 0
    # 48 examples in shards of 20: rank 0 owns blocks 0 and 2, rank 1 block 1, and each opened only its own.
    assert ev_ray["signal_shards"] == {"shards": 3, "read_by_rank": [[0, 2], [1]]}
    assert ev_cached["signal_shards"] == {"shards": 3, "read_by_rank": [[0, 1, 2]]}
    assert _events(tmp_path / "ray_live")["teacher_source"] == "live"
    for live_run, cached_run in (("live", "cached"), ("ray_live", "ray_cached")):
        pairs = list(zip(_metrics(tmp_path / live_run), _metrics(tmp_path / cached_run)))
        assert len(pairs) >= 3
        for a, b in pairs:
            assert a["step"] == b["step"]
            for key in ("train/loss", "train/loss_kd", "train/loss_feat", "val/accuracy"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (cached_run, key)


def test_a_sweep_builds_once_and_no_trial_loads_the_teacher(ray_cluster, disk, tmp_path, monkeypatch):
    """The driver builds the signals of the union of the space's layer maps and warms the scores of each
    scoring setting; every trial then trains from the cache and loads no teacher."""
    import mlflow

    from tuning import tracking
    from tuning.space import load_sweep
    from tuning.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        json.dumps(
            {
                "base": "demo",
                "overrides": [
                    f"teacher.path={disk['teacher_cls']}",
                    "train.steps=6",
                    "train.eval_every=3",
                    "train.batch_size=8",
                    "eval.max_examples=16",
                    "scoring.num_examples=16",
                    "data.max_train_examples=48",
                ],
                "space": {
                    "method": {
                        "bundles": {
                            "flexkd": {"feature.loss": "pearson"},
                            "projector": {"feature.loss": "projector"},
                        }
                    },
                    "feature.layers": {"choice": ["last", "1:1"]},
                    "selection.k": {"choice": [4, 8]},
                    "kd.weight": {"loguniform": [0.5, 2.0]},
                },
                "trials": 4,
                "concurrency": 1,
                "scheduler": {"name": "none"},
                "tracking": {"register_top": 0},
            }
        )
    )
    spec, raw = load_sweep(str(sweep))
    summary = run_sweep(spec, raw, quiet=True)
    assert len(summary["leaderboard"]) == 4
    caches = {m["key"]: m for _, m in sig.manifests(sig.Store(str(tmp_path / "flexkd-runs" / "signals")))}
    assert len(caches) == 1  # one build for both layer maps
    (only,) = caches.values()
    assert set(only["spec"]["layers"]) == {1, 2}
    client = mlflow.MlflowClient(tracking.tracking_uri())
    runs = client.search_runs(
        [client.get_experiment_by_name(spec.tracking.experiment or f"flexkd-{spec.name}").experiment_id],
        "tags.mlflow.parentRunId != ''",
    )
    assert len(runs) == 4
    for run in runs:
        assert run.data.tags.get("flexkd.teacher_source") == "cached", run.data.tags
        assert run.data.tags["flexkd.teacher_loads"] == "0", run.data.tags  # a one-off fact: a tag


def test_two_concurrent_builders_of_one_cache_build_it_once(disk, tmp_path):
    """The build locks its key: the second builder waits, then finds the first one's manifest."""
    import threading

    cfg = _config(disk, tmp_path, "classification")
    plan = preflight(cfg)
    bench = open_workbench(cfg, need_teacher=False)
    bp = sig.plan_build(cfg, bench, plan.teacher_layers)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(sig.build_in_process(cfg, bp, bench.data.label_names)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert results[0]["build_s"] == results[1]["build_s"] and results[0]["created"] == results[1]["created"]


def test_teacher_actors_hold_every_cpu_they_stand_for():
    """One actor per 2 CPUs, each asking its share: Ray gives an actor as many torch threads as it asks CPUs,
    so a lone actor on 2 CPUs must ask 2 (it asked 1 and ran the teacher on one core)."""
    from tuning.signals import actor_count

    cfg = load_config("demo", [])
    assert actor_count(cfg, shards=16, nodes=[{"CPU": 2.0}]) == (1, {"num_cpus": 2})
    assert actor_count(cfg, shards=16, nodes=[{"CPU": 16.0}]) == (8, {"num_cpus": 2})
    assert actor_count(cfg, shards=3, nodes=[{"CPU": 16.0}]) == (3, {"num_cpus": 5})  # no idle actors
    assert actor_count(cfg, shards=16, nodes=[{"CPU": 1.0}]) == (1, {"num_cpus": 1})
    four = load_config("demo", ["signals.actors=4"])
    assert actor_count(four, shards=16, nodes=[{"CPU": 8.0}]) == (4, {"num_cpus": 2})
    # Never a share no single node holds: a 1-CPU head and a 2-CPU worker run one actor of 2 CPUs, not 3.
    assert actor_count(cfg, shards=16, nodes=[{"CPU": 1.0}, {"CPU": 2.0}]) == (1, {"num_cpus": 2})
    # ...and never more actors than fit the nodes whole: a second actor of 2 CPUs has no node to go to.
    assert actor_count(cfg, shards=2, nodes=[{"CPU": 3.0}, {"CPU": 1.0}]) == (1, {"num_cpus": 2})
    gpu = load_config("demo", ["scaling.use_gpu=true"])
    two_gpus = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert actor_count(gpu, shards=16, nodes=two_gpus) == (2, {"num_gpus": 1})
    with pytest.raises(ConfigError, match="scaling.use_gpu"):
        actor_count(gpu, shards=16, nodes=[{"CPU": 8.0}])
