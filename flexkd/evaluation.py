"""Evaluation: accuracy, macro-F1 and calibration (ECE) for classification; greedy decoding with ROUGE-L F1 and exact match for
generation. Every metric is built from sums, so shards evaluated by several workers add up with one all-reduce.
"""

from __future__ import annotations

import math
import re

import torch

from flexkd.config import Config
from flexkd.data import IGNORE, collate, encode_prompt, reference_text
from flexkd.distributed import all_reduce_sum, is_sharded, rank, world_size
from flexkd.losses import task_loss


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def macro_f1(confusion: torch.Tensor) -> float:
    """Macro-F1 from a (C, C) confusion matrix (rows: true class, columns: predicted).

    A class absent from both truth and predictions is left out of the mean (its F1 is undefined).
    """
    tp = confusion.diag().double()
    fp = confusion.sum(0).double() - tp
    fn = confusion.sum(1).double() - tp
    present = (tp + fp + fn) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    return float(f1[present].mean()) if present.any() else 0.0


ECE_BINS = 15


def calibration_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(3, ECE_BINS) float64 sums for the expected calibration error: per confidence bin the example count,
    the sum of confidences (the top softmax probability) and the number correct. Bins are equal-width on
    (0, 1], bin b holding confidences in (b/B, (b+1)/B]. Sums, so shards add up with one all-reduce."""
    probs = torch.softmax(logits.detach().double(), dim=-1)
    confidence, predicted = probs.max(-1)
    bins = (torch.ceil(confidence * ECE_BINS).long() - 1).clamp(0, ECE_BINS - 1)
    sums = torch.zeros(3, ECE_BINS, dtype=torch.float64)
    sums[0].index_add_(0, bins, torch.ones_like(confidence))
    sums[1].index_add_(0, bins, confidence)
    sums[2].index_add_(0, bins, (predicted == labels.to(predicted.device)).double())
    return sums


def expected_calibration_error(sums: torch.Tensor) -> float:
    """ECE = sum over bins of (n_b / n) * |accuracy_b - mean confidence_b| (Guo et al. 2017), from
    ``calibration_sums``. 0: confidences match the accuracy they come with; an over- or under-confident model
    scores up to 1."""
    n = sums[0].sum().clamp_min(1)
    return float((sums[1] - sums[2]).abs().sum() / n)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score, no stemming)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def _shard(n: int) -> range:
    return range(rank(), n, world_size())


@torch.no_grad()
def evaluate(model, examples: list[dict], rows: list[dict], cfg: Config, tok, device, prefix: str) -> dict:
    """Metrics of ``model`` on one split; ``examples`` are the encoded ``rows``. Sharded across ranks.

    Returns ``{prefix/loss, prefix/accuracy, prefix/macro_f1, prefix/ece, prefix/confidence}`` or ``{prefix/loss, prefix/rouge_l,
    prefix/exact_match, prefix/token_accuracy, prefix/ece, prefix/confidence}``, plus ``prefix/examples``. A
    generation task's calibration is per response token, teacher-forced: the top next-token probability
    against whether that token is the reference's (what logit KD hands the student, position by position).
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    total = min(cfg.eval.max_examples or len(examples), len(examples))
    mine = list(_shard(total))
    bs = cfg.eval.batch_size
    classification = cfg.data.task == "classification"
    num_labels = getattr(net.config, "num_labels", 0)
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of batch-mean losses x batch size, examples)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64) if classification else None
    calibration = torch.zeros(3, ECE_BINS, dtype=torch.float64)
    gen = torch.zeros(3, dtype=torch.float64)  # rouge-L sum, exact-match sum, examples
    # Under FSDP every forward is a collective: all ranks run as many batches as the largest shard (rank 0's);
    # a rank that has run out repeats example 0 and ignores it, and decoding keeps ranks in step (synced).
    sharded = is_sharded(model)
    batches = math.ceil(len(range(0, total, world_size())) / bs) if sharded else math.ceil(len(mine) / bs)
    for b in range(batches):
        idx = mine[b * bs : (b + 1) * bs]
        counted = bool(idx)
        batch = {
            k: v.to(device) for k, v in collate([examples[i] for i in idx or [0]], tok.pad_token_id).items()
        }
        out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        prompts = [] if classification else [encode_prompt(rows[i], tok, cfg.data) for i in idx or [0]]
        texts = (
            generate(net, prompts, tok, device, cfg.eval.max_new_tokens, synced=sharded) if prompts else []
        )
        if not counted:
            continue
        loss = float(task_loss(out.logits, batch["labels"]))
        loss_sum += torch.tensor([loss * len(idx), len(idx)], dtype=torch.float64)
        if classification:
            pred = out.logits.argmax(-1).cpu()
            for t, p in zip(batch["labels"].cpu().tolist(), pred.tolist()):
                confusion[t, p] += 1
            calibration += calibration_sums(out.logits.cpu(), batch["labels"].cpu())
        else:
            at = batch["labels"] != IGNORE
            calibration += calibration_sums(out.logits[at].cpu(), batch["labels"][at].cpu())
        for i, text in zip(idx, texts):
            ref = reference_text(rows[i], cfg.data)
            hit = float(normalise(text) == normalise(ref))
            gen += torch.tensor([rouge_l(text, ref), hit, 1.0], dtype=torch.float64)
    loss_sum = all_reduce_sum(loss_sum)
    metrics = {
        f"{prefix}/loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
        f"{prefix}/examples": int(loss_sum[1]),
    }
    if classification:
        confusion = all_reduce_sum(confusion)
        metrics[f"{prefix}/accuracy"] = float(confusion.diag().sum() / confusion.sum().clamp_min(1))
        metrics[f"{prefix}/macro_f1"] = macro_f1(confusion)
    else:
        gen = all_reduce_sum(gen)
        metrics[f"{prefix}/rouge_l"] = float(gen[0] / gen[2].clamp_min(1))
        metrics[f"{prefix}/exact_match"] = float(gen[1] / gen[2].clamp_min(1))
    calibration = all_reduce_sum(calibration)
    if not classification:  # next-token accuracy at the response positions, teacher-forced
        metrics[f"{prefix}/token_accuracy"] = float(calibration[2].sum() / calibration[0].sum().clamp_min(1))
    metrics[f"{prefix}/ece"] = expected_calibration_error(calibration)
    # Mean top-class probability: beside the accuracy it says over- (higher) or under-confident (lower).
    metrics[f"{prefix}/confidence"] = float(calibration[1].sum() / calibration[0].sum().clamp_min(1))
    net.train(was_training)
    return metrics


@torch.no_grad()
def generate(
    model, prompts: list[list[int]], tok, device, max_new_tokens: int, synced: bool = False
) -> list[str]:
    """Batched greedy decoding; prompts are left-padded so every row's continuation starts at the same column.

    synced: keep decoding until every rank is done (under FSDP each step's forward is a collective).
    """
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
        synced_gpus=synced,
    )
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out.tolist()]
