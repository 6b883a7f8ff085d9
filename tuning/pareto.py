"""Several objectives: which trials no other trial beats on every one of them (the Pareto front), and the
aliases a user picks a front member by.

A trial ``a`` dominates ``b`` when it is at least as good on every objective and better on one ("good"
follows each objective's mode). The front is the completed trials no completed trial dominates; trials
with equal values on every objective are all on it. Its members are ordered by the first objective, best
first, and numbered from 1: the registry aliases them ``pareto-1``, ``pareto-2`` ... in that order.
"""

from __future__ import annotations

from collections.abc import Sequence


def better_or_equal(a: float, b: float, mode: str) -> bool:
    return a >= b if mode == "max" else a <= b


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    return all(better_or_equal(x, y, m) for x, y, m in zip(a, b, modes)) and any(x != y for x, y in zip(a, b))


def front(values: dict[str, Sequence[float]], modes: Sequence[str]) -> list[str]:
    """Keys of the non-dominated points of ``values`` (key -> one value per objective), ordered by the first
    objective, best first (ties broken by the next objectives, then the key)."""
    keep = [k for k, v in values.items() if not any(dominates(w, v, modes) for w in values.values())]
    signs = [-1 if m == "max" else 1 for m in modes]
    return sorted(keep, key=lambda k: ([s * x for s, x in zip(signs, values[k])], k))
