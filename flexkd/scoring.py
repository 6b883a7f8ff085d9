"""Gradient-based task scores of teacher hidden units (FLEXKD.md section 1).

One pass over the scoring set computes every method at once (the extra reductions cost nothing next to the
teacher's forward and backward), plus the activation moments that the ``variance`` selection needs. Results
are *sums* with a token count, so partial results from shards add up exactly: ``UnitScores.merge`` and
``flatten``/``unflatten`` let a distributed run all-reduce them in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from flexkd.data import IGNORE
from flexkd.losses import head_on_rows, loss_rows, task_loss

# Each scorer: (grad (B, T, d), hidden (B, T, d), mask (B, T, 1) of 0/1 in the same dtype) -> (d,) this
# batch's contribution. ``grad`` is dL/dh for L the batch's mean task loss.
SCORERS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # The batch is summed before the absolute value: the scoring batch size changes the score.
    "grad": lambda g, h, m: (g * m).sum((0, 1)).abs(),
    "grad_token": lambda g, h, m: (g.abs() * m).sum((0, 1)),
    "taylor": lambda g, h, m: (g * h * m).abs().sum((0, 1)),
    "fisher": lambda g, h, m: (g * g * m).sum((0, 1)),
}


@dataclass
class UnitScores:
    """Score sums of one teacher layer's units over (part of) a scoring set. All tensors (d_T,) float64."""

    layer: int
    sums: dict[str, torch.Tensor]
    act_sum: torch.Tensor
    act_sq_sum: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, layer: int, dim: int) -> UnitScores:
        z = lambda: torch.zeros(dim, dtype=torch.float64)  # noqa: E731
        return cls(layer, {m: z() for m in SCORERS}, z(), z(), 0)

    def scores(self, method: str) -> torch.Tensor:
        """Per-unit score of ``method``: the sum divided by the number of token-mask positions scored."""
        return self.sums[method] / max(self.tokens, 1)

    def variance(self) -> torch.Tensor:
        n = max(self.tokens, 1)
        mean = self.act_sum / n
        return (self.act_sq_sum / n - mean * mean).clamp_min(0)

    def merge(self, other: UnitScores) -> UnitScores:
        assert self.layer == other.layer
        return UnitScores(
            self.layer,
            {m: self.sums[m] + other.sums[m] for m in SCORERS},
            self.act_sum + other.act_sum,
            self.act_sq_sum + other.act_sq_sum,
            self.tokens + other.tokens,
        )


@dataclass
class ScoreSet:
    """Per-layer unit scores of one scoring pass, keyed by non-negative teacher layer index."""

    layers: dict[int, UnitScores] = field(default_factory=dict)
    examples: int = 0

    def flatten(self) -> torch.Tensor:
        """Every sum in one float64 vector (for a single all-reduce)."""
        parts = [torch.tensor([float(self.examples)], dtype=torch.float64)]
        for layer in sorted(self.layers):
            s = self.layers[layer]
            parts += [s.sums[m] for m in SCORERS] + [s.act_sum, s.act_sq_sum]
            parts.append(torch.tensor([float(s.tokens)], dtype=torch.float64))
        return torch.cat(parts)

    def unflatten(self, flat: torch.Tensor) -> ScoreSet:
        """The inverse of ``flatten`` for a vector of the same layout (e.g. after an all-reduce)."""
        flat = flat.to(torch.float64).cpu()
        out = ScoreSet(examples=int(round(flat[0].item())))
        pos = 1
        for layer in sorted(self.layers):
            dim = self.layers[layer].act_sum.numel()

            def take(n):
                nonlocal pos
                piece = flat[pos : pos + n].clone()
                pos += n
                return piece

            sums = {m: take(dim) for m in SCORERS}
            act_sum, act_sq = take(dim), take(dim)
            tokens = int(round(take(1).item()))
            out.layers[layer] = UnitScores(layer, sums, act_sum, act_sq, tokens)
        return out

    def merge(self, other: ScoreSet) -> ScoreSet:
        return ScoreSet(
            {k: v.merge(other.layers[k]) for k, v in self.layers.items()}, self.examples + other.examples
        )


def _require_grad_hook(module, inputs, output):
    # Teacher parameters need no gradient, so nothing in the graph would track one. Making the embedding
    # output a leaf that requires grad gives every later hidden state a grad path, without the
    # parameters' gradient buffers.
    return output.detach().requires_grad_(True)


def task_gradients(teacher: torch.nn.Module, batch: dict, layers: list[int]):
    """(hidden states, gradients of the batch-mean task loss with respect to them) at ``layers``, each
    (B, T, d); a gradient is None where the loss does not depend on that layer. Teacher ids used when present."""
    ids = batch.get("teacher_input_ids", batch["input_ids"])
    attn = batch.get("teacher_attention_mask", batch["attention_mask"])
    labels = batch["labels"]
    rows = labels != IGNORE if labels.dim() == 2 else None  # a causal LM's loss positions
    handle = teacher.get_input_embeddings().register_forward_hook(_require_grad_hook)
    try:
        with torch.enable_grad(), head_on_rows(teacher, rows):
            out = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
            logits = out.logits if rows is None else loss_rows(out.logits, rows)
            loss = task_loss(logits, labels if rows is None else labels[rows])
            hidden = [out.hidden_states[layer] for layer in layers]
            grads = torch.autograd.grad(loss, hidden, allow_unused=True)
    finally:
        handle.remove()
    return hidden, grads


def score_batch(teacher: torch.nn.Module, batch: dict, layers: list[int]) -> ScoreSet:
    """Score one batch. ``batch`` as from ``flexkd.data.collate`` (teacher ids used when present).

    The task loss L is the batch mean (over its labelled positions, or its examples for classification);
    the sums run over the batch's token-mask positions.
    """
    hidden, grads = task_gradients(teacher, batch, layers)
    attn = batch.get("teacher_attention_mask", batch["attention_mask"])
    ids = batch.get("teacher_input_ids", batch["input_ids"])
    mask = attn.unsqueeze(-1).to(torch.float64)
    result = ScoreSet(examples=ids.shape[0])
    for layer, h, g in zip(layers, hidden, grads):
        h = h.detach().to(torch.float64)
        g = torch.zeros_like(h) if g is None else g.to(torch.float64)
        result.layers[layer] = UnitScores(
            layer,
            {name: fn(g, h, mask) for name, fn in SCORERS.items()},
            (h * mask).sum((0, 1)),
            (h * h * mask).sum((0, 1)),
            int(attn.sum().item()),
        )
    return result


def score_units(
    teacher: torch.nn.Module,
    batches: Iterable[dict],
    layers: list[int],
    dim: int,
    progress: Callable[[int], None] | None = None,
) -> ScoreSet:
    """Sum ``score_batch`` over ``batches`` (in order). ``layers`` are non-negative hidden_states indices."""
    layers = sorted(set(layers))
    total = ScoreSet({layer: UnitScores.zeros(layer, dim) for layer in layers})
    for i, batch in enumerate(batches):
        total = total.merge(score_batch(teacher, batch, layers))
        if progress:
            progress(i + 1)
    return total
