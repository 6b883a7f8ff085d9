"""Losses: task cross-entropy, logit KD and feature alignment, as plain functions in explicit dicts.

Shapes. Logits are (B, C) for classification or (B, T, V) for causal LMs; ``mask`` is a bool tensor of the
leading dims, (B,) or (B, T), True where the position enters the loss. Hidden states are (B, T, d).
Every loss returns a float32 scalar averaged over the masked rows; masked-out rows never reach it.

All teacher inputs are detached inside the losses: gradients reach the student (and a projector) only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexkd.data import IGNORE
from flexkd.distributed import all_reduce_sum, all_reduce_sum_grad

EPS = 1e-8
TINY = 1e-30  # a float64 guard against 0 / 0 only (feature_cka)


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions.

    logits: (B, C) with labels (B,), or (B, T, V) with labels (B, T) holding IGNORE where unlabelled.
    """
    flat_logits = logits.flatten(0, -2).float()
    flat_labels = labels.flatten()
    if not (flat_labels != IGNORE).any():
        return flat_logits.sum() * 0.0  # keeps the graph; no position to learn from in this micro-batch
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE)


# ---------------------------------------------------------------------------------------------------------
# The logits at the loss positions. A causal LM's losses (task, KD, and the teacher's scoring loss) read its
# logits only where the loss mask is on; these let its output layer run there alone.


