"""The objective: the weighted loss terms of one micro-batch (FLEXKD.md section 3).

L = w_task * L_task + w_kd * L_kd + w_feat * mean over mapped layers of L_feat. The loop, the benchmarks and
the tests all call this one class, so a benchmarked step is the trained step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from flexkd.config import Config, uses_features
from flexkd.data import IGNORE
from flexkd.losses import FEATURE_LOSSES, KD_LOSSES, task_loss


@dataclass
class Objective:
    """``objective(model, batch)`` -> {"task": ..., "kd": ..., "feat": ...} (only the terms that are on), each a
    float32 scalar; ``objective.total(terms)`` weights and sums them. The teacher runs under ``no_grad``.

    layer_map: (teacher, student) indices into ``hidden_states``: teacher entry t is aligned with student
    entry s. units: per mapped pair, the selected teacher units (k,) long, or None (projector baseline).
    """

    cfg: Config
    teacher: torch.nn.Module | None
    layer_map: list[tuple[int, int]]
    units: list[torch.Tensor | None]
    projector: torch.nn.ModuleList | None
    vocab: int

    @property
    def weights(self) -> dict[str, float]:
        return {"task": self.cfg.task.weight, "kd": self.cfg.kd.weight, "feat": self.cfg.feature.weight}

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.weights
        return sum(weights[name] * value for name, value in terms.items())

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
