"""Data-parallel setup for ``torchrun``: process group, device, and small collective helpers.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) a process group is created:
nccl for CUDA devices, gloo for the CPU. Without torchrun everything runs in
one process and the helpers are no-ops.
"""

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DeviceError(RuntimeError):
    """A --device this machine does not have (one-line message)."""


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


def setup(device_arg, timeout_seconds=300.0):
    """The run's Context; initialises the process group when launched by torchrun.

    ``timeout_seconds`` bounds every collective: a rank that stops answering
    (frozen, not dead) makes the others fail after it rather than after
    gloo's default of 30 minutes (see stalled_ranks_message).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device_arg} was asked for but CUDA is not available")
        device = torch.device("cuda", local_rank if world_size > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_seconds))
    return Context(rank, world_size, local_rank, device)


def teardown(context):
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def any_across_ranks(flag, context):
    """True on every rank if flag is True on any rank (a stop or skip decision all ranks must share)."""
    return bool(max_across_ranks(1 if flag else 0, context))


def max_across_ranks(value, context):
    """The largest of an integer over ranks (e.g. the number of a signal one rank received, 0 for none)."""
    if not context.distributed:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


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


# ---- which rank stopped answering ------------------------------------------
# Each rank records the last iteration it finished in the process group's key-value store (a
# small write to the store torchrun hosts, not a collective). When a collective fails, every
# rank still running says so in the store and waits a while for the others: the ranks that never
# say so are the ones that stopped answering (frozen or dead).

PROGRESS_KEY = "cskd-train/iteration/{}"
ALIVE_KEY = "cskd-train/alive/{}"


def _store():
    return dist.distributed_c10d._get_default_store()


def report_progress(iteration, context):
    if context.distributed:
        _store().set(PROGRESS_KEY.format(context.rank), str(iteration))


# Text of the errors gloo and NCCL raise as plain RuntimeErrors when a peer stops answering or goes away.
_COLLECTIVE_FAILURES = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def is_collective_failure(error, context):
    """True for an error of a collective operation (a rank that froze or died), under torchrun."""
    if not context.distributed or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, dist.DistError) or any(text in str(error) for text in _COLLECTIVE_FAILURES)


def answering_ranks(context, wait_seconds):
    """The ranks that report being alive within wait_seconds (this one included); empty if the store is gone."""
    try:
        store = _store()
        store.set_timeout(datetime.timedelta(seconds=5))
        store.set(ALIVE_KEY.format(context.rank), "1")
        keys = [ALIVE_KEY.format(rank) for rank in range(context.world_size)]
        deadline = time.monotonic() + wait_seconds
        while True:
            alive = {rank for rank, key in enumerate(keys) if store.check([key])}
            if len(alive) == context.world_size or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)
    except Exception:  # the store went away with the launcher: nothing more to learn
        return set()


def last_iterations(context):
    """{rank: the last iteration it finished} for the ranks that reported one."""
    store, done = _store(), {}
    for rank in range(context.world_size):
        key = PROGRESS_KEY.format(rank)
        try:
            if store.check([key]):
                done[rank] = int(store.get(key))
        except Exception:
            pass
    return done


def stalled_ranks_message(context, timeout_seconds):
    """After a failed collective: one line naming the ranks that stopped answering, from one rank.

    Every rank still running calls this; the lowest-numbered of them gets the line, the others None.
    Waits up to timeout_seconds (at most a minute) for the other running ranks to check in.
    """
    alive = answering_ranks(context, min(timeout_seconds, 60.0))
    if not alive:
        return f"rank {context.rank}: lost contact with the other processes and with the launcher's store"
    if context.rank != min(alive):
        return None
    silent = [rank for rank in range(context.world_size) if rank not in alive]
    done = last_iterations(context)
    where = ", ".join(f"rank {rank} at {done[rank]}" for rank in sorted(done)) or "none reported"
    if not silent:
        return f"a collective operation failed though every rank still answers (last finished iterations: {where})"
    names = ", ".join(str(rank) for rank in silent)
    return (f"rank {names} stopped answering (no reply within --ddp-timeout {timeout_seconds:g} s; frozen or dead); "
            f"the other ranks stopped (last finished iterations: {where})")
