"""The few collective operations the loop needs, on plain ``torch.distributed``.

The loop never imports Ray: under Ray Train the process group already exists when ``train`` starts (Ray set
it up), and in a plain process there is none, so every helper degrades to the single-process case.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op in one process). Float64 sums stay float64 (gloo and NCCL both carry it)."""
    if not is_distributed():
        return tensor
    backend = dist.get_backend()
    # NCCL reduces only device tensors; gloo only host tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    work = tensor.detach().to(device).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def is_sharded(model: torch.nn.Module) -> bool:
    """Is this an FSDP2 (``fully_shard``) module? Its parameters are DTensor shards then."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(model, FSDPModule)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_distributed(student: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` per transformer block, then the root) for large students."""
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(student, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(student, "_no_split_modules", None) or [])
    for module in student.modules():
        if type(module).__name__ in block_names:
            fully_shard(module)
    fully_shard(student)
    return student
