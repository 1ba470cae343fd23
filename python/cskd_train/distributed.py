"""Data-parallel setup for ``torchrun``: process group, device, and small collective helpers.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) a process group is created:
nccl for CUDA devices, gloo for the CPU. Without torchrun everything runs in
one process and the helpers are no-ops.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup(device_arg):
    """The run's Context; initialises the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device_arg} was asked for but CUDA is not available")
        device = torch.device("cuda", local_rank if world_size > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Context(rank, world_size, local_rank, device)


def teardown(context):
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def any_across_ranks(flag, context):
    """True on every rank if flag is True on any rank (a stop or skip decision all ranks must share)."""
    if not context.distributed:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_across_ranks(values, context):
    """The mean over ranks of a dict of floats (logged loss parts)."""
    if not context.distributed:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return {k: v / context.world_size for k, v in zip(keys, tensor.tolist())}


def sum_across_ranks(tensor, context):
    if context.distributed:
        dist.all_reduce(tensor)
    return tensor


def barrier(context):
    if context.distributed:
        dist.barrier()


def broadcast_buffers(module, context):
    """Rank 0's BatchNorm statistics to every rank, so all ranks validate the model that is saved."""
    if context.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def replicas_in_sync(module, context):
    """True when every rank holds the same parameters (checked once at the end of a DDP run)."""
    if not context.distributed:
        return True
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
        low, high = flat.clone(), flat.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))
