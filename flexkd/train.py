"""The distillation loop: score -> select -> optimise -> evaluate -> checkpoint, top to bottom.

``train(cfg, report)`` is the one code path. It runs in a test, in a plain process (`flexkd train`), in each
Ray Train worker and inside a Tune trial; only ``report`` differs. Under Ray Train the process group exists
before ``train`` starts, and the loop shards data, scoring and evaluation across it with plain
``torch.distributed``. It imports no Ray and no MLflow.

``report(metrics: dict[str, float], step: int, checkpoint: str | None)`` is called the same number of times
on every rank; only rank 0 passes a checkpoint folder (see ``flexkd.artifacts`` for its layout). The folder
lives for the call only: ``report`` moves or uploads what it wants to keep, and the loop deletes what is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoConfig, get_scheduler

from flexkd import artifacts
from flexkd.checks import teacher_ready
from flexkd.config import (
    Config,
    ConfigError,
    dump_yaml,
    resolve_layer_map,
    uses_features,
    uses_selection,
    uses_teacher,
)
from flexkd.data import (
    IGNORE,
    TaskData,
    collate,
    encode,
    load_task_data,
    micro_batches,
    shard_batches,
    step_indices,
)
from flexkd.distributed import all_reduce_sum, is_distributed, is_sharded, rank, world_size
from flexkd.evaluation import evaluate, unwrap
from flexkd.losses import FEATURE_LOSSES, KD_LOSSES, task_loss
from flexkd.models import (
    build_student,
    config_from_arch,
    hidden_size,
    load_teacher,
    num_layers,
    student_tokenizer,
    teacher_tokenizer,
)
from flexkd.scoring import ScoreSet, UnitScores, score_units
from flexkd.selection import LayerSelection, load_selection, save_selection, select

log = logging.getLogger("flexkd")
Report = Callable[..., None]


class ScoreCache(Protocol):
    """Where scores persist between runs (flexkd.scorecache.ScoreCache); None scores every time."""

    def key(self, material: dict) -> str: ...

    def lock(self, key: str) -> contextlib.AbstractContextManager: ...

    def load(self, key: str) -> ScoreSet | None: ...

    def save(self, key: str, scores: ScoreSet) -> None: ...


def null_report(metrics: dict, step: int, checkpoint: str | None = None) -> None:
    pass


def pick_device(cfg: Config) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device: cuda asked for, but torch sees no CUDA device")
        local = torch.cuda.current_device() if is_distributed() else 0
        return torch.device("cuda", local)
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# What the loop and `flexkd score` both need: tokenizers, data, teacher, student config


@dataclass
class Workbench:
    cfg: Config
    tok_t: object
    tok_s: object
    data: TaskData
    teacher: torch.nn.Module | None
    teacher_config: object | None  # read even when the teacher's weights are not (a student arch copies it)
    device: torch.device
    scoring_seconds: float | None = None  # set when this process ran a scoring pass (not a cache hit)

    def encode_rows(self, rows: list[dict]) -> list[dict]:
        """Encode with the student's tokenizer; add the teacher's ids when its tokenizer differs (same splits)."""
        out = []
        for i, row in enumerate(rows):
            ex = encode(row, self.tok_s, self.cfg.data, self.data.label_names)
            if self.tok_t is not self.tok_s:
                t_ids = encode(row, self.tok_t, self.cfg.data, self.data.label_names)["input_ids"]
                if len(t_ids) != len(ex["input_ids"]):
                    raise ConfigError(
                        f"student.path: teacher and student tokenizers split example {i} differently "
                        f"({len(t_ids)} vs {len(ex['input_ids'])} tokens); positions must align one to one"
                    )
                ex["teacher_input_ids"] = t_ids
            out.append(ex)
        return out

    def batch(self, examples: list[dict]) -> dict:
        pad_t = self.tok_t.pad_token_id if self.tok_t is not self.tok_s else None
        return {k: v.to(self.device) for k, v in collate(examples, self.tok_s.pad_token_id, pad_t).items()}


def open_workbench(cfg: Config, need_teacher: bool) -> Workbench:
    device = pick_device(cfg)
    tok_t = teacher_tokenizer(cfg)
    tok_s = student_tokenizer(cfg, tok_t)
    if cfg.student.path and tok_s.get_vocab() == tok_t.get_vocab():
        tok_s = tok_t  # one vocabulary: encode once
    data = load_task_data(cfg.data)
    teacher = load_teacher(cfg, tok_t, data.label_names).to(device) if need_teacher else None
    if teacher is not None:
        teacher_config = teacher.config
    elif cfg.teacher.path != "demo" and teacher_ready(cfg):
        teacher_config = AutoConfig.from_pretrained(cfg.teacher.path)
    else:
        teacher_config = None  # fine-tuning the teacher itself: its arch names everything
    return Workbench(cfg, tok_t, tok_s, data, teacher, teacher_config, device)


def compute_scores(bench: Workbench, teacher_layers: list[int], cache: ScoreCache | None = None) -> ScoreSet:
    """Score the teacher's ``teacher_layers`` on the scoring set, sharded over ranks, sums all-reduced.

    Shards are whole scoring batches dealt round-robin, so N workers reproduce one worker's scores.
    """
    cfg = bench.cfg
    rows = bench.data.scoring_set(cfg.scoring.num_examples, cfg.data.split_seed)
    dim = hidden_size(bench.teacher.config)

    def compute() -> ScoreSet:
        examples = bench.encode_rows(rows)
        mine = shard_batches(len(examples), cfg.scoring.batch_size, rank(), world_size())
        start = time.perf_counter()
        scores = score_units(
            bench.teacher, (bench.batch([examples[i] for i in r]) for r in mine), teacher_layers, dim
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
    bench: Workbench, layer_map: list[tuple[int, int]], k: int, cache: ScoreCache | None = None
) -> list[LayerSelection]:
    """Score the mapped teacher layers, then pick k units per pair (``selection.strategy``)."""
    cfg = bench.cfg
    scores = compute_scores(bench, sorted({t for t, _ in layer_map}), cache)
    return select(scores, layer_map, cfg.selection.strategy, cfg.scoring.method, k, cfg.run.seed)


def score_and_select(cfg: Config) -> tuple[list[LayerSelection], ScoreSet]:
    """What `flexkd score` computes (on every rank when distributed): the scores and the selection."""
    bench = open_workbench(cfg, need_teacher=True)
    if cfg.student.path:
        student_config = AutoConfig.from_pretrained(cfg.student.path)
    else:
        student_config = config_from_arch(
            cfg.student.arch, bench.tok_s, cfg.data.task, bench.data.label_names, like=bench.teacher_config
        )
    layer_map, k = plan_layers(cfg, bench.teacher_config, student_config)
    scores = compute_scores(bench, sorted({t for t, _ in layer_map}))
    return select(scores, layer_map, cfg.selection.strategy, cfg.scoring.method, k, cfg.run.seed), scores


def selection_meta(cfg: Config) -> dict:
    return {
        "teacher": cfg.teacher.path,
        "method": cfg.scoring.method,
        "strategy": cfg.selection.strategy,
        "scoring_batch_size": cfg.scoring.batch_size,
        "scoring_examples": cfg.scoring.num_examples,
    }


def plan_layers(cfg: Config, teacher_config, student_config) -> tuple[list[tuple[int, int]], int]:
    """The explicit layer map and k (default: the student hidden size), checked against both models."""
    layer_map = resolve_layer_map(cfg.feature.layers, num_layers(teacher_config), num_layers(student_config))
    d_t, d_s = hidden_size(teacher_config), hidden_size(student_config)
    k = cfg.selection.k or d_s
    if uses_selection(cfg) and not 1 <= k <= min(d_t, d_s):
        raise ConfigError(
            f"selection.k: {k} is out of range; it must be 1..{min(d_t, d_s)} (min of teacher {d_t}, student {d_s})"
        )
    return layer_map, k


# ---------------------------------------------------------------------------------------------------------
# The objective


@dataclass
class Objective:
    """The weighted terms of one micro-batch (FLEXKD.md section 3): task CE, logit KD, feature alignment.

    ``objective(model, batch)`` -> {"task": ..., "kd": ..., "feat": ...} (only the terms that are on), each a
    float32 scalar; the loop weights them with ``weights``. The teacher runs under ``no_grad``.
    """

    cfg: Config
    teacher: torch.nn.Module | None
    layer_map: list[tuple[int, int]]
    units: list[torch.Tensor | None]  # per mapped pair: the selected teacher units, or None (projector)
    projector: torch.nn.ModuleList | None
    vocab: int

    @property
    def weights(self) -> dict[str, float]:
        return {"task": self.cfg.task.weight, "kd": self.cfg.kd.weight, "feat": self.cfg.feature.weight}

    def __call__(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        features_on = uses_features(cfg)
        autocast = (
            torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16)
            if cfg.run.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=features_on,
            )
            terms = {"task": task_loss(out.logits, batch["labels"])}
            if self.teacher is None:
                return terms
            with torch.no_grad():
                t_out = self.teacher(
                    input_ids=batch.get("teacher_input_ids", batch["input_ids"]),
                    attention_mask=batch.get("teacher_attention_mask", batch["attention_mask"]),
                    output_hidden_states=features_on,
                )
        loss_mask = batch["labels"] != IGNORE  # (B,) all True for classification; (B, T) response positions
        if cfg.kd.loss != "none" and cfg.kd.weight > 0:
            # Checkpoints may pad the output layer beyond the tokenizer; only real tokens carry probability.
            s_logits, t_logits = out.logits, t_out.logits
            if s_logits.shape[-1] != t_logits.shape[-1]:
                s_logits, t_logits = s_logits[..., : self.vocab], t_logits[..., : self.vocab]
            terms["kd"] = KD_LOSSES[cfg.kd.loss](
                s_logits, t_logits, loss_mask, cfg.kd.temperature, cfg.kd.skew
            )
        if features_on:
            feature_loss = FEATURE_LOSSES[cfg.feature.loss]
            token_mask = batch["attention_mask"].bool() if cfg.feature.tokens == "all" else loss_mask
            per_layer = [
                feature_loss(
                    out.hidden_states[s_layer],
                    t_out.hidden_states[t_layer],
                    token_mask,
                    self.units[i],
                    self.projector[i] if self.projector is not None else None,
                )
                for i, (t_layer, s_layer) in enumerate(self.layer_map)
            ]
            terms["feat"] = torch.stack(per_layer).mean()
        return terms


# ---------------------------------------------------------------------------------------------------------
# The loop


def train(
    cfg: Config,
    report: Report = null_report,
    *,
    resume_from: str | None = None,
    score_cache: ScoreCache | None = None,
) -> dict:
    """Distil (or, with no teacher term, fine-tune) the student; return the final metrics.

    resume_from: a checkpoint folder; training continues after its step with its selection (never rescored).
    A resumed run reports the steps after the checkpoint again, with the same values (the data order is a
    function of the step); consumers keep the first report of each step.

    Besides ``train/``, ``val/``, ``test/`` and ``perf/`` metrics, the first report after a scoring pass
    carries ``event/scored_s`` (its seconds; ``event/scores_cached`` when the cache had them) and the first after
    a resume ``event/resumed_from_step``.
    """
    # --- setup ---------------------------------------------------------------------------------------
    entered = time.perf_counter()
    if score_cache is None and cfg.scoring.cache:
        from flexkd.scorecache import ScoreCache as FileScoreCache

        score_cache = FileScoreCache(cfg.scoring.cache)
    torch.manual_seed(cfg.run.seed)
    need_teacher = uses_teacher(cfg)
    bench = open_workbench(cfg, need_teacher)
    device, data = bench.device, bench.data
    world, me = world_size(), rank()
    limit = cfg.eval.max_examples or None
    val_rows, test_rows = data.val[:limit], data.test[:limit]
    train_examples = bench.encode_rows(data.train)
    val_examples = bench.encode_rows(val_rows)
    test_examples = bench.encode_rows(test_rows)
    log.info(
        "data: %d train / %d val / %d test examples; %d worker(s)",
        len(train_examples),
        len(val_examples),
        len(test_examples),
        world,
    )

    data_ready = time.perf_counter()

    # --- models --------------------------------------------------------------------------------------
    teacher, teacher_config = bench.teacher, bench.teacher_config
    if resume_from:
        # The checkpoint holds the student as a Hugging Face folder; loading it restores the weights exactly.
        from flexkd.models import model_class

        student = model_class(cfg.data.task).from_pretrained(
            Path(resume_from, artifacts.STUDENT), dtype=torch.float32
        )
    else:
        student = build_student(cfg, bench.tok_s, data.label_names, teacher_config)
    student.to(device).train()
    layer_map, k = plan_layers(cfg, teacher_config or student.config, student.config)
    features_on = uses_features(cfg)
    projector = None
    if features_on and cfg.feature.loss == "projector":
        torch.manual_seed(cfg.run.seed + 1)
        d_s, d_t = hidden_size(student.config), hidden_size(teacher_config)
        projector = torch.nn.ModuleList(torch.nn.Linear(d_s, d_t) for _ in layer_map).to(device)
        if resume_from:
            projector.load_state_dict(torch.load(Path(resume_from, artifacts.PROJECTOR), map_location=device))

    models_ready = time.perf_counter()

    # --- score and select (once; a resumed run reads the selection from its checkpoint) ------------------
    selections: list[LayerSelection] = []
    events: dict[str, float] = {}  # one-off facts, sent with the next report
    if uses_selection(cfg):
        if resume_from:
            selections, _ = load_selection(Path(resume_from, artifacts.SELECTION))
            log.info("selection restored from the checkpoint (not rescored)")
        else:
            selections = compute_selection(bench, layer_map, k, score_cache)
            if bench.scoring_seconds is not None:
                events["event/scored_s"] = bench.scoring_seconds
            else:
                events["event/scores_cached"] = 1.0
    units = [torch.tensor(s.indices, device=device) for s in selections] or [None] * len(layer_map)

    # --- wrap for data parallelism (the student only: the teacher has no gradients to synchronise) ---------
    # The projector is small and called layer by layer, so its gradients are averaged by hand (below).
    model = wrap_distributed(student, cfg, device) if world > 1 else student

    # --- optimiser and schedule ------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    if projector is not None:
        params += list(projector.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms: weight decay only hurts them
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
    )
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        cfg.optim.schedule
    ]
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.steps
    )
    start_step = 0
    if resume_from:
        state = torch.load(Path(resume_from, artifacts.TRAINER_STATE), map_location="cpu", weights_only=False)
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        events["event/resumed_from_step"] = start_step
        log.info("resumed at step %d of %d", start_step, cfg.train.steps)

    objective = Objective(cfg, teacher, layer_map, units, projector, vocab=len(bench.tok_s))
    weights = objective.weights
    accum = cfg.train.grad_accum
    n_train = len(train_examples)
    running: dict[str, float] = {}
    tokens_seen, window_steps = 0, 0
    window_start = time.perf_counter()
    final_metrics: dict = {}

    loop_started = time.perf_counter()
    for step in range(start_step + 1, cfg.train.steps + 1):
        # --- one optimiser step over the global batch: this rank's micro-batches, gradients accumulated ---
        indices = step_indices(step - 1, cfg.train.batch_size, n_train, cfg.run.seed)
        # Dropout draws from a generator seeded by (seed, step, rank): a resumed run, on any rank, repeats
        # the draws of the run it continues without saving RNG states.
        torch.manual_seed((cfg.run.seed * 1_000_003 + step) * 1009 + me)
        for a, micro in enumerate(micro_batches(indices, me, world, accum)):
            batch = bench.batch([train_examples[i] for i in micro])
            # DDP averages gradients on every backward; only the last micro-batch needs to.
            sync = contextlib.nullcontext() if (a == accum - 1 or world == 1) else model.no_sync()
            with sync:
                terms = objective(model, batch)
                loss = sum(weights[name] * value for name, value in terms.items())
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
            states = full_states(model, optimizer)  # every rank: under FSDP this is a gather
            if me == 0:
                checkpoint = save_checkpoint(
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
    return final_metrics


# ---------------------------------------------------------------------------------------------------------
# Distribution and checkpoints


def wrap_distributed(student: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` per transformer block, then the root) for large students."""
    if cfg.scaling.strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(student, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(student, "_no_split_modules", None) or [])
    for module in student.modules():
        if type(module).__name__ in block_names:
            fully_shard(module)
    fully_shard(student)
    return student


