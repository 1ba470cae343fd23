"""The case test_cskd_loss_ddp.py runs both in 2 processes (ddp_global_batch_worker.py) and in one."""

import torch
from torch import nn

from cskd_kernels import CSKDLoss


def build(projection, global_batch):
    """Student, frozen teacher and loss module, the same in every process (seeded)."""
    torch.manual_seed(0)
    student = nn.Conv2d(3, 16, 3, padding=1)
    teacher = nn.Conv2d(3, 32, 3, padding=1)
    loss_module = CSKDLoss(16, 32, grid=(2, 2), projection=projection, global_batch=global_batch)
    with torch.no_grad():  # gammas away from 0, so that every gradient path is used
        loss_module.gamma_cam.fill_(0.3)
        loss_module.gamma_pam.fill_(0.7)
    return student, teacher, loss_module


def images():
    """One batch of 4 (odd-sized 11 x 13 images): 2 per process."""
    return torch.randn(4, 3, 11, 13, generator=torch.Generator().manual_seed(7))


def draw_seed(rank):
    """The global RNG seed of a rank's projection draws: different on every rank."""
    return 100 + rank
