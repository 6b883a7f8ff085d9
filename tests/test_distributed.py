"""The loop's own distributed code (DDP, FSDP, sharded scoring) in two gloo processes, without Ray."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flexkd.config import load_config
from flexkd.train import train


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, port: int, overrides: list[str], out: str, resume: str | None, preset: str = "demo"
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load_config(preset, overrides)
        kept = {}

        def report(metrics, step, checkpoint=None):
            if checkpoint:
                kept[step] = shutil.move(checkpoint, Path(out) / f"ckpt{step}")

        final = train(cfg, report, resume_from=resume)
        if rank == 0:
            Path(out, "final.json").write_text(json.dumps(final))
    finally:
        dist.destroy_process_group()


def run_two_ranks(overrides, out: Path, resume: str | None = None, preset: str = "demo") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(_port(), overrides, str(out), resume, preset), nprocs=2, join=True)
    return json.loads((out / "final.json").read_text())


# demo-instruct: a causal LM, whose output layer runs on the response positions only (losses.head_on_rows)
# inside the DDP / FSDP wrapper's forward.
@pytest.mark.parametrize(
    "strategy, preset",
    [("ddp", "demo"), ("fsdp", "demo"), ("ddp", "demo-instruct"), ("fsdp", "demo-instruct")],
)
def test_two_ranks_resume_from_a_checkpoint_to_the_same_end(disk, tmp_path, strategy, preset):
    lm = preset == "demo-instruct"
    overrides = [
        f"teacher.path={disk['teacher_lm' if lm else 'teacher_cls']}",
        "scaling.num_workers=2",
        f"scaling.strategy={strategy}",
        "train.steps=8",
        "train.log_every=4",
        "train.eval_every=0",
        "train.checkpoint_every=4",
        "eval.max_examples=33",
        "scoring.num_examples=24",
        "data.max_train_examples=200",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    full = run_two_ranks(overrides, tmp_path / "full", preset=preset)
    again = run_two_ranks(
        overrides, tmp_path / "again", resume=str(tmp_path / "full" / "ckpt4"), preset=preset
    )
    assert full["step"] == again["step"] == 8 and full["val/examples"] == 33
    for key in ("train/loss", "val/loss", "val/rouge_l" if lm else "val/accuracy"):
        assert again[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
