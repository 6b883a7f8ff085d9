"""Ray Train: the same loop in TorchTrainer workers on a real local Ray cluster (gloo on CPU)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from flexkd import artifacts
from flexkd.config import load_config
from flexkd.reporting import RunRecorder
from flexkd.scoring import SCORERS
from flexkd.train import train
from tuning.ray_train import fit, score

# One-off facts every run records (what it read, its teacher's source): beside the events a test is about.
RECORDS = {"datasets", "examples", "teacher_source", "teacher_loads"}

FAST = ["train.log_every=5", "eval.max_examples=64", "scoring.num_examples=48", "data.max_train_examples=400"]


def ray_cfg(disk, tmp_path, *extra):
    return load_config(
        "demo",
        [
            f"teacher.path={disk['teacher_cls']}",
            f"run.output_dir={tmp_path / 'run'}",
            f"scaling.storage_path={tmp_path / 'ray'}",
            *FAST,
            *extra,
        ],
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_recorder_keeps_the_first_report_of_each_step_and_passes_events_on(tmp_path):
    seen = []

    class Sink:
        def report(self, metrics, step, checkpoint):
            seen.append(("report", step, dict(metrics), checkpoint))

        def event(self, name, value, step):
            seen.append(("event", name, value, step))

    def checkpoint(step):
        folder = tmp_path / f"ckpt-{step}"
        folder.mkdir()
        (folder / "step.txt").write_text(str(step))
        return str(folder)

    recorder = RunRecorder(tmp_path / "run", [Sink()])
    recorder({"train/loss": 1.0, "event/scored_s": 0.5}, 5)
    recorder({"train/loss": 0.9}, 10, checkpoint(10))
    recorder({"train/loss": 0.8}, 15)
    # A restarted worker group resumes from step 10 and repeats step 15 before going on.
    recorder({"train/loss": 0.8, "event/resumed_from_step": 10}, 15)
    recorder({"train/loss": 0.7}, 20, checkpoint(20))
    reports = [s for s in seen if s[0] == "report"]
    assert [r[1] for r in reports] == [5, 10, 15, 20]
    assert ("event", "scored_s", 0.5, 5) in seen and ("event", "resumed_from_step", 10, 15) in seen
    latest = tmp_path / "run" / "checkpoints" / "latest"
    assert reports[1][3] == latest and reports[3][3] == latest
    assert (latest / "step.txt").read_text() == "20" and not (tmp_path / "ckpt-20").exists()
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [5, 10, 15, 20] and not any(
        k.startswith("event/") for r in lines for k in r
    )
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    assert [e["event"] for e in events if e["event"] not in RECORDS] == [
        "scored_s",
        "checkpoint",
        "resumed_from_step",
        "checkpoint",
    ]


def test_two_gloo_workers_train_the_demo_and_export_artifacts(ray_cluster, disk, tmp_path):
    cfg = ray_cfg(
        disk,
        tmp_path,
        "scaling.num_workers=2",
        "train.steps=20",
        "train.eval_every=10",
        "train.checkpoint_every=10",
    )
    metrics = fit(cfg, quiet=True)
    out = Path(cfg.run.output_dir)
    assert metrics["step"] == 20 and 0 <= metrics["val/accuracy"] <= 1 and metrics["val/examples"] == 64
    for name in (artifacts.STUDENT, artifacts.SELECTION, artifacts.CONFIG, artifacts.METRICS):
        assert (out / name).exists(), name
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == [5, 10, 15, 20]
    events = read_jsonl(out / "events.jsonl")
    assert [e["event"] for e in events if e["event"] != "checkpoint" and e["event"] not in RECORDS] == [
        "ray_run",
        "scored_s",
    ]
    assert sum(e["event"] == "checkpoint" for e in events) == 2
    assert Path(metrics["ray/run"]).is_dir()  # the Train run's storage, with its checkpoints


def test_one_ray_worker_gives_the_in_process_losses(ray_cluster, disk, tmp_path):
    cfg = ray_cfg(disk, tmp_path, "scaling.num_workers=1", "train.steps=10", "train.eval_every=0")
    local = []
    train(cfg, lambda m, s, c=None: local.append((s, m)))
    fit(cfg, quiet=True)
    remote = {r["step"]: r for r in read_jsonl(Path(cfg.run.output_dir) / "metrics.jsonl")}
    for step, m in local:
        for key in ("train/loss", "train/loss_task", "train/loss_kd", "train/loss_feat"):
            assert remote[step][key] == pytest.approx(m[key], rel=1e-4), (step, key)


def test_scores_from_two_workers_equal_scores_from_one(ray_cluster, disk, tmp_path):
    # 45 examples in batches of 4: 12 batches, the last of 1 example; shards are whole batches.
    base = ["scoring.num_examples=45", "scoring.batch_size=4", "feature.layers=uniform:2"]
    _, one = score(ray_cfg(disk, tmp_path, "scaling.num_workers=1", *base), quiet=True)
    path, two = score(ray_cfg(disk, tmp_path, "scaling.num_workers=2", *base), quiet=True)
    assert one.examples == two.examples == 45
    assert sorted(one.layers) == [1, 2]
    for layer in one.layers:
        assert one.layers[layer].tokens == two.layers[layer].tokens
        for method in SCORERS:  # grad included: its absolute value is per batch, and shards are whole batches
            torch.testing.assert_close(
                two.layers[layer].sums[method], one.layers[layer].sums[method], rtol=1e-5, atol=1e-12
            )
    doc = json.loads(path.read_text())
    assert [layer["teacher_layer"] for layer in doc["layers"]] == [1, 2]


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(ray_cluster, disk, tmp_path):
    from ray.util.state import list_actors

    steps = 200
    cfg = ray_cfg(
        disk,
        tmp_path,
        "scaling.num_workers=2",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.checkpoint_every=20",
        "train.log_every=10",
        "scaling.max_failures=2",
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(metrics=fit(cfg, quiet=True)), daemon=True)
    thread.start()
    killed = None
    deadline = time.time() + 300
    events_file = Path(cfg.run.output_dir) / "events.jsonl"
    while time.time() < deadline and killed is None and thread.is_alive():
        # Once the controller has registered a checkpoint (the driver logs it as an event), kill a worker.
        if any(e["event"] == "checkpoint" for e in read_jsonl(events_file)):
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                killed = workers[-1]["pid"]
                import os
                import signal

                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed is not None, "training ended before a worker could be killed"
    metrics = outcome["metrics"]
    assert metrics["step"] == steps
    out = Path(cfg.run.output_dir)
    reported = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert reported == sorted(set(reported)) and reported[-1] == steps  # strictly increasing, complete
    assert reported == list(range(10, steps + 1, 10))
    events = read_jsonl(out / "events.jsonl")
    assert [e["event"] for e in events].count("scored_s") == 1  # the selection was not recomputed
    resumed = [e for e in events if e["event"] == "resumed_from_step"]
    assert resumed and all(e["value"] % 20 == 0 and e["value"] >= 20 for e in resumed)


def test_fsdp_shards_a_generation_student_across_two_workers(ray_cluster, disk, tmp_path):
    cfg = load_config(
        "demo-instruct",
        [
            f"teacher.path={disk['teacher_lm']}",
            f"run.output_dir={tmp_path / 'run'}",
            f"scaling.storage_path={tmp_path / 'ray'}",
            *FAST,
            "scaling.num_workers=2",
            "scaling.strategy=fsdp",
            "train.steps=6",
            "train.eval_every=0",
            "eval.max_examples=9",
            "eval.batch_size=4",
            "eval.max_new_tokens=4",
        ],
    )
    metrics = fit(cfg, quiet=True)
    assert (
        metrics["step"] == 6 and metrics["val/examples"] == 9
    )  # 5 + 4 examples: unequal shards stay in step
    assert 0 <= metrics["val/rouge_l"] <= 1
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(Path(cfg.run.output_dir) / artifacts.STUDENT)
    assert student.config.hidden_size == 32  # saved whole, not as a shard
