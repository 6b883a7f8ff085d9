"""Whole runs in this process: distil, fine-tune the teacher, score only, evaluate a saved model.

Each is what one `flexkd` subcommand does without Ray; the Ray paths (``tuning``) call the same ``train``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from flexkd import artifacts, signals
from flexkd.checks import (
    check_data,
    check_teacher_recipe,
    missing_teacher,
    preflight,
    teacher_ready,
)
from flexkd.config import Config, ConfigError, dump_yaml, uses_selection, uses_teacher
from flexkd.plan import RunPlan
from flexkd.reporting import METRICS_FILE, RunRecorder, progress_sinks

log = logging.getLogger("flexkd")


def teacher_recipe(cfg: Config) -> Config:
    """The config that fine-tunes the teacher: plain SFT of teacher.base (or teacher.arch) on the same data.

    The fine-tune's own settings are the teacher.* keys (steps, lr, batch_size, warmup_steps, schedule,
    max_length, eval_every); weight decay, clipping, train.log_every, eval.* and run.seed / precision are the
    run's."""
    tokenizer = cfg.teacher.tokenizer or cfg.teacher.base
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(
            cfg.run, name=f"{cfg.run.name}-teacher", output_dir=str(Path(cfg.teacher.path))
        ),
        # The SFT run reads its tokenizer through teacher.path and never loads a teacher model.
        teacher=dataclasses.replace(cfg.teacher, path=tokenizer, auto_prepare=False),
        student=dataclasses.replace(
            cfg.student, path=cfg.teacher.base, arch=dict(cfg.teacher.arch), tokenizer=""
        ),
        kd=dataclasses.replace(cfg.kd, loss="none", weight=0.0),
        feature=dataclasses.replace(cfg.feature, loss="none", weight=0.0),
        task=dataclasses.replace(cfg.task, weight=1.0),
        data=dataclasses.replace(
            cfg.data, max_train_examples=0, max_length=cfg.teacher.max_length or cfg.data.max_length
        ),
        optim=dataclasses.replace(
            cfg.optim,
            lr=cfg.teacher.lr,
            warmup_steps=cfg.teacher.warmup_steps,
            schedule=cfg.teacher.schedule,
        ),
        train=dataclasses.replace(
            cfg.train,
            steps=cfg.teacher.steps,
            batch_size=cfg.teacher.batch_size,
            grad_accum=1,
            eval_every=cfg.teacher.eval_every,
            checkpoint_every=0,
        ),
        scaling=dataclasses.replace(cfg.scaling, num_workers=0),
    )


