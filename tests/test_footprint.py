"""A student's footprint: its size against the file it saves to, its latency measured like the docstring says."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from flexkd import demo
from flexkd.footprint import LATENCY_KEY, footprint

from .fixtures import save_model


def inputs_of(task: str, n: int) -> tuple[list[list[int]], int]:
    tok = demo.build_tokenizer(task)
    rows = demo.make_split("validation", "classification")[:n]
    return [tok(r["text"])["input_ids"] for r in rows], tok.pad_token_id


def test_size_is_the_saved_weights_and_the_parameter_count_a_loop_gives(tmp_path):
    folder = save_model(tmp_path / "m", "classification", hidden=32, layers=2)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    ids, pad = inputs_of("classification", 40)
    got = footprint(model, ids, pad, torch.device("cpu"), batch=16, repeats=3, warmup=1)
    count = 0
    for _, p in model.named_parameters():  # the obvious count
        count += math.prod(p.shape)
    assert got["perf/student_params"] == count
    # safetensors: an 8-byte length, a JSON header, then exactly the tensors' bytes
    on_disk = (folder / "model.safetensors").stat().st_size
    header = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little") + 8
    assert round(got["perf/student_mb"] * 1e6) == on_disk - header  # what was saved, tied weights once
    assert got[LATENCY_KEY] > 0 and got["perf/latency_b16_ms"] > 0
    assert got["perf/throughput"] == 16 / (got["perf/latency_b16_ms"] / 1e3)


def test_mode_is_restored_and_a_bigger_student_costs_more(tmp_path):
    ids, pad = inputs_of("instruction", 8)
    small = AutoModelForCausalLM.from_pretrained(save_model(tmp_path / "s", "instruction", 16, 1))
    big = AutoModelForCausalLM.from_pretrained(save_model(tmp_path / "b", "instruction", 64, 4))
    small.train()
    a = footprint(small, ids, pad, torch.device("cpu"), batch=8, repeats=3, warmup=1)
    b = footprint(big, ids, pad, torch.device("cpu"), batch=8, repeats=3, warmup=1)
    assert small.training  # put back as it was
    assert (
        b["perf/student_params"] > 4 * a["perf/student_params"]
        and b["perf/student_mb"] > a["perf/student_mb"]
    )
    assert "perf/latency_b8_ms" in a and a["perf/throughput"] > 0
