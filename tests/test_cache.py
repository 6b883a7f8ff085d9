"""The score cache: content-keyed, reused, and computed once when two trials ask at the same time."""

from __future__ import annotations

import threading
import time

import torch

from flexkd.scorecache import ScoreCache
from flexkd.scoring import SCORERS, ScoreSet, UnitScores


def get(cache: ScoreCache, material: dict, compute) -> ScoreSet:
    """The loop's single-process protocol (flexkd.train.compute_scores with one rank)."""
    key = cache.key(material)
    with cache.lock(key):
        found = cache.load(key)
        if found is None:
            found = compute()
            cache.save(key, found)
        return found


def fake_scores(seed: float) -> ScoreSet:
    unit = UnitScores(
        3,
        {m: torch.full((4,), seed + i, dtype=torch.float64) for i, m in enumerate(SCORERS)},
        torch.arange(4.0, dtype=torch.float64),
        torch.ones(4, dtype=torch.float64),
        17,
    )
    return ScoreSet({3: unit}, examples=5)


def material(teacher, **over):
    return {
        "teacher": str(teacher),
        "rows": "abc",
        "tokenization": ["classification", "", 40, 64],
        "batch_size": 8,
        "layers": [3],
        **over,
    }


def test_second_request_is_a_hit_with_identical_scores(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"weights-v1")
    cache = ScoreCache(str(tmp_path / "cache"))
    calls = []
    first = get(cache, material(teacher), lambda: calls.append(1) or fake_scores(1.0))
    again = get(cache, material(teacher), lambda: calls.append(1) or fake_scores(9.0))
    assert calls == [1] and (cache.hits, cache.misses) == (1, 1)
    assert again.examples == 5 and again.layers[3].tokens == 17
    for m in SCORERS:
        torch.testing.assert_close(again.layers[3].sums[m], first.layers[3].sums[m])


def test_other_settings_or_a_changed_teacher_are_other_keys(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"weights-v1")
    cache = ScoreCache(str(tmp_path / "cache"))
    calls = []
    compute = lambda: calls.append(1) or fake_scores(1.0)  # noqa: E731
    get(cache, material(teacher), compute)
    get(cache, material(teacher, batch_size=16), compute)
    get(cache, material(teacher, rows="other rows"), compute)
    (teacher / "model.safetensors").write_bytes(b"weights-v2, fine-tuned again")
    get(cache, material(teacher), compute)
    assert len(calls) == 4


def test_two_trials_asking_at_once_score_once(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    calls = []

    def slow():
        calls.append(1)
        time.sleep(1.0)
        return fake_scores(2.0)

    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(get(ScoreCache(str(tmp_path / "c")), material(teacher), slow))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2
    assert list((tmp_path / "c").glob("*.pt")) and not list(
        (tmp_path / "c").glob(".*.pt.*")
    )  # no temp leftovers
