"""Worker for test_cskd_loss_ddp.py, started by torchrun: CSKDLoss(global_batch=True), 2 images a rank.

argv: output path (torch.save of rank 0's results), projection mode. Every
rank takes its 2 images of one batch of 4 and runs one forward + backward of
student and loss module under DDP; rank 0 saves the loss parts and every
gradient (after DDP's averaging) for the test to compare with one process
that sees the 4 images.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ddp_global_batch_case import build, draw_seed, images


def main(path, projection):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher, loss_module = build(projection, global_batch=True)
    student, loss_module = DistributedDataParallel(student), DistributedDataParallel(loss_module)
    batch = images()
    local = batch.chunk(world)[rank]
    torch.manual_seed(draw_seed(rank))  # resampled projections: each rank's own draws, rank 0's are used
    with torch.no_grad():
        feat_t = teacher(local)
    out = loss_module(student(local), feat_t)
    out.loss.backward()
    parts = torch.stack([t.detach() for t in out])
    gathered = [torch.zeros_like(parts) for _ in range(world)]
    dist.all_gather(gathered, parts)
    grads = {f"student.{n}": p.grad for n, p in student.module.named_parameters()}
    grads.update({f"loss.{n}": p.grad for n, p in loss_module.module.named_parameters()})
    if rank == 0:
        torch.save({"parts": gathered, "grads": grads}, path)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads sometimes abort in interpreter-exit destructors (see ddp_cskd_worker.py)
