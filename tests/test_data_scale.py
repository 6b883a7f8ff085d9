"""Data beyond memory: the train split as a memory-mapped table tokenised once, batches that a rank draws from
its own shards, and runs from mapped teacher signals that resume exactly."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from flexkd import signals as sig
from flexkd.checks import preflight
from flexkd.config import ConfigError, Data, load_config
from flexkd.data import (
    load_task_data,
    micro_batches,
    owned_examples,
    rank_batches,
    split_task_data,
    step_indices,
    unseen_rows,
)
from flexkd.encoded import META
from flexkd.train import train
from flexkd.workbench import open_workbench

from .fixtures import write_jsonl


def _config(disk, tmp_path, *extra):
    return load_config(
        "demo",
        [
            f"teacher.path={disk['teacher_cls']}",
            f"signals.path={tmp_path / 'signals'}",
            f"data.cache_dir={tmp_path / 'data-cache'}",
            f"run.output_dir={tmp_path / 'run'}",
            "data.max_train_examples=48",
            "signals.shard_examples=20",
            "feature.layers=uniform:2",
            "train.batch_size=8",
            "train.log_every=2",
            "scoring.num_examples=16",
            "eval.max_examples=16",
            *extra,
        ],
    )


# ---------------------------------------------------------------------------------------------------------
# Batches


def test_one_rank_draws_the_global_permutation_and_several_draw_their_own_blocks():
    n, block = 103, 10
    for step in range(12):
        assert rank_batches(step, 8, n, 3, 0, 1, 2, block) == micro_batches(
            step_indices(step, 8, n, 3), 0, 1, 2
        )
    world = 2
    owned = [set(owned_examples(n, r, world, block)) for r in range(world)]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(n))
    for r in range(world):
        assert all((i // block) % world == r for i in owned[r])  # whole blocks b with b % world == r
        # Over one pass of its examples a rank sees each exactly once, and the draw is a function of the step.
        share = 4
        seen = [
            i
            for step in range(len(owned[r]) // share)
            for m in rank_batches(step, 8, n, 3, r, world, 2, block)
            for i in m
        ]
        assert len(seen) == len(set(seen)) and set(seen) <= owned[r]
        assert rank_batches(5, 8, n, 3, r, world, 2, block) == rank_batches(5, 8, n, 3, r, world, 2, block)
    # Data too short for one block per rank: the blocks shrink, no rank is left without examples.
    assert owned_examples(30, 1, 2, 256) == list(range(15, 30))


# ---------------------------------------------------------------------------------------------------------
# The tokenised table


def test_the_train_split_is_a_table_tokenised_once_and_read_exactly(disk, tmp_path, caplog):
    reviews = [
        f"data.source={disk['reviews']}",
        "data.columns={text: review, label: sentiment}",
        "data.val_split=",
        "data.test_split=",
        "data.val_size=20",
    ]
    cfg = _config(disk, tmp_path, *reviews)
    bench = open_workbench(cfg, need_teacher=False)
    assert not isinstance(bench.data.train, list)  # a datasets.Dataset over the mapped Arrow file
    with caplog.at_level(logging.INFO, logger="flexkd"):
        table = bench.encode_table(bench.data.train)
    assert "tokenising" in caplog.text
    rows = bench.data.train.to_list()
    assert table.take(range(len(rows))) == bench.encode_rows(rows)  # the loop's examples, exactly
    assert table.take([7, 3, 7]) == [table[7], table[3], table[7]]
    meta = json.loads(Path(table.folder, META).read_text())
    assert meta["tokens"] == sum(len(e["input_ids"]) for e in bench.encode_rows(rows))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flexkd"):  # another process (a worker, the next trial) maps it
        again = open_workbench(cfg, need_teacher=False)
        other = again.encode_table(again.data.train)
    assert "tokenising" not in caplog.text and other.folder == table.folder
    assert other.take(range(len(other))) == table.take(range(len(table)))
    # Two tokenising processes write the same examples as one (a folder of its own: the key ignores num_proc).
    two = _config(disk, tmp_path, *reviews, "data.num_proc=2", f"data.cache_dir={tmp_path / 'two'}")
    bench2 = open_workbench(two, need_teacher=False)
    assert bench2.encode_table(bench2.data.train).take(range(len(rows))) == table.take(range(len(rows)))


def test_unseen_rows_of_a_table_equal_those_of_its_rows(tmp_path):
    rows = [
        {"instruction": f"q{i % 7}", "input": None if i % 3 else f"x{i % 2}", "response": "r"}
        for i in range(60)
    ]
    data = load_task_data(
        Data(
            task="instruction", source=str(write_jsonl(tmp_path / "q.jsonl", rows)), val_size=0, test_size=20
        )
    )
    as_list = data.train.to_list()
    probe = data.test + [{"instruction": "new", "input": None, "response": "r"}]
    assert unseen_rows(probe, data.train, "instruction") == unseen_rows(probe, as_list, "instruction")
    assert unseen_rows(probe, data.train, "instruction")[-1]["instruction"] == "new"


def test_a_split_the_dataset_does_not_have_is_one_line_naming_the_key(tmp_path):
    from datasets import Dataset

    raw = {
        "train": Dataset.from_list([{"text": "a", "label": 0}] * 4),
        "test": Dataset.from_list([{"text": "b", "label": 0}]),
    }
    with pytest.raises(
        ConfigError, match=r"^data.val_split: some/hub has no split 'validation'; it has train, test$"
    ):
        split_task_data(raw, Data(source="some/hub", val_split="validation"))
    with pytest.raises(ConfigError, match=r"^data.train_split: some/hub has no split 'full'"):
        split_task_data(raw, Data(source="some/hub", train_split="full"))


# ---------------------------------------------------------------------------------------------------------
# Runs from mapped signals


def test_a_run_from_mapped_signals_resumes_mid_epoch_exactly(disk, tmp_path):
    """48 examples, batch 8: the checkpoint at step 3 is mid-epoch (an epoch is 6 steps)."""
    # Logged every 3 steps, as checkpointed: the resumed run's windows are the uninterrupted run's.
    cfg = _config(
        disk, tmp_path, "train.steps=9", "train.checkpoint_every=3", "train.eval_every=0", "train.log_every=3"
    )
    plan = preflight(cfg)
    bench = open_workbench(cfg, need_teacher=False)
    bp = sig.plan_build(cfg, bench, plan.teacher_layers)
    sig.build_in_process(cfg, bp, bench.data.label_names)
    sig.attach(cfg, plan)
    assert plan.signals and not plan.loads_teacher
    kept, reports = {}, {}

    def report(metrics, step, checkpoint=None):
        reports.setdefault(step, metrics)
        if checkpoint:
            kept[step] = shutil.move(checkpoint, tmp_path / f"ckpt{step}")

    full = train(cfg, report, plan=plan)
    assert reports[9]["event/signal_shards"] == {"shards": 3, "read_by_rank": [[0, 1, 2]]}
    resumed = {}
    again = train(cfg, lambda m, s, c=None: resumed.setdefault(s, m), plan=plan, resume_from=str(kept[3]))
    assert min(resumed) > 3
    for step in (6, 9):
        for key in ("train/loss", "train/loss_kd", "train/loss_feat"):
            assert resumed[step][key] == pytest.approx(reports[step][key], rel=1e-6, abs=1e-7), (step, key)
    assert again["val/accuracy"] == full["val/accuracy"]
