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


def _wire_device(group=None) -> torch.device:
    # NCCL reduces only device tensors; gloo only host tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of ``group`` (default: all; a no-op in one process), outside autograd. Float64 sums
    stay float64 (gloo and NCCL both carry it)."""
    if not is_distributed():
        return tensor
    work = tensor.detach().to(_wire_device(group)).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    return work.to(tensor.device)


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in one process). Small picklable values only."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def loss_group():
    """The process group the training loss sums its batch statistics over (``flexkd.losses.co_moments``):
    the default group when more than one rank runs, else None (this process alone: no collective at all).
    Only the training loop asks; evaluation and single-process callers pass None."""
    return dist.group.WORLD if world_size() > 1 else None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is an all-reduce (sum) of the incoming gradients.

    The same semantics as ``torch.distributed.nn.functional.all_reduce``, which warns that it is deprecated
    (its suggested replacement has no autograd).
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        work = tensor.to(_wire_device(group)).clone(memory_format=torch.contiguous_format)
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
        return work.to(tensor.device)

    @staticmethod
    def backward(ctx, grad):
        return _SumOverRanks.apply(grad, ctx.group), None


def all_reduce_sum_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over the ranks of ``group`` that autograd differentiates; every rank must call it, in the same order.

    Gradient scale, the one place it is decided: the backward sums the incoming gradients over the ranks too.
    When every rank's loss is the same function L of the summed tensor (the feature loss of the global
    micro-batch), each rank's tensor receives world_size x dL/d(its summand), and the data-parallel average
    of parameter gradients (DDP; FSDP's reduce-scatter; the loop's own projector average: sum / world_size)
    divides that factor out again: the averaged gradient is exactly dL/d(parameters), the single-process
    gradient on the concatenated batch. So no scale factor is applied here, and none may be added elsewhere.
    """
    return _SumOverRanks.apply(tensor, group)


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
