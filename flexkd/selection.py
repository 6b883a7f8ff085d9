"""Selection of the k teacher units each student layer aligns with, and the ``selection.json`` artifact.

Each selector: (scores: UnitScores, method: str, k: int, seed: int) -> (k,) long indices in ascending order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexkd.scoring import UnitScores

FORMAT_VERSION = 1


def top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, ties broken towards the lower index, returned ascending."""
    order = torch.sort(-values, stable=True).indices  # stable: equal values keep index order
    return torch.sort(order[:k]).values


def select_gradient(scores: UnitScores, method: str, k: int, seed: int) -> torch.Tensor:
    """Flex-KD: the k units with the largest task score."""
    return top_k(scores.scores(method), k)


def select_random(scores: UnitScores, method: str, k: int, seed: int) -> torch.Tensor:
    """k units drawn uniformly, seeded per (seed, layer) so that layers differ and runs repeat."""
    gen = torch.Generator().manual_seed(seed * 1009 + scores.layer)
    return torch.sort(torch.randperm(scores.act_sum.numel(), generator=gen)[:k]).values


def select_variance(scores: UnitScores, method: str, k: int, seed: int) -> torch.Tensor:
    """The k units with the largest activation variance over the scoring set's tokens."""
    return top_k(scores.variance(), k)


def select_first(scores: UnitScores, method: str, k: int, seed: int) -> torch.Tensor:
    """Units 0..k-1 (what truncating the teacher's hidden state would keep)."""
    return torch.arange(k)


SELECTORS: dict[str, Callable[[UnitScores, str, int, int], torch.Tensor]] = {
    "gradient": select_gradient,
    "random": select_random,
    "variance": select_variance,
    "first": select_first,
}


@dataclass
class LayerSelection:
    teacher_layer: int
    student_layer: int
    method: str
    strategy: str
    k: int
    indices: list[int]
    scores: list[float]
    """Per-unit score of ``method`` over all d_T teacher units (sum / token_count), whatever the strategy."""
    token_count: int


def select(
    score_set, layer_map: list[tuple[int, int]], strategy: str, method: str, k: int, seed: int
) -> list[LayerSelection]:
    """One LayerSelection per (teacher, student) pair of the layer map."""
    out = []
    for t_layer, s_layer in layer_map:
        scores = score_set.layers[t_layer]
        idx = SELECTORS[strategy](scores, method, k, seed)
        out.append(
            LayerSelection(
                teacher_layer=t_layer,
                student_layer=s_layer,
                method=method,
                strategy=strategy,
                k=k,
                indices=[int(i) for i in idx],
                scores=[float(v) for v in scores.scores(method)],
                token_count=scores.tokens,
            )
        )
    return out


def save_selection(path: str | Path, selections: list[LayerSelection], meta: dict) -> None:
    """Write ``selection.json``: ``{"format": 1, **meta, "layers": [LayerSelection as dict, ...]}``."""
    doc = {"format": FORMAT_VERSION, **meta, "layers": [asdict(s) for s in selections]}
    Path(path).write_text(json.dumps(doc, indent=1))


def load_selection(path: str | Path) -> tuple[list[LayerSelection], dict]:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: selection format {doc.get('format')!r}, expected {FORMAT_VERSION}")
    layers = [LayerSelection(**item) for item in doc.pop("layers")]
    return layers, doc