@contextlib.contextmanager
def head_on_rows(model: torch.nn.Module, rows: torch.Tensor | None):
    """While active, a causal LM's output layer runs only at the (B, T) bool ``rows`` of its input, so the
    model returns logits (N, V) for the N True positions (row-major) instead of (B, T, V).

    A generation task's losses read the logits at its response positions alone (under a tenth of the tokens
    on Debian's summaries), while the output layer and its softmax are most of a narrow student's step: with
    hidden 128 and 49,152 tokens the head costs 6x the four blocks below it. The hook sits inside the model's
    own forward, so a DDP- or FSDP-wrapped student runs one forward through its wrapper as before. No-op for
    ``rows=None`` and for models without output embeddings (classifiers)."""
    inner = getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 shards in place
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if rows is not None and get_head is not None else None
    if head is None:
        yield
        return

    def gather(_module, args):
        hidden = args[0]
        if hidden.shape[:2] != rows.shape:  # a model that slices before its head: leave it whole
            return None
        return (hidden[rows], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def loss_rows(logits: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The logits at the loss positions, (N, V): ``logits`` as ``head_on_rows`` left them, or (B, T, V) whole."""
    return logits[loss_mask] if logits.dim() == 3 else logits


# ---------------------------------------------------------------------------------------------------------
# Logit KD. Each: (student_logits, teacher_logits, mask, temperature, skew) -> scalar; scaled by temperature**2
# so that gradient magnitudes do not shrink as the temperature grows (Hinton et al. 2015).


def _rows(student_logits, teacher_logits, mask, temperature):
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[mask].detach().float() / temperature, dim=-1)
    return s, t


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities. (N, V) -> (N,)"""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, a: float) -> torch.Tensor:
    """log(a p + (1 - a) q), stably."""
    return torch.logaddexp(log_p + math.log(a), log_q + math.log1p(-a))


def _finish(per_row: torch.Tensor, temperature: float) -> torch.Tensor:
    if per_row.numel() == 0:
        return per_row.sum()
    return per_row.mean() * temperature**2


# Divergences between log-probability rows s (student) and t (teacher), (N, V) each -> (N,).
DIVERGENCES = {
    # Forward KL(p_T || p_S): mean-seeking.
    "fkl": lambda s, t, skew: _kl(t, s),
    # Reverse KL(p_S || p_T): mode-seeking (MiniLLM).
    "rkl": lambda s, t, skew: _kl(s, t),
    # Skew KL(p_T || a p_T + (1 - a) p_S), a = skew (DistiLLM).
    "skl": lambda s, t, skew: _kl(t, _log_mix(t, s, skew)),
    # Skew reverse KL(p_S || a p_S + (1 - a) p_T) (DistiLLM).
    "srkl": lambda s, t, skew: _kl(s, _log_mix(s, t, skew)),
    # Jensen-Shannon divergence: mean of KL to the midpoint from both sides.
    "jsd": lambda s, t, skew: 0.5 * _kl(t, _log_mix(t, s, 0.5)) + 0.5 * _kl(s, _log_mix(t, s, 0.5)),
}


def _kd(name):
    def loss(student_logits, teacher_logits, mask, temperature=1.0, skew=0.1):
        s, t = _rows(student_logits, teacher_logits, mask, temperature)
        return _finish(DIVERGENCES[name](s, t, skew), temperature)

    loss.__name__ = f"kd_{name}"
    return loss


kd_fkl, kd_rkl, kd_skl, kd_srkl, kd_jsd = (_kd(n) for n in ("fkl", "rkl", "skl", "srkl", "jsd"))


def kd_none(student_logits, teacher_logits, mask, temperature=1.0, skew=0.1):
    return student_logits.new_zeros((), dtype=torch.float32)


KD_LOSSES = {"fkl": kd_fkl, "rkl": kd_rkl, "skl": kd_skl, "srkl": kd_srkl, "jsd": kd_jsd, "none": kd_none}


# ---------------------------------------------------------------------------------------------------------
# Logit KD on rows: the teacher's logits at the loss positions, already gathered, either whole or as their
# top k. With the top k, both distributions are coarsened to k + 1 buckets, the teacher's k tokens and the
# rest of the vocabulary as one token; every divergence above then runs unchanged on the buckets. By the data
# processing inequality each KL of the buckets is at most the full one; at k = vocabulary it is the full one.


@dataclass
class TopK:
    """The teacher's top ``k`` logits per row and what the KL needs of the rest.

    values: (N, k) the k largest raw logits; indices: (N, k) long, their token ids; tail: (N,) the log-sum-exp
    of ``logits / temperature`` over every other token of the vocabulary.
    """

    values: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor


def top_k_logits(rows: torch.Tensor, k: int, temperature: float) -> TopK:
    """(N, V) teacher logits -> their top k and the tail's log-sum-exp at ``temperature`` (k < V)."""
    rows = rows.detach().float()
    values, indices = rows.topk(k, dim=-1)
    rest = (rows / temperature).scatter(-1, indices, float("-inf"))
    return TopK(values, indices, rest.logsumexp(-1))


def _bucket_rows(student_rows: torch.Tensor, teacher: TopK, temperature: float):
    """Student and teacher log-probabilities of the k + 1 buckets, (N, k + 1) each."""
    s_full = F.log_softmax(student_rows.float() / temperature, dim=-1)
    s_top = s_full.gather(-1, teacher.indices)
    s_rest = s_full.scatter(-1, teacher.indices, float("-inf")).logsumexp(-1, keepdim=True)
    t_scaled = teacher.values.detach().float() / temperature
    t_all = torch.cat([t_scaled, teacher.tail.detach().float().unsqueeze(-1)], dim=-1)
    return torch.cat([s_top, s_rest], dim=-1), t_all - t_all.logsumexp(-1, keepdim=True)


def kd_on_rows(name: str, student_rows, teacher, temperature=1.0, skew=0.1) -> torch.Tensor:
    """Logit KD ``name`` between (N, V) student rows and the teacher's rows: a (N, V) tensor or a ``TopK``."""
    if name == "none":
        return student_rows.new_zeros((), dtype=torch.float32)
    if isinstance(teacher, TopK):
        s, t = _bucket_rows(student_rows, teacher, temperature)
    else:
        s = F.log_softmax(student_rows.float() / temperature, dim=-1)
        t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return _finish(DIVERGENCES[name](s, t, skew), temperature)


# ---------------------------------------------------------------------------------------------------------
# Feature losses. Each: (student_hidden (B, T, d_S), teacher_hidden (B, T, d_T), mask (B, T) bool,
# units (k,) long teacher indices or None, projector nn.Module or None, *, group=None) -> scalar.
# Student dim i is aligned with teacher unit units[i], for i < k.
#
# The batch a feature loss sees. With group=None it is this call's masked positions. With a process group
# (the training loop passes ``flexkd.distributed.loss_group()`` when it runs on more than one rank) it is the
# union of the masked positions of that call on every rank of the group: the losses are functions of sums
# over positions (the co-moments below; the projector's squared error and count; the geometry losses'
# d x d sums), and those sums are all-reduced with autograd. So N ranks give one process's loss on the
# concatenated micro-batches, value and (after DDP's average) gradient; see
# ``flexkd.distributed.all_reduce_sum_grad`` for the gradient's scale.
# Every rank of the group must make the same calls in the same order, a rank with no masked position too.
# Gradient accumulation does not widen the batch: each accumulation step is one call on every rank (the
# union of the ranks' micro-batch a), and the optimiser step's feature loss is the mean over steps of those.
# Exact over the whole step would need every micro-batch's graph kept alive until the last one.


def _aligned(student_hidden, teacher_hidden, mask, units):
    """(N, k) student and (N, k) detached teacher features at the masked positions, in float32."""
    k = units.numel()
    # Narrow to the aligned dims before the mask: the masked copy is then (N, k), not (N, d).
    s = student_hidden[..., :k][mask].float()
    t = teacher_hidden.detach().index_select(-1, units)[mask].float()
    return s, t


def co_moments(s: torch.Tensor, t: torch.Tensor, group=None):
    """Per-column sufficient statistics of two (N, k) matrices, over the rows of every rank in ``group``.

    Returns ``(n, ss, tt, st)``: n () the number of rows, ss (k,) = sum of (s - mean s)^2, tt (k,) the same
    for t, st (k,) = sum of (s - mean s)(t - mean t); means and sums run over the group's rows together (this
    process's alone with group=None), in the dtype of s. Two collectives with a group: the sums that give the
    means (no autograd), then the centred sums (with autograd). Centring on the global means before summing
    keeps the precision of a two-pass variance, which raw sums of squares would lose to cancellation.
    """
    k = s.shape[-1]
    first = torch.cat([s.new_tensor([s.shape[0]]), s.detach().sum(0), t.detach().sum(0)])
    if group is not None:
        first = all_reduce_sum(first, group)
    n = first[0]
    means = first[1:].view(2, k) / n.clamp_min(1)  # no row anywhere: sums are 0, and so is every moment
    # The means are constants to autograd, exactly: a centred sum's derivative along its mean, sum(mean - x)
    # or sum(mean_t - t), is zero at the mean. It also spares a collective in the backward.
    ds, dt = s - means[0], t - means[1]
    second = torch.stack([(ds * ds).sum(0), (dt * dt).sum(0), (ds * dt).sum(0)])
    if group is not None:
        second = all_reduce_sum_grad(second, group)
    ss, tt, st = second.unbind(0)
    return n, ss, tt, st


def pearson_correlations(s: torch.Tensor, t: torch.Tensor, group=None) -> torch.Tensor:
    """Per-column Pearson correlation of two (N, k) matrices -> (k,), over the rows of every rank in ``group``
    (see ``co_moments``). Zero-variance columns give 0."""
    _, ss, tt, st = co_moments(s, t, group)
    # eps inside each square root: a (near-)constant column then has correlation ~0 and a finite gradient;
    # clamping sqrt(0) from below would leave an infinite d sqrt / dx behind the clamp, and NaN weights.
    return st / (torch.sqrt(ss + EPS) * torch.sqrt(tt + EPS))


def feature_pearson(student_hidden, teacher_hidden, mask, units, projector=None, *, group=None):
    """Flex-KD: mean over aligned pairs of (1 - Pearson correlation over the batch's positions).

    The batch is the masked positions of this call, or with ``group`` those of every rank together (see above).
    Invariant to a positive affine change of each student dim, so no projector is needed across hidden sizes.
    """
    s, t = _aligned(student_hidden, teacher_hidden, mask, units)
    return (1.0 - pearson_correlations(s, t, group)).mean()


def feature_mse_std(student_hidden, teacher_hidden, mask, units, projector=None, *, group=None):
    """MSE between per-dim standardised features; equals 2 * (1 - mean Pearson) up to the eps guards.

    Standardised: x -> (x - mean) / sqrt(var + eps), var the biased variance over the batch (this call's
    masked positions, or every rank's with ``group``). Computed in closed form from the co-moments: per unit,
    ss / (ss + n eps) + tt / (tt + n eps) - 2 st / sqrt((ss + n eps)(tt + n eps)), averaged over units; that is
    the mean over positions and units of the squared difference of the standardised features.
    """
    s, t = _aligned(student_hidden, teacher_hidden, mask, units)
    n, ss, tt, st = co_moments(s, t, group)
    n_eps = n.clamp_min(1) * EPS  # eps on the variance (ss / n) is n eps on ss; no position: the loss is 0
    ss_e, tt_e = ss + n_eps, tt + n_eps
    return (ss / ss_e + tt / tt_e - 2.0 * st / torch.sqrt(ss_e * tt_e)).mean()


def feature_projector(student_hidden, teacher_hidden, mask, units=None, projector=None, *, group=None):
    """FitNets baseline: MSE between a learned linear map W h_S (d_S -> d_T) and h_T over all teacher units,
    over this call's masked positions or, with ``group``, every rank's together."""
    weight_dtype = next(projector.parameters()).dtype
    pred = projector(student_hidden[mask].to(weight_dtype))
    target = teacher_hidden[mask].detach().float()
    if group is None:
        return F.mse_loss(pred.float(), target)
    squared = (pred.float() - target).pow(2).sum()
    count = all_reduce_sum(torch.tensor(float(target.numel()), dtype=torch.float64), group)
    return all_reduce_sum_grad(squared, group) / count.clamp_min(1).item()


# ---------------------------------------------------------------------------------------------------------
# Geometry baselines: projector-free like Flex-KD, but on the full hidden states (every student dim and every
# teacher unit; ``units`` is ignored), so they need no scoring pass. Both are functions of d x d sums over
# positions, all-reduced like the co-moments, so with ``group`` they too are exact on the global micro-batch.


def _full(student_hidden, teacher_hidden, mask):
    """(N, d_S) student and (N, d_T) detached teacher features at the masked positions, in float32 (float64
    inputs stay float64, and so does the loss: the gradient checks need it)."""
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    return student_hidden[mask].to(dtype), teacher_hidden.detach()[mask].to(dtype)


def _sq_norm(matrix: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm in float64: entries of a Gram matrix over thousands of positions, squared and
    summed, can leave float32's range."""
    return matrix.double().pow(2).sum()


def feature_cka(student_hidden, teacher_hidden, mask, units=None, projector=None, *, group=None):
    """1 - linear CKA between the full student and teacher hidden states over the batch's positions.

    X (N, d_S), Y (N, d_T): the masked positions' features, each centred over the positions (Kornblith et
    al. 2019). CKA = ||Y^T X||_F^2 / sqrt((||X^T X||_F^2 + tiny)(||Y^T Y||_F^2 + tiny)), in [0, 1]: invariant
    to an orthogonal map and an isotropic scaling of either side, so any pair of hidden sizes works.
    ||Y^T X||_F^2 = <X X^T, Y Y^T>_F, so this is also the cosine between the (N, N) centred Gram matrices.

    The centred d x d sums are sums over positions, reduced over ``group`` like ``co_moments`` (means first,
    outside autograd: a centred sum's derivative along its mean is zero there), so N ranks give one
    process's loss on their union, exactly. Cost O(N (d_S + d_T)^2). Constant features or no position: 1.
    """
    s, t = _full(student_hidden, teacher_hidden, mask)
    d_s, d_t = s.shape[-1], t.shape[-1]
    first = torch.cat([s.new_tensor([s.shape[0]]), s.detach().sum(0), t.sum(0)])
    if group is not None:
        first = all_reduce_sum(first, group)
    n = first[0].clamp_min(1)
    xs, yt = s - first[1 : 1 + d_s] / n, t - first[1 + d_s :] / n
    with torch.no_grad():  # the teacher's side has no gradient to carry
        tt = yt.T @ yt
    sums = torch.cat([(xs.T @ xs).flatten(), (yt.T @ xs).flatten(), tt.flatten()])
    if group is not None:
        sums = all_reduce_sum_grad(sums, group)
    ss, ts, tt = sums.split([d_s * d_s, d_t * d_s, d_t * d_t])
    # A guard inside the square root, as in pearson: a constant side gives CKA 0 and a finite (zero)
    # gradient. It is tiny, not EPS: these are 4th powers of the features, and a float64 1e-30 keeps 0 / 0
    # finite without breaking the scale invariance at any feature scale a model produces.
    cka = _sq_norm(ts) / torch.sqrt((_sq_norm(ss) + TINY) * (_sq_norm(tt) + TINY))
    return (1.0 - cka).to(s.dtype)


def feature_gram(student_hidden, teacher_hidden, mask, units=None, projector=None, *, group=None):
    """Feature-Gram distance: mean squared difference between the student's and the teacher's (N, N)
    position-by-position cosine-similarity matrices. Our reading of the "Frobenius norm of the Feature Gram
    Matrix" loss of Bhattarai et al. 2025 (arXiv 2509.25253), of which only the abstract and summaries could
    be read: feature geometry as the inner products (angles) between positions. The centring and the
    per-position normalisation are this project's choices, as is leaving out their Procrustes loss.

    x_i (d_S), y_i (d_T): the features at masked position i, centred over the positions; u_i = x_i /
    sqrt(|x_i|^2 + eps), v_i likewise. A_ij = u_i . u_j, B_ij = v_i . v_j (the angles between positions,
    what the paper calls the feature geometry). loss = (1 / N^2) sum_ij (A_ij - B_ij)^2, in [0, 4];
    0 when the student's centred positions are the teacher's up to an orthogonal map and a positive scale
    per position (up to the eps guard, which keeps a position at the mean finite). CKA, the cosine between
    the unnormalised Gram matrices, weighs each position by its norm (a few outlier tokens can decide it);
    here every pair of positions counts alike.

    Computed without the N x N matrices: sum_ij (A_ij - B_ij)^2 = ||U^T U||_F^2 - 2 ||U^T V||_F^2 +
    ||V^T V||_F^2, d x d sums over positions. With ``group`` the count and column sums (for the means, with
    autograd: the per-position normalisation makes the loss depend on them) and those d x d sums are
    all-reduced, so N ranks give one process's loss on their union, cross-rank pairs included, exactly.
    Cost O(N (d_S + d_T)^2). No position: 0.
    """
    s, t = _full(student_hidden, teacher_hidden, mask)
    d_s, d_t = s.shape[-1], t.shape[-1]
    first = torch.cat([s.new_tensor([s.shape[0]]), s.sum(0), t.sum(0)])
    if group is not None:
        first = all_reduce_sum_grad(first, group)
    n = first[0].detach().clamp_min(1)
    xs, yt = s - first[1 : 1 + d_s] / n, t - first[1 + d_s :] / n
    u = xs * torch.rsqrt(xs.pow(2).sum(-1, keepdim=True) + EPS)
    with torch.no_grad():
        v = yt * torch.rsqrt(yt.pow(2).sum(-1, keepdim=True) + EPS)
        vv = v.T @ v
    sums = torch.cat([(u.T @ u).flatten(), (v.T @ u).flatten(), vv.flatten()])
    if group is not None:
        sums = all_reduce_sum_grad(sums, group)
    uu, vu, vv = sums.split([d_s * d_s, d_t * d_s, d_t * d_t])
    return ((_sq_norm(uu) - 2 * _sq_norm(vu) + _sq_norm(vv)) / n.double() ** 2).to(s.dtype)


def feature_none(student_hidden, teacher_hidden, mask, units=None, projector=None, *, group=None):
    return student_hidden.new_zeros((), dtype=torch.float32)


FEATURE_LOSSES = {
    "pearson": feature_pearson,
    "mse_std": feature_mse_std,
    "projector": feature_projector,
    "cka": feature_cka,
    "gram": feature_gram,
    "none": feature_none,
}
