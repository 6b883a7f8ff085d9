"""The Pareto front against a different algorithm (a sorted sweep for two objectives) and hand-made cases."""

from __future__ import annotations

import random

from tuning.pareto import dominates, front


def skyline(points: dict[str, tuple[float, float]]) -> set[str]:
    """Two objectives, max then min: sort by the first (best first, ties by the second), keep a point when
    its second beats every point before it; equal points all stay."""
    order = sorted(points, key=lambda k: (-points[k][0], points[k][1]))
    kept, best = [], None
    for k in order:
        x, y = points[k]
        if best is None or y < best[1] or (x, y) == best:
            kept.append(k)
            best = (x, y) if best is None or y < best[1] else best
    return set(kept)


def test_front_matches_a_sorted_sweep_on_random_points():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 30)
        points = {f"t{i}": (rng.choice([0.5, 0.6, 0.7, 0.8]), rng.choice([1.0, 2.0, 3.0])) for i in range(n)}
        assert set(front(points, ["max", "min"])) == skyline(points), (trial, points)


def test_hand_made_front_and_its_order():
    points = {"a": (0.9, 30.0), "b": (0.8, 10.0), "c": (0.7, 20.0), "d": (0.9, 30.0), "e": (0.6, 5.0)}
    assert front(points, ["max", "min"]) == ["a", "d", "b", "e"]  # c: b is better on both
    assert dominates((0.8, 10.0), (0.7, 20.0), ["max", "min"])
    assert not dominates((0.9, 30.0), (0.9, 30.0), ["max", "min"])  # equal: neither dominates
    three = {"x": (1, 1, 1), "y": (1, 1, 2), "z": (0, 0, 3), "w": (2, 0, 3)}
    assert front(three, ["max", "max", "min"]) == ["w", "x"]  # y, z: x is as good or better on all three