def full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict]:
    """(model state or None for "the module's own", optimizer state), both unsharded.

    Under FSDP this gathers shards: a collective that every rank must join, even though only rank 0 saves.
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return None, optimizer.state_dict()


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an unsharded optimizer state (as saved by ``save_checkpoint``), resharding it under FSDP."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def save_checkpoint(
    cfg, model, tok, projector, selections, states: tuple[dict | None, dict], scheduler, step, final_metrics
) -> str:
    """Write a checkpoint folder (layout in flexkd.artifacts) and return its path (deleted after ``report``).

    ``states`` is ``full_states(model, optimizer)``, gathered beforehand on every rank.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"flexkd-ckpt-{step:06d}-"))
    model_state, optimizer_state = states
    unwrap(model).save_pretrained(folder / artifacts.STUDENT, state_dict=model_state)
    tok.save_pretrained(folder / artifacts.STUDENT)
    if projector is not None:
        torch.save(unwrap(projector).state_dict(), folder / artifacts.PROJECTOR)
    if selections:
        save_selection(folder / artifacts.SELECTION, selections, selection_meta(cfg))
    (folder / artifacts.CONFIG).write_text(dump_yaml(cfg))
    torch.save(
        {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "step": step,
        },
        folder / artifacts.TRAINER_STATE,
    )
    if final_metrics is not None:
        artifacts.write_metrics(folder, final_metrics)
    return str(folder)
