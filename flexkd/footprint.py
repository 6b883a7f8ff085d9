"""What a student costs to keep and to run: its size and its inference latency, measured the same way for
every run so that a sweep can trade them against quality.

``footprint`` times forward passes of the trained student on a fixed list of encoded inputs (a run's first
validation examples: the whole text for a classifier, the prompt for a causal LM, i.e. the prefill that
precedes decoding), on the device the run trained on, in eval mode, without gradients:

- ``perf/student_params``: parameters (every one, embeddings included);
- ``perf/student_mb``: the weights as saved (the state dict, each tensor once, at its dtype), in MB (1e6 bytes);
- ``perf/latency_ms``: median of ``repeats`` batch-1 forwards, each on the next input of the list, after
  ``warmup`` untimed ones;
- ``perf/latency_b<B>_ms`` and ``perf/throughput``: the median of ``repeats`` forwards of the first ``B``
  inputs as one padded batch, and ``B`` over it (examples per second).

CPU timings depend on the threads torch may use and on what else runs on the machine: compare students of
one sweep (same machine, same settings), not absolute numbers across machines.
"""

from __future__ import annotations

import statistics
import time

import torch

from flexkd.data import collate

LATENCY_KEY = "perf/latency_ms"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict as saved: each tensor once (tied weights share one), non-persistent buffers
    (position ids and the like) left out, as ``save_pretrained`` writes it."""
    seen: dict[tuple[int, int], int] = {}
    for t in model.state_dict().values():
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def _timed(net, batch: dict, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def footprint(
    model: torch.nn.Module,
    inputs: list[list[int]],
    pad_id: int,
    device: torch.device,
    batch: int = 32,
    repeats: int = 7,
    warmup: int = 2,
) -> dict[str, float]:
    """Size and latency of ``model`` (see the module docstring); ``inputs`` are token id lists."""
    if not inputs:
        raise ValueError("footprint: no inputs to time")
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()

    def encoded(ids_lists: list[list[int]]) -> dict:
        rows = [{"input_ids": ids, "labels": [0] * len(ids)} for ids in ids_lists]
        return {k: v.to(device) for k, v in collate(rows, pad_id).items() if k != "labels"}

    singles = [encoded([inputs[i % len(inputs)]]) for i in range(warmup + repeats)]
    for b in singles[:warmup]:
        _timed(net, b, device)
    one = [_timed(net, b, device) for b in singles[warmup:]]
    size = min(batch, len(inputs))
    many = encoded(inputs[:size])
    for _ in range(warmup):
        _timed(net, many, device)
    full = statistics.median(_timed(net, many, device) for _ in range(repeats))
    net.train(was_training)
    return {
        "perf/student_params": float(sum(p.numel() for p in net.parameters())),
        "perf/student_mb": weight_bytes(net) / 1e6,
        LATENCY_KEY: statistics.median(one) * 1e3,
        f"perf/latency_b{size}_ms": full * 1e3,
        "perf/throughput": size / max(full, 1e-12),
    }
