"""Worker for test_cskd_loss_ddp.py, started by torchrun: a few distillation steps on gloo.

argv: output JSON path, "ddp" (wrap the loss module in DDP) or "plain" (do not).
Each rank sees different data; rank 0 writes every rank's gammas.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cskd_kernels import CSKDLoss


def main(path, mode):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial student and loss module on every rank
    student = nn.Conv2d(3, 16, 3, padding=1)
    teacher = nn.Conv2d(3, 32, 3, padding=1)
    loss_module = CSKDLoss(16, 32, grid=(2, 2), projection="learned")
    if mode == "ddp":
        student = DistributedDataParallel(student)
        loss_module = DistributedDataParallel(loss_module)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(loss_module.parameters()), lr=0.5)
    torch.manual_seed(100 + rank)  # different data per rank
    for _ in range(3):
        images = torch.randn(4, 3, 12, 12)
        with torch.no_grad():
            feat_t = teacher(images)
        loss = loss_module(student(images), feat_t).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module = loss_module.module if mode == "ddp" else loss_module
    gammas = torch.cat([module.gamma_cam.detach(), module.gamma_pam.detach()])
    gathered = [torch.zeros_like(gammas) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, gammas)
    if rank == 0:
        with open(path, "w") as f:
            json.dump([g.tolist() for g in gathered], f)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Leave without running interpreter-exit destructors: gloo's background threads
    # sometimes abort there ("terminate called without an active exception"), after
    # all the work above is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
