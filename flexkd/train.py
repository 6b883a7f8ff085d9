"""The distillation loop: score -> select -> optimise -> evaluate -> checkpoint, top to bottom.

``train(cfg, report)`` is the one code path. It runs in a test, in a plain process (`flexkd train`), in each
Ray Train worker and inside a Tune trial; only ``report`` differs. Under Ray Train the process group exists
before ``train`` starts, and the loop shards data, scoring and evaluation across it with plain
``torch.distributed``. It imports no Ray and no MLflow.

``report(metrics: dict[str, float], step: int, checkpoint: str | None)`` is called the same number of times
on every rank; only rank 0 passes a checkpoint folder (see ``flexkd.artifacts`` for its layout). The folder
lives for the call only: ``report`` moves or uploads what it wants to keep, and the loop deletes what is left.
``flexkd.reporting.RunRecorder`` is the report every mode ends in.

Set-up lives in ``flexkd.workbench``, the plan in ``flexkd.plan``, the loss terms in ``flexkd.objective``,
the scoring pass in ``flexkd.scorepass`` and checkpoints in ``flexkd.checkpoint``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from transformers import get_scheduler

from flexkd import checkpoint as ckpt
from flexkd.config import Config
from flexkd.data import describe_splits, model_inputs, rank_batches, rows_of, unseen_rows
from flexkd.distributed import (
    all_reduce_sum,
    gather_objects,
    loss_group,
    rank,
    world_size,
    wrap_distributed,
)
from flexkd.evaluation import evaluate
from flexkd.models import build_student, hidden_size
from flexkd.objective import Objective
from flexkd.plan import RunPlan
from flexkd.scorepass import compute_selection
from flexkd.selection import LayerSelection
from flexkd.signals import SignalReader
from flexkd.workbench import open_workbench

if TYPE_CHECKING:
    from flexkd.scorecache import ScoreCache

log = logging.getLogger("flexkd")
Report = Callable[..., None]


def null_report(metrics: dict, step: int, checkpoint: str | None = None) -> None:
    pass


def train(
    cfg: Config,
    report: Report = null_report,
    *,
    plan: RunPlan | None = None,
    resume_from: str | None = None,
    score_cache: ScoreCache | None = None,
) -> dict:
    """Distil (or, with no teacher term, fine-tune) the student; return the final metrics.

    plan: what ``flexkd.checks.preflight`` established on the driver (computed here when not given).

    resume_from: a checkpoint folder; training continues after its step with its selection (never rescored).
    A resumed run reports the steps after the checkpoint again, with the same values (the data order is a
    function of the step); consumers keep the first report of each step.

    Besides ``train/``, ``val/``, ``test/`` and ``perf/`` metrics, the first report after a scoring pass
    carries ``event/scored_s`` (its seconds; ``event/scores_cached`` when the cache had them) and the first after
    a resume ``event/resumed_from_step``. The first report also says where the teacher's outputs came from:
    ``event/teacher_source`` (cached | live | none) and ``event/teacher_loads`` (times this process loaded the
    teacher's weights: 0 for a run from cached signals whose scores were cached too).

    With ``plan.signals`` (``flexkd.signals.attach``) the loop reads the teacher's outputs from that cache by
    training-example index and never loads the teacher, except for a scoring pass that misses its cache.
    """
    # --- setup ---------------------------------------------------------------------------------------
    entered = time.perf_counter()
    if plan is None:
        from flexkd.checks import preflight

        plan = preflight(cfg)
    if score_cache is None and (cfg.scoring.cache or plan.signals):
        from flexkd.scorecache import ScoreCache

        # A run from cached signals keeps its scores beside them, so the next such run loads no teacher at all.
        score_cache = ScoreCache(cfg.scoring.cache or f"{cfg.signals.path}/score-cache")
    torch.manual_seed(cfg.run.seed)
    bench = open_workbench(cfg, plan.loads_teacher)
    device, data = bench.device, bench.data
    signals = None
    if plan.signals:
        signals = SignalReader(
            plan.signals, cache_gb=cfg.signals.local_cache_gb, cache_dir=cfg.signals.local_cache_dir
        )
    world, me = world_size(), rank()
    limit = cfg.eval.max_examples or None
    val_rows, test_rows = rows_of(data.val, limit), rows_of(data.test, limit)
    # The train split is tokenised once per data and tokenizer (by whichever process comes first) into
    # memory-mapped Arrow files; this process reads the examples of its batches and holds no other.
    train_examples = bench.encode_table(data.train)
    val_examples = bench.encode_rows(val_rows)
    test_examples = bench.encode_rows(test_rows)
    log.info(
        "data: %d train / %d val / %d test examples; %d worker(s)",
        len(train_examples),
        len(val_examples),
        len(test_examples),
        world,
    )
    for split, rows in (("val", val_rows), ("test", test_rows)):
        repeats = len(rows) - len(unseen_rows(rows, data.train, cfg.data.task))
        if repeats:
            log.warning(
                "data: %d of %d %s rows ask what a training row asks (same input); their metrics measure"
                " recall of the training set. `flexkd eval ... --split %s-unseen` scores only the others",
                repeats,
                len(rows),
                split,
                split,
            )

    if signals is not None:
        signals.check_covers(
            len(train_examples)
        )  # shards are opened (and checked) when a batch first reads them
        log.info("teacher signals: %d examples from %s", signals.examples, signals.folder)

    data_ready = time.perf_counter()

    # --- models --------------------------------------------------------------------------------------
    if resume_from:
        student = ckpt.load_student(resume_from, cfg.data.task)
    else:
        student = build_student(cfg, bench.tok_s, data.label_names, bench.teacher_config)
    student.to(device).train()
    layer_map = plan.layer_map
    projector = None
    if "feat" in plan.terms and cfg.feature.loss == "projector":
        torch.manual_seed(cfg.run.seed + 1)
        d_s, d_t = hidden_size(student.config), plan.teacher.hidden
        projector = torch.nn.ModuleList(torch.nn.Linear(d_s, d_t) for _ in layer_map).to(device)
        if resume_from:
            ckpt.load_projector(resume_from, projector, device)

    models_ready = time.perf_counter()

    # --- score and select (once; a resumed run reads the selection from its checkpoint) ------------------
    selections: list[LayerSelection] = []
    events: dict = {}  # one-off facts, sent with the next report
    if plan.selects_units:
        if resume_from:
            selections = ckpt.load_selections(resume_from)
            log.info("selection restored from the checkpoint (not rescored)")
        else:
            selections, _ = compute_selection(bench, plan, score_cache)
            if bench.scoring_seconds is not None:
                events["event/scored_s"] = bench.scoring_seconds
            else:
                events["event/scores_cached"] = 1.0
    if signals is not None:
        bench.release_teacher()  # loaded only if the scoring pass missed its cache
        columns = [signals.unit_columns(s.teacher_layer, s.indices) for s in selections]
    else:
        columns = [s.indices for s in selections]
    units = [torch.tensor(c, device=device) for c in columns] or [None] * len(layer_map)
    teacher = bench.teacher
    events["event/datasets"] = describe_splits(
        cfg.data, {"train": data.train, "validation": val_rows, "test": test_rows}
    )
    events["event/examples"] = model_inputs(cfg.data, val_rows or rows_of(data.train, 2), bench.tok_s)
    events["event/teacher_source"] = "cached" if signals else ("live" if teacher is not None else "none")
    events["event/teacher_loads"] = bench.teacher_loads
    signal_layers = plan.teacher_layers if "feat" in plan.terms else []

    # --- wrap for data parallelism (the student only: the teacher has no gradients to synchronise) ---------
    # The projector is small and called layer by layer, so its gradients are averaged by hand (below).
    model = wrap_distributed(student, cfg.scaling.strategy, device) if world > 1 else student

    # --- optimiser and schedule ------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    if projector is not None:
        params += list(projector.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms: weight decay only hurts them
    # The fused kernel updates every parameter in one pass. On CPU torch's default is the per-tensor loop,
    # a fifth of a MiniLM-L3 step here (benchmarks/cpu_step.py compares them); the state it
    # keeps is the same, so checkpoints move between the two.
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        fused=device.type in ("cpu", "cuda"),
    )
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        cfg.optim.schedule
    ]
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.steps
    )
    start_step = 0
    if resume_from:
        start_step = ckpt.restore_trainer(resume_from, model, optimizer, scheduler)
        events["event/resumed_from_step"] = start_step
        log.info("resumed at step %d of %d", start_step, cfg.train.steps)

    # The feature loss sums its statistics over the ranks (none with one), so each accumulation step's term is
    # that of the global micro-batch, the union of the ranks' micro-batch a; the step's is their mean over a.
    objective = Objective(
        cfg, teacher, layer_map, units, projector, vocab=len(bench.tok_s), group=loss_group()
    )
    accum = cfg.train.grad_accum
    n_train = len(train_examples)
    running: dict[str, float] = {}
    tokens_seen, window_steps = 0, 0
    window_start = time.perf_counter()
    final_metrics: dict = {}

    def read(step: int, a: int):
        """Micro-batch ``a`` of ``step`` on the device: its rows read from the table, its teacher signals
        gathered from the shards holding them (called one micro-batch ahead, in a thread: see below)."""
        micro = rank_batches(
            step - 1,
            cfg.train.batch_size,
            n_train,
            cfg.run.seed,
            me,
            world,
            accum,
            cfg.signals.shard_examples,
        )[a]
        examples = train_examples.take(micro)
        batch = bench.batch(examples)
        if signals is not None:
            lengths = [len(e["input_ids"]) for e in examples]
            batch["signals"] = signals.gather(micro, lengths, signal_layers, cfg.kd.temperature, device)
        return batch

    # The next micro-batch is read while this one trains: reading the mapped table and shards (and, on a
    # GPU, the pinned host-to-device copy) overlaps the step instead of adding to it.
    ahead = ThreadPoolExecutor(1, thread_name_prefix="flexkd-read")
    order = [(s, a) for s in range(start_step + 1, cfg.train.steps + 1) for a in range(accum)]
    pending = ahead.submit(read, *order[0]) if order else None
    position = 0

    loop_started = time.perf_counter()
    for step in range(start_step + 1, cfg.train.steps + 1):
        # --- one optimiser step over the global batch: this rank's micro-batches, gradients accumulated ---
        # Dropout draws from a generator seeded by (seed, step, rank): a resumed run, on any rank, repeats
        # the draws of the run it continues without saving RNG states.
        torch.manual_seed((cfg.run.seed * 1_000_003 + step) * 1009 + me)
        for a in range(accum):
            batch = pending.result()
            position += 1
            pending = ahead.submit(read, *order[position]) if position < len(order) else None
            # DDP averages gradients on every backward; only the last micro-batch needs to.
            sync = contextlib.nullcontext() if (a == accum - 1 or world == 1) else model.no_sync()
            with sync:
                terms = objective(model, batch)
                loss = objective.total(terms)
                (loss / accum).backward()
            for name, value in terms.items():
                running[name] = running.get(name, 0.0) + float(value.detach()) / accum
            running["loss"] = running.get("loss", 0.0) + float(loss.detach()) / accum
            tokens_seen += int(batch["attention_mask"].sum())
        window_steps += 1
        if projector is not None and world > 1:
            for p in projector.parameters():
                p.grad = all_reduce_sum(p.grad) / world
        if cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # --- report, evaluate, checkpoint ------------------------------------------------------------------
        metrics: dict = {}
        last = step == cfg.train.steps
        log_now = step % cfg.train.log_every == 0 or last
        eval_now = bool(cfg.train.eval_every and step % cfg.train.eval_every == 0) or last
        ckpt_now = bool(cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or last
        if log_now:
            names = sorted(running)
            totals = all_reduce_sum(
                torch.tensor([running[n] for n in names] + [tokens_seen], dtype=torch.float64)
            )
            elapsed = time.perf_counter() - window_start
            for n, v in zip(names, totals[:-1].tolist()):
                metrics["train/loss" if n == "loss" else f"train/loss_{n}"] = v / world / window_steps
            metrics["train/lr"] = scheduler.get_last_lr()[0]
            metrics["perf/tokens_per_s"] = float(totals[-1]) / max(elapsed, 1e-9)
            metrics["perf/step_s"] = elapsed / window_steps
            running, tokens_seen, window_steps, window_start = {}, 0, 0, time.perf_counter()
            if not all(math.isfinite(v) for v in metrics.values()):
                raise FloatingPointError(
                    f"step {step}: non-finite loss {metrics}; lower optim.lr or check the data"
                )
        if eval_now:
            metrics.update(evaluate(model, val_examples, val_rows, cfg, bench.tok_s, device, "val"))
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if last and test_examples:
            metrics.update(evaluate(model, test_examples, test_rows, cfg, bench.tok_s, device, "test"))
        cost = {}
        if last:  # what the student costs to keep and to run, measured alike in every run (every rank: FSDP)
            cost = student_cost(
                model,
                cfg,
                val_rows or rows_of(data.train, FOOTPRINT_INPUTS),
                val_examples or train_examples.take(range(min(FOOTPRINT_INPUTS, n_train))),
                bench,
                device,
            )
            metrics.update(cost)
        if last and signals is not None:  # which shards each rank read: its own, under several workers
            read_by_rank = gather_objects(sorted(int(name[6:11]) for name in signals.opened))
            events["event/signal_shards"] = {"shards": len(signals.shards), "read_by_rank": read_by_rank}
        checkpoint = None
        if ckpt_now:
            if last:
                final_metrics = {k: v for k, v in metrics.items() if not k.startswith(("perf/", "event/"))}
                final_metrics["step"] = step
                # Where this process's time went: set-up (data, models, scoring) and the steps with evaluation.
                final_metrics["perf/setup_s"] = loop_started - entered
                final_metrics["perf/setup_data_s"] = data_ready - entered  # tokenizers, data, teacher load
                final_metrics["perf/setup_student_s"] = models_ready - data_ready
                final_metrics["perf/setup_selection_s"] = loop_started - models_ready  # scoring or cache
                final_metrics["perf/loop_s"] = time.perf_counter() - loop_started
                final_metrics.update(cost)
            states = ckpt.full_states(model, optimizer)  # every rank: under FSDP this is a gather
            if me == 0:
                checkpoint = ckpt.save(
                    cfg,
                    model,
                    bench.tok_s,
                    projector,
                    selections,
                    states,
                    scheduler,
                    step,
                    final_metrics if last else None,
                )
        if log_now or eval_now or ckpt_now:  # the same steps on every rank
            metrics.update(events)
            events.clear()
            try:
                report(metrics, step, checkpoint)
            finally:
                if checkpoint:  # moved or uploaded by now, if the reporter keeps checkpoints
                    shutil.rmtree(checkpoint, ignore_errors=True)
    ahead.shutdown()
    return final_metrics


FOOTPRINT_INPUTS = 32  # the first validation examples: the fixed inputs every run's student is timed on


def student_cost(model, cfg: Config, rows: list[dict], examples: list[dict], bench, device) -> dict:
    """flexkd/footprint.py on the run's first validation inputs: the whole text of a classifier's examples,
    the prompt (the prefill before decoding) of a causal LM's."""
    from flexkd.data import encode_prompt
    from flexkd.footprint import footprint

    if cfg.data.task == "classification":
        inputs = [e["input_ids"] for e in examples[:FOOTPRINT_INPUTS]]
    else:
        inputs = [encode_prompt(r, bench.tok_s, cfg.data) for r in rows[:FOOTPRINT_INPUTS]]
    return footprint(model, inputs, bench.tok_s.pad_token_id, device, batch=FOOTPRINT_INPUTS)
