"""The training objective: CE, the auxiliary CE, and the distillation terms from cskd_kernels.

``--distill cskd`` is the released objective:
CE + 0.4 aux CE + 3 CWD(T=2) + CSKDLoss(T=2, lambda_cam=0.3, lambda_pam=0.8, grid 5x5);
``cwd`` drops the CSKD term, ``none`` both distillation terms. The loss math
lives in cskd_kernels only; this module wires it to the networks' outputs
(and states the released Hinton KD term, plain PyTorch: kd_loss).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import cskd_kernels
from cskd_kernels.modules.cskd_loss import MIN_SAMPLES  # noqa: F401 (cskd-train checks it at start-up)
from cskd_train.datasets import IGNORE_INDEX

DISTILL_MODES = ("none", "cwd", "cskd")


@dataclass
class ObjectiveConfig:
    distill: str = "none"
    aux_weight: float = 0.4
    cwd_weight: float = 3.0
    cwd_temperature: float = 2.0
    cskd_weight: float = 1.0
    cskd_temperature: float = 2.0
    lambda_cam: float = 0.3
    lambda_pam: float = 0.8
    grid: Optional[Tuple[int, int]] = (5, 5)
    projection: str = "resample"
    reduction: int = 8
    global_batch: bool = False  # the CKAs over the batch of all processes (CSKDLoss(global_batch=True))
    similarity: str = "cka"  # CSKDLoss(similarity=...): "cka" or the released *_MSE modes' "mse"
    adapter: Optional[str] = None  # CSKDLoss(adapter=...), "mse" only: resample (None), fixed, learned
    kd_weight: float = 0.0  # the released CriterionKD on the logits (kd_loss), any teacher-based mode
    kd_temperature: float = 1.0


def segmentation_ce(logits, labels):
    """Cross-entropy with the logits upsampled to the label size (as the released criterion does)."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def kd_loss(student_logits, teacher_logits, temperature=1.0):
    """The released CriterionKD (train_sa.py's --lambda-kd term; CIRKD's losses/kd.py): Hinton KD per pixel.

    With p = softmax over the C classes of a pixel's logits / T:
    T^2 / (B*H*W) * sum over pixels of KL(p_teacher || p_student)
    (kl_div with reduction="batchmean" over the B*H*W rows, times T^2), on the
    logits as the networks return them. No gradient to the teacher.
    """
    classes = teacher_logits.shape[1]
    s = student_logits.permute(0, 2, 3, 1).reshape(-1, classes)
    t = teacher_logits.detach().permute(0, 2, 3, 1).reshape(-1, classes)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (temperature**2)


def compile_loss_module(module, device):
    """``module`` compiled in place (its state_dict keys unchanged); on CUDA as CUDA graphs (mode="reduce-overhead")."""
    module.compile(mode="reduce-overhead" if torch.device(device).type == "cuda" else None)


class Objective(nn.Module):
    """Loss parts for one step; holds the CSKD module, whose parameters train with the student."""

    def __init__(self, config, student_channels, teacher_channels=None):
        super().__init__()
        if config.distill not in DISTILL_MODES:
            raise ValueError(f"unknown distill mode {config.distill!r}; choose one of {DISTILL_MODES}")
        if config.kd_weight and config.distill == "none":
            raise ValueError("the KD term (kd_weight) needs a teacher: distill 'cwd' or 'cskd', not 'none'")
        self.config = config
        self.cskd = None
        # cskd-train's StepTiming (cskd_train/throughput.py), which times the CSKD call when set.
        self.cskd_timing = None
        if config.distill == "cskd":
            self.cskd = cskd_kernels.CSKDLoss(
                student_channels,
                teacher_channels,
                temperature=config.cskd_temperature,
                lambda_cam=config.lambda_cam,
                lambda_pam=config.lambda_pam,
                grid=config.grid,
                projection=config.projection,
                reduction=config.reduction,
                global_batch=config.global_batch,
                similarity=config.similarity,
                adapter=config.adapter,
            )

    def compile_cskd(self, device):
        """Run the CSKD loss under torch.compile; on CUDA with mode="reduce-overhead" (CUDA graphs).

        On a GPU the eager loss is bound by the host issuing its launches; CUDA
        graphs replay them in one go. nn.Module.compile compiles in place, so
        the state_dict keys (and checkpoints) are those of an eager run.
        """
        if self.cskd is None:
            raise ValueError("compile_cskd: this objective has no CSKD loss (distill is not 'cskd')")
        compile_loss_module(self.cskd, device)

    @property
    def needs_teacher(self):
        return self.config.distill != "none"

    def forward(self, student, labels, teacher=None):
        """student/teacher: SegmentationOutput. Returns a dict of scalar tensors with the "loss" total."""
        cfg = self.config
        parts = {"ce": segmentation_ce(student.logits, labels)}
        total = parts["ce"]
        if student.aux_logits is not None and cfg.aux_weight:
            parts["aux"] = segmentation_ce(student.aux_logits, labels)
            total = total + cfg.aux_weight * parts["aux"]
        if cfg.distill in ("cwd", "cskd"):
            parts["cwd"] = cskd_kernels.cwd_loss(student.logits, teacher.logits.detach(), temperature=cfg.cwd_temperature)
            total = total + cfg.cwd_weight * parts["cwd"]
        if cfg.kd_weight:
            parts["kd"] = kd_loss(student.logits, teacher.logits, cfg.kd_temperature)
            total = total + cfg.kd_weight * parts["kd"]
        if cfg.distill == "cskd":
            feat_s, feat_t = student.features, teacher.features.detach()
            out = self.cskd(feat_s, feat_t) if self.cskd_timing is None else self.cskd_timing(self.cskd, feat_s, feat_t)
            parts["cam"], parts["pam"], parts["cskd"] = out.cam, out.pam, out.loss
            total = total + cfg.cskd_weight * out.loss
        parts["loss"] = total
        return parts
