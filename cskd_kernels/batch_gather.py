"""The batch of every process of a group, for a CKA over the global batch under DDP.

Linear CKA compares samples with each other: its Gram has an entry for every
pair of samples, so with a few images per process (2 per GPU is common at
512 x 1024) the per-process CKA is constant (n = 2) or very noisy. The exact
fix is to compute it over the batch of all processes, which needs every
process's features (the Gram entries between samples of different ranks).

``gather_batch`` concatenates the group's tensors along dim 0 in rank order,
with a gradient. Every rank then computes the same loss L over the whole
batch; the backward sums, for each rank's own slice, the gradients that all
ranks computed for it. The gradient of a rank's features is therefore
world_size * dL/dx_rank, and DistributedDataParallel's gradient averaging
(a mean over ranks) turns it into exactly the gradient a single process with
the whole batch would compute.
"""

import torch
import torch.distributed as dist


def group_size(group=None):
    """Processes in ``group`` (the default group when None); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.rank, ctx.batch = group, dist.get_rank(group), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # Each rank holds the gradient of its loss for every rank's slice: sum them across ranks.
        # An all-reduce rather than a reduce-scatter: gloo has no reduce-scatter, and this is simpler
        # than emulating one; the slices are feature maps of a few images.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.batch
        return grad[start:start + ctx.batch], None


def gather_batch(x, group=None):
    """(n, ...) on each of the group's ranks -> (world_size * n, ...) in rank order, differentiable in x.

    Every rank must pass the same shape (DistributedSampler with drop_last,
    as cskd-train uses, guarantees it). A tensor that needs no gradient is
    gathered without autograd.
    """
    if group_size(group) == 1:
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)
    return _GatherBatch.apply(x, group)


def broadcast_from_first_rank(tensors, group=None):
    """Overwrite ``tensors`` (no gradient) with the group's first rank's values, in place."""
    if group_size(group) == 1:
        return
    source = dist.get_global_rank(group, 0) if group is not None else 0
    for tensor in _storages(tensors):
        dist.broadcast(tensor, src=source, group=group)


def _storages(tensors):
    """The distinct tensors holding ``tensors``, once each: a slice's base (broadcast takes whole tensors)."""
    held = {}
    for tensor in tensors:
        holder = tensor if tensor._base is None else tensor._base
        held.setdefault(id(holder), holder)
    return list(held.values())
