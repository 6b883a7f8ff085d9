"""Checkpoints: save a step's full state as a folder (layout in ``flexkd.artifacts``) and resume from one.

Saving is collective under FSDP (shards are gathered on every rank; rank 0 writes). A resumed run gets the
student's weights, the projector, the selection, the optimizer and the scheduler back exactly; dropout draws
and the data order are functions of the step, so nothing else needs saving.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from flexkd import artifacts
from flexkd.config import Config, dump_yaml
from flexkd.distributed import is_sharded
from flexkd.evaluation import unwrap
from flexkd.models import model_class
from flexkd.scorepass import selection_meta
from flexkd.selection import LayerSelection, load_selection, save_selection


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
    """Load an unsharded optimizer state (as saved by ``save``), resharding it under FSDP."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def save(
    cfg: Config,
    model,
    tok,
    projector,
    selections: list[LayerSelection],
    states: tuple[dict | None, dict],
    scheduler,
    step: int,
    final_metrics: dict | None,
) -> str:
    """Write a checkpoint folder and return its path (the loop deletes it after ``report``).

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
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "step": step},
        folder / artifacts.TRAINER_STATE,
    )
    if final_metrics is not None:
        artifacts.write_metrics(folder, final_metrics)
    return str(folder)


def load_student(folder: str, task: str) -> torch.nn.Module:
    """The student of a checkpoint (a Hugging Face folder: loading it restores the weights exactly)."""
    return model_class(task).from_pretrained(Path(folder, artifacts.STUDENT), dtype=torch.float32)


def load_projector(folder: str, projector: torch.nn.Module, device: torch.device) -> None:
    projector.load_state_dict(torch.load(Path(folder, artifacts.PROJECTOR), map_location=device))


def load_selections(folder: str) -> list[LayerSelection]:
    return load_selection(Path(folder, artifacts.SELECTION))[0]


def restore_trainer(folder: str, model, optimizer, scheduler) -> int:
    """Optimizer and scheduler state back into place; returns the step the checkpoint was taken after."""
    state = torch.load(Path(folder, artifacts.TRAINER_STATE), map_location="cpu", weights_only=False)
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]
