"""The scoring pass: the teacher's units scored on the scoring set (sharded over ranks, cached), then selected.

Runs once per run before the loop, and alone for `flexkd score`. The math of one batch is
``flexkd.scoring``; the pick of k units is ``flexkd.selection``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING

import torch

from flexkd.config import Config
from flexkd.data import shard_batches
from flexkd.distributed import all_reduce_sum, is_distributed, rank, world_size
from flexkd.models import hidden_size
from flexkd.plan import RunPlan
from flexkd.scoring import ScoreSet, UnitScores, score_units
from flexkd.selection import LayerSelection, select
from flexkd.workbench import Workbench, open_workbench

if TYPE_CHECKING:
    from flexkd.scorecache import ScoreCache

log = logging.getLogger("flexkd")
PROGRESS_EVERY_S = 5.0  # seconds between the scoring pass's progress lines


class ScoringProgress:
    """``score_units``'s progress callback: a ``scoring: 24/64 batches, 10s elapsed, eta 17s`` line on the
    ``flexkd`` logger (stderr on the CLI; --quiet silences it) every ``every_s`` seconds, rank 0 only."""

    def __init__(self, total: int, every_s: float | None = None, clock=time.perf_counter):
        self.total, self.clock = total, clock
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.start = self.last = clock()

    def __call__(self, done: int) -> None:
        now = self.clock()
        if done >= self.total or now - self.last < self.every_s or rank() != 0:
            return  # the last batch is followed by the "scored ..." line
        self.last = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done)
        log.info("scoring: %d/%d batches, %.0fs elapsed, eta %.0fs", done, self.total, elapsed, eta)


def compute_scores(bench: Workbench, teacher_layers: list[int], cache: ScoreCache | None = None) -> ScoreSet:
    """Score the teacher's ``teacher_layers`` on the scoring set, sharded over ranks, sums all-reduced.

    Shards are whole scoring batches dealt round-robin, so N workers reproduce one worker's scores.
    """
    cfg = bench.cfg
    rows = bench.data.scoring_set(cfg.scoring.num_examples, cfg.data.split_seed)
    dim = hidden_size(bench.teacher_config)

    def compute() -> ScoreSet:
        examples = bench.encode_rows(rows)
        mine = shard_batches(len(examples), cfg.scoring.batch_size, rank(), world_size())
        teacher = bench.load_teacher()  # a run from cached signals loads it for this pass only
        start = time.perf_counter()
        if rank() == 0:
            log.info(
                "scoring %d examples on teacher layers %s: %d batches of %d%s",
                len(examples),
                teacher_layers,
                len(mine),
                cfg.scoring.batch_size,
                f" per worker ({world_size()} workers)" if world_size() > 1 else "",
            )
        scores = score_units(
            teacher,
            (bench.batch([examples[i] for i in r]) for r in mine),
            teacher_layers,
            dim,
            progress=ScoringProgress(len(mine)),
        )
        if is_distributed():
            scores = scores.unflatten(all_reduce_sum(scores.flatten()))
        tokens = next(iter(scores.layers.values())).tokens
        bench.scoring_seconds = time.perf_counter() - start
        log.info("scored %d examples (%d tokens) in %.1fs", scores.examples, tokens, bench.scoring_seconds)
        return scores

    if cache is None:
        return compute()
    # What the scores depend on: the teacher (the cache fingerprints its files), the scoring rows
    # themselves, how they are tokenised, the batch cut and the layers.
    key = {
        "teacher": cfg.teacher.path,
        "rows": hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest(),
        "tokenization": [cfg.data.task, cfg.data.template, cfg.data.max_length, cfg.data.max_response_length],
        "batch_size": cfg.scoring.batch_size,
        "layers": teacher_layers,
    }
    key = cache.key(key)
    # Rank 0 alone locks and reads (the other ranks could not wait on the lock and still join the collective
    # scoring pass); one all-reduce tells every rank whether it hit, another carries the hit's sums.
    with cache.lock(key) if rank() == 0 else contextlib.nullcontext():
        found = cache.load(key) if rank() == 0 else None
        hit = all_reduce_sum(torch.tensor([1.0 if found is not None else 0.0], dtype=torch.float64))
        if hit.item() > 0:
            layout = ScoreSet({layer: UnitScores.zeros(layer, dim) for layer in teacher_layers})
            flat = found.flatten() if found is not None else torch.zeros_like(layout.flatten())
            return layout.unflatten(all_reduce_sum(flat))
        scores = compute()
        if rank() == 0:
            cache.save(key, scores)
        return scores


def compute_selection(
    bench: Workbench, plan: RunPlan, cache: ScoreCache | None = None
) -> tuple[list[LayerSelection], ScoreSet]:
    """Score the plan's mapped teacher layers, then pick ``plan.k`` units per pair (``selection.strategy``)."""
    cfg = bench.cfg
    scores = compute_scores(bench, sorted({t for t, _ in plan.layer_map}), cache)
    selections = select(
        scores, plan.layer_map, cfg.selection.strategy, cfg.scoring.method, plan.k, cfg.run.seed
    )
    return selections, scores


def score_and_select(cfg: Config, plan: RunPlan) -> tuple[list[LayerSelection], ScoreSet]:
    """What `flexkd score` computes (on every rank when distributed): the selection and the scores."""
    return compute_selection(open_workbench(cfg, need_teacher=True), plan)


def selection_meta(cfg: Config) -> dict:
    return {
        "teacher": cfg.teacher.path,
        "method": cfg.scoring.method,
        "strategy": cfg.selection.strategy,
        "scoring_batch_size": cfg.scoring.batch_size,
        "scoring_examples": cfg.scoring.num_examples,
    }
