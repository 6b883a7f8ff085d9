"""Shared fixtures: tiny models built from configs, tiny data, offline settings."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One tokenised-table cache for the session, outside the checkout (runs share it, as a sweep's trials do).
_OWN_DATA_CACHE = "FLEXKD_DATA_CACHE" not in os.environ
os.environ.setdefault(
    "FLEXKD_DATA_CACHE", os.path.join(tempfile.gettempdir(), f"flexkd-test-data-{os.getuid()}-{os.getpid()}")
)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def disk(tmp_path_factory):
    """Tiny model folders and data files shared by the tests that load them by path."""
    from flexkd import demo

    from .fixtures import other_tokenizer, save_model, write_jsonl

    root = tmp_path_factory.mktemp("disk")
    rows = demo.make_split("train", "classification")[:300]
    paths = {
        "teacher_cls": save_model(root / "teacher_cls", "classification", hidden=32, layers=2),
        "student_cls": save_model(root / "student_cls", "classification", hidden=16, layers=2, seed=1),
        "student_other_tok": save_model(
            root / "student_other_tok", "classification", 16, 2, tokenizer=other_tokenizer()
        ),
        "teacher_lm": save_model(root / "teacher_lm", "instruction", hidden=32, layers=2),
        "student_lm": save_model(root / "student_lm", "instruction", hidden=16, layers=2, seed=1),
        "reviews": write_jsonl(
            root / "reviews.jsonl", [{"review": r["text"], "sentiment": r["label"]} for r in rows]
        ),
        "tiny_rows": write_jsonl(root / "tiny.jsonl", rows[:5]),
        "empty": write_jsonl(root / "empty.jsonl", []),
    }
    return paths


@pytest.fixture(scope="session")
def ray_cluster():
    """One private local Ray cluster for every Ray test (address='local': never a stranger's cluster).

    4 logical CPUs on a 2-core machine: a trial driver plus two Train workers fit at once. Shut down at the
    end of the session, which ends only the processes this cluster started.
    """
    import ray

    from tuning.session import start_ray

    start_ray(num_cpus=4, quiet=True)
    yield ray
    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    import shutil

    if _OWN_DATA_CACHE:
        shutil.rmtree(os.environ["FLEXKD_DATA_CACHE"], ignore_errors=True)
