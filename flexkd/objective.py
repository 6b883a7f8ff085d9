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
from flexkd.losses import FEATURE_LOSSES, TopK, head_on_rows, kd_on_rows, loss_rows, task_loss, top_k_logits
from flexkd.signals import effective_top_k, teacher_forward


def feature_positions(tokens: str, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions a feature loss aligns (``feature.tokens``). all: every non-padding token.
    response: ``loss_mask``, the (B, T) positions of a generation task's loss. head: the positions the task
    head reads, which for a classifier (``loss_mask`` is (B,)) is position 0 alone: its last layer passes
    task gradient nowhere else, so that is where the gradient scores were measured."""
    if tokens == "all":
        return attention_mask.bool()
    if loss_mask.dim() == 1:  # classification; 'response' is refused for it before any run starts
        head = torch.zeros_like(attention_mask, dtype=torch.bool)
        head[:, 0] = attention_mask[:, 0].bool()
        return head
    return loss_mask


@dataclass
class Objective:
    """``objective(model, batch)`` -> {"task": ..., "kd": ..., "feat": ...} (only the terms that are on), each a
    float32 scalar; ``objective.total(terms)`` weights and sums them. The teacher runs under ``no_grad``, or
    is not there at all when the batch carries its cached signals.

    layer_map: (teacher, student) indices into ``hidden_states``: teacher entry t is aligned with student
    entry s. units: per mapped pair, the selected teacher units (k,) long, or None (projector baseline); with
    signals of selected units only, the columns of the stored hidden states that hold them.

    group: the process group the feature loss sums its statistics over, so that it is a function of the
    global micro-batch (the union of every rank's, see ``flexkd.losses``): the training loop passes
    ``flexkd.distributed.loss_group()``. None (the default, and every caller outside the loop): this
    process's micro-batch alone, and no collective. The task and KD terms are this rank's means either way.
    """

    cfg: Config
    teacher: torch.nn.Module | None
    layer_map: list[tuple[int, int]]
    units: list[torch.Tensor | None]
    projector: torch.nn.ModuleList | None
    vocab: int
    group: object | None = None

    @property
    def weights(self) -> dict[str, float]:
        return {"task": self.cfg.task.weight, "kd": self.cfg.kd.weight, "feat": self.cfg.feature.weight}

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.weights
        return sum(weights[name] * value for name, value in terms.items())

    def teacher_outputs(self, batch: dict, loss_mask: torch.Tensor) -> tuple[dict, object]:
        """({teacher layer: (B, T, d) hidden states}, the logits at the loss positions) of the micro-batch:
        from its cached signals (``batch["signals"]``, see ``flexkd.signals.SignalReader.gather``) or from
        the live teacher. Logit rows are (N, C|V), or a ``TopK`` with ``kd.top_k``; either way the same values
        for the same rows, so a cached run's losses equal a live run's."""
        if "signals" in batch:
            return batch["signals"]["hidden"], batch["signals"]["rows"]
        with torch.no_grad(), head_on_rows(self.teacher, loss_mask if loss_mask.dim() == 2 else None):
            t_out = teacher_forward(self.teacher, batch, self.cfg.run.precision)
        hidden = {t: t_out.hidden_states[t] for t, _ in self.layer_map}
        rows = loss_rows(t_out.logits, loss_mask) if loss_mask.dim() == 2 else t_out.logits
        top_k = effective_top_k(self.cfg, self.vocab)
        if top_k:
            rows = top_k_logits(rows[..., : self.vocab], top_k, self.cfg.kd.temperature)
        return hidden, rows

    def __call__(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        features_on = uses_features(cfg)
        autocast = (
            torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16)
            if cfg.run.precision == "bf16"
            else contextlib.nullcontext()
        )
        loss_mask = batch["labels"] != IGNORE  # (B,) all True for classification; (B, T) response positions
        causal = loss_mask.dim() == 2
        with autocast, head_on_rows(model, loss_mask if causal else None):
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=features_on,
            )
        with autocast:
            s_rows = loss_rows(out.logits, loss_mask) if causal else out.logits
            labels = batch["labels"][loss_mask] if causal else batch["labels"]
            terms = {"task": task_loss(s_rows, labels)}
            if self.teacher is None and "signals" not in batch:
                return terms
            t_hidden, t_rows = self.teacher_outputs(batch, loss_mask)
        if cfg.kd.loss != "none" and cfg.kd.weight > 0:
            if isinstance(t_rows, TopK):
                s_rows = s_rows[..., : self.vocab]
            elif s_rows.shape[-1] != t_rows.shape[-1]:
                # Checkpoints may pad the output layer beyond the tokenizer; only real tokens carry probability.
                s_rows, t_rows = s_rows[..., : self.vocab], t_rows[..., : self.vocab]
            terms["kd"] = kd_on_rows(cfg.kd.loss, s_rows, t_rows, cfg.kd.temperature, cfg.kd.skew)
        if features_on:
            feature_loss = FEATURE_LOSSES[cfg.feature.loss]
            token_mask = feature_positions(cfg.feature.tokens, batch["attention_mask"], loss_mask)
            per_layer = [
                feature_loss(
                    out.hidden_states[s_layer],
                    t_hidden[t_layer],
                    token_mask,
                    self.units[i],
                    self.projector[i] if self.projector is not None else None,
                    group=self.group,
                )
                for i, (t_layer, s_layer) in enumerate(self.layer_map)
            ]
            terms["feat"] = torch.stack(per_layer).mean()
        return terms