def prepare_teacher(cfg: Config, quiet: bool = False) -> dict:
    """`flexkd teacher`: fine-tune the teacher and save it as a Hugging Face folder at teacher.path.

    Written to a staging folder and renamed at the end, so an interrupted fine-tune never leaves a
    half-written teacher that a later run would take for a finished one.
    """
    check_teacher_recipe(cfg)
    from flexkd.train import train

    recipe = teacher_recipe(cfg)
    dest = Path(cfg.teacher.path)
    work = dest.with_name(dest.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    every = recipe.train.eval_every
    log.info(
        "fine-tuning the teacher into %s (%d steps, %s)",
        dest,
        recipe.train.steps,
        f"validation every {every} steps" if every else "validation at the end",
    )
    log.info("%s", describe_data(recipe))
    recorder = RunRecorder(work, progress_sinks(recipe.train.steps, quiet), config_text=dump_yaml(recipe))
    metrics = train(recipe, recorder)
    student = recorder.checkpoint_dir / artifacts.STUDENT
    shutil.copytree(student, work / "model")
    artifacts.write_metrics(work / "model", metrics)
    # The fine-tune's curve (train loss, validation every teacher.eval_every steps) stays with the teacher:
    # it is how a user sees whether the teacher converged.
    shutil.copy(work / METRICS_FILE, work / "model" / METRICS_FILE)
    (work / "model" / "flexkd_teacher.yaml").write_text(dump_yaml(recipe))
    if dest.exists():
        shutil.rmtree(dest)
    (work / "model").rename(dest)
    shutil.rmtree(work)
    return metrics


def describe_data(cfg: Config) -> str:
    """The run's ``data: train <- ...`` line: where each split comes from (``flexkd.data.split_origins``)."""
    from flexkd.data import origin_line

    return origin_line(check_data(cfg)[3])


def ensure_teacher(cfg: Config, quiet: bool = False) -> None:
    """Fine-tune the teacher first when the config asks for it and it is missing."""
    if uses_teacher(cfg) and not teacher_ready(cfg):
        if not cfg.teacher.auto_prepare:
            raise missing_teacher(cfg)
        prepare_teacher(cfg, quiet=quiet)


def distil(cfg: Config, plan: RunPlan | None = None, quiet: bool = False, resume: bool = False) -> dict:
    """`flexkd train` without Ray: teacher if needed, the loop, then the artifacts into run.output_dir.

    plan: ``preflight(cfg)``, which the CLI runs before torch is even imported (run here when not given).
    """
    plan = plan or preflight(cfg)
    from flexkd.train import train

    ensure_teacher(cfg, quiet=quiet)
    signals.attach(cfg, plan)
    recorder = RunRecorder(
        cfg.run.output_dir, progress_sinks(cfg.train.steps, quiet), resume=resume, config_text=dump_yaml(cfg)
    )
    resume_from = None
    if resume:
        if not (recorder.checkpoint_dir / artifacts.TRAINER_STATE).exists():
            raise ConfigError(f"--resume: no checkpoint at {recorder.checkpoint_dir}")
        resume_from = str(recorder.checkpoint_dir)
    train(cfg, recorder, plan=plan, resume_from=resume_from)
    return recorder.finish()


def check_scoring(cfg: Config) -> RunPlan:
    """The checks of `flexkd score`; returns the run plan."""
    if not uses_selection(cfg):
        raise ConfigError(
            f"feature.loss: {cfg.feature.loss!r} selects no teacher units; scoring applies to pearson and mse_std"
        )
    plan = preflight(cfg)
    ensure_teacher(cfg)
    return plan


def score_only(cfg: Config, plan: RunPlan | None = None) -> Path:
    """`flexkd score` in this process: score and select, write ``run.output_dir/selection.json`` only."""
    from flexkd.scorepass import score_and_select

    plan = plan or check_scoring(cfg)

    selections, _ = score_and_select(cfg, plan)
    return write_selection(cfg, selections)


def write_selection(cfg: Config, selections) -> Path:
    from flexkd.scorepass import selection_meta
    from flexkd.selection import save_selection

    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / artifacts.SELECTION
    save_selection(path, selections, selection_meta(cfg))
    return path


def evaluate_saved(cfg: Config, model_path: str, split: str) -> dict:
    """`flexkd eval`: metrics of a saved model folder (a run's student/, or a teacher) on val or test."""
    from flexkd.data import encode, load_task_data, unseen_rows
    from flexkd.evaluation import evaluate
    from flexkd.models import load_pretrained, load_tokenizer
    from flexkd.workbench import pick_device

    if not Path(model_path, "config.json").is_file():
        raise ConfigError(f"{model_path}: not a Hugging Face model folder (no config.json)")
    data = load_task_data(cfg.data)
    held_out, _, unseen = split.partition("-")
    rows = {"val": data.val, "test": data.test, "train": data.train}[held_out]
    if unseen:  # val-unseen / test-unseen: only the rows whose input no training row has
        rows = unseen_rows(rows, data.train, cfg.data.task)
    if not rows:
        raise ConfigError(
            f"--split: the {split} split is empty for this config (see data.test_size / data.test_split"
            + (", and every one of its rows repeats a training row's input)" if unseen else ")")
        )
    tok = load_tokenizer(model_path, cfg.data.task)
    device = pick_device(cfg)
    model = load_pretrained(model_path, cfg.data.task, data.label_names, tok).to(device)
    examples = [encode(r, tok, cfg.data, data.label_names) for r in rows]
    return evaluate(model, examples, rows, cfg, tok, device, split.replace("-", "_"))
