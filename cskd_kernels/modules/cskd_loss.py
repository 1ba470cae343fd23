"""CSKDLoss: the channel-spatial distillation loss (SPEC section 5) on the fused ops.

    loss = lambda_cam * cka_loss(CAM(s), CAM(t)) + lambda_pam * pam
    pam  = mean over grid cells of cka_loss(PAM(cell_s), PAM(cell_t))   (grid mode)
         = cka_loss(PAM(s), PAM(t))                                     (grid=None)

The CKA needs only the n x n centered Gram of each side (n = batch), so the
loss is built from Grams, and the maps that feed them are held as briefly as
possible (peak memory is the cost that matters at the released size):

- Both attention outputs are linear in their gamma: CAM(x) = g Y + x and,
  per cell, PAM(x) = g O + x. Their Grams are g^2 K_YY + g (K_Yx + K_xY) + K_xx
  (ops/cross_gram.py), so g Y + x is never formed. With the teacher's
  projections constant (resample, fixed) Y and O of the teacher are
  transients of the forward: nothing teacher-sized outlives it.
- The student's CAM output is not held through the position branch: only
  its attention A (C x C per image) is kept, and the backward recomputes
  CAM(x) = g A X + x with one product (ops/channel_gram.py; the reference
  backend recomputes the whole branch, a checkpoint).
- The per-cell 1x1 projections run image by image (ops/cell_projection.py)
  and save only x; the cells of a map are cut by CellLayout (zero padding,
  which leaves centered Grams unchanged), never as one padded copy.

No Python loop over cells: the attention is one grid-mode position_attention
call per side, the per-cell cross-Grams one grouped pass per channel block,
and the per-cell CKAs one grouped computation on the (cells, n, n) Grams.

The CKA's samples are the batch: at least MIN_SAMPLES of them (over 2 samples
linear CKA is always 1, so the loss would be a constant with zero gradients).
Under DDP with few images per process, ``global_batch=True`` computes it over
the batch of all processes (cskd_kernels/batch_gather.py).
"""
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cskd_kernels import reference
from cskd_kernels._validation import accumulation_dtype, check_float_tensor, check_same_device, check_temperature
from cskd_kernels.batch_gather import broadcast_from_first_rank, gather_batch, group_size
from cskd_kernels.grid import CellLayout
from cskd_kernels.backend import resolve_backend
from cskd_kernels.ops.cell_projection import cell_projection
from cskd_kernels.ops.channel_gram import channel_gram
from cskd_kernels.ops.channel_attention import channel_attention
from cskd_kernels.ops.cka import TRITON_MAX_SAMPLES
from cskd_kernels.ops.cross_gram import centered_cross_grams, combine_grams
from cskd_kernels.ops.position_attention import position_attention

PROJECTIONS = ("resample", "fixed", "learned")
# Samples (images) the CKA needs: over 2, linear CKA is 1 whatever the features (over 1 it is undefined).
MIN_SAMPLES = 3


class CSKDOutput(NamedTuple):
    loss: torch.Tensor
    cam: torch.Tensor
    pam: torch.Tensor


def draw_projections(channels, reduction, cells=1, *, generator=None, device=None, dtype=torch.float32):
    """Fresh 1x1 projections (wq, bq, wk, bk, wv, bv) for ``cells`` cells, weights (cells, out, in).

    PyTorch's default Conv2d initialisation, which the released code gets by
    building new layers: weights and biases uniform in +-1/sqrt(fan_in).
    Drawn in this order: wq, bq, wk, bk, wv, bv.
    """
    bound = 1.0 / math.sqrt(channels)
    reduced = channels // reduction
    shapes = [(cells, reduced, channels), (cells, reduced), (cells, reduced, channels), (cells, reduced),
              (cells, channels, channels), (cells, channels)]
    sizes = [math.prod(shape) for shape in shapes]
    # One draw for all six (three launches on a GPU instead of two dozen), cut in that order.
    flat = torch.rand(sum(sizes), generator=generator, device=device, dtype=dtype).mul_(2.0 * bound).sub_(bound)
    return tuple(part.view(shape) for part, shape in zip(flat.split(sizes), shapes))


class PositionProjection(nn.Module):
    """The q, k, v 1x1 projections of one side: resampled each call, fixed buffers, or learned parameters."""

    NAMES = ("wq", "bq", "wk", "bk", "wv", "bv")

    def __init__(self, channels, reduction, mode):
        super().__init__()
        self.channels, self.reduction, self.mode = channels, reduction, mode
        if mode == "resample":
            return
        for name, tensor in zip(self.NAMES, draw_projections(channels, reduction)):
            if mode == "learned":
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def weights(self, cells, generator, like):
        """(wq, bq, wk, bk, wv, bv), leading dim ``cells`` (resample) or 1 (shared by every cell)."""
        if self.mode == "resample":
            return draw_projections(self.channels, self.reduction, cells, generator=generator,
                                    device=like.device, dtype=like.dtype)
        return tuple(getattr(self, name).to(like.dtype) for name in self.NAMES)


def _cka_loss_from_grams(kc, lc, dtype):
    """The grouped CKA loss of centered Grams (cells, B, B), as cka_loss computes it from its Grams."""
    cka = reference.cka_from_grams(kc, lc, tiny=torch.finfo(dtype).tiny)
    return reference.cka_loss_from_cka(cka).to(dtype)


class CSKDLoss(nn.Module):
    """Channel-spatial distillation loss between student and teacher feature maps (B, C, H, W).

    ``feat_t`` is treated as detached; the shared gammas (initial 0) get
    gradients through both sides. ``generator`` (a torch.Generator, optional)
    seeds the per-call projections of projection="resample".

    The batch must hold at least MIN_SAMPLES (3) images. ``global_batch=True``
    (under torch.distributed) computes the CKAs over the batch of every
    process of ``process_group`` (default: the default group), exactly as one
    process with the whole batch would: every rank gathers all features
    (with gradient), computes the same loss, and DDP's gradient averaging gives
    the single-process gradient (see cskd_kernels/batch_gather.py). It costs
    each rank the loss over the whole batch and world_size times the feature
    memory; resampled projections are broadcast from the first rank so all
    ranks use the same ones. Without an initialised process group it is the
    ordinary loss.
    """

    def __init__(self, student_channels, teacher_channels, *, temperature=2.0, lambda_cam=0.3, lambda_pam=0.8,
                 grid=(5, 5), projection="resample", reduction=8, backend=None, generator=None,
                 global_batch=False, process_group=None):
        super().__init__()
        for name, channels in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if not isinstance(channels, int) or channels < reduction:
                raise ValueError(f"{name}={channels!r} must be an int >= reduction ({reduction})")
        if not (isinstance(reduction, int) and reduction >= 1):
            raise ValueError(f"reduction={reduction!r} must be a positive int")
        temperature = check_temperature(temperature, "CSKDLoss")  # the range every op takes
        for name, value in (("lambda_cam", lambda_cam), ("lambda_pam", lambda_pam)):
            if not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be finite")
        if grid is not None and (len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid)):
            raise ValueError(f"grid={grid!r} must be None or two positive ints (rows, columns)")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection={projection!r} is not one of {PROJECTIONS}")
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.temperature, self.lambda_cam, self.lambda_pam = temperature, lambda_cam, lambda_pam
        self.grid = None if grid is None else tuple(grid)
        self.backend, self.generator = backend, generator
        self.global_batch, self.process_group = bool(global_batch), process_group
        self.gamma_cam = nn.Parameter(torch.zeros(1))
        self.gamma_pam = nn.Parameter(torch.zeros(1))
        self.student_projection = PositionProjection(student_channels, reduction, projection)
        self.teacher_projection = PositionProjection(teacher_channels, reduction, projection)

    def forward(self, feat_s, feat_t):
        self._check(feat_s, feat_t)
        feat_t = feat_t.detach()
        if self.global_batch:
            feat_s, feat_t = gather_batch(feat_s, self.process_group), gather_batch(feat_t, self.process_group)
        self._check_samples(feat_s, feat_t)
        cells = CellLayout(feat_s.shape[2], feat_s.shape[3], self.grid or (1, 1)).num_cells
        # Drawn student first, then teacher (the order the reference composition uses).
        weights_s = self.student_projection.weights(cells, self.generator, feat_s)
        weights_t = self.teacher_projection.weights(cells, self.generator, feat_t)
        if self.global_batch and self.student_projection.mode == "resample":
            # Every rank computes the same loss over the whole batch: it needs the same projections.
            broadcast_from_first_rank(weights_s + weights_t, self.process_group)
        # The teacher first: its transients (attention outputs) come and go while nothing else is held.
        cam_t = self._teacher_channel_gram(feat_t)
        pam_t = combine_grams(self._position_grams(feat_t, weights_t), (self.gamma_pam, 1.0))
        cam_s = self._student_channel_gram(feat_s)
        pam_s = combine_grams(self._position_grams(feat_s, weights_s), (self.gamma_pam, 1.0))
        # The loss comes out in float32 at least (16-bit features under autocast included), like cka_loss.
        loss_dtype = accumulation_dtype(feat_s.dtype, feat_t.dtype)
        cam = _cka_loss_from_grams(cam_s, cam_t, loss_dtype)[0]
        pam = _cka_loss_from_grams(pam_s, pam_t, loss_dtype).mean()
        return CSKDOutput(self.lambda_cam * cam + self.lambda_pam * pam, cam, pam)

    def _channel_attention(self, x, gamma):
        return channel_attention(x, gamma, temperature=self.temperature, backend=self.backend)

    def _student_channel_gram(self, x):
        """Centered Gram (1, B, B) of CAM(x), differentiable in x and gamma_cam; CAM(x) not held."""
        backend = resolve_backend(self.backend, x)
        if backend == "reference":
            # The branch is recomputed in the backward rather than held through it.
            return checkpoint(lambda x: centered_cross_grams(self._channel_attention(x, self.gamma_cam),
                                                             backend=backend), x, use_reentrant=False)
        return channel_gram(x, self.gamma_cam, temperature=self.temperature, backend=backend)

    def _teacher_channel_gram(self, x):
        """Centered Gram of CAM(x) = g Y + x as a function of g = gamma_cam, CAM(x) never stored.

        With gamma = 1 the kernel gives Z = Y + x, so CAM(x) = g Z + (1 - g) x
        and its Gram is sum_ij c_i c_j K_ij with c = (g, 1 - g), K from (Z, x).
        """
        with torch.no_grad():
            z = self._channel_attention(x, torch.ones(1, dtype=x.dtype, device=x.device))
            grams = centered_cross_grams(z, x, backend=self.backend)
            del z
        return combine_grams(grams, (self.gamma_cam, 1.0 - self.gamma_cam))

    def _position_grams(self, x, weights):
        """Per-cell cross-Grams (cells, 2B, 2B) of (O, x), O the cell-wise position attention of x.

        PAM(x) = g O + x per cell, so its Gram is combine_grams(..., (g, 1)).
        Without a gradient path to O (teacher, fixed or resampled projections)
        O is a transient constant.
        """
        need_graph = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
        with torch.set_grad_enabled(need_graph):
            wq, bq, wk, bk, wv, bv = weights
            q, k, v = cell_projection(x, ((wq, bq), (wk, bk), (wv, bv)), grid=self.grid, backend=self.backend)
            attention = position_attention(q, k, v, temperature=self.temperature, grid=self.grid,
                                           backend=self.backend)
            del q, k, v
            return centered_cross_grams(attention, x, grid=self.grid, backend=self.backend)

    def _check_samples(self, feat_s, feat_t):
        """MIN_SAMPLES to TRITON_MAX_SAMPLES (Triton) images in the batch the CKAs run over (after gathering)."""
        n = feat_s.shape[0]
        if n > TRITON_MAX_SAMPLES and resolve_backend(self.backend, feat_s, feat_t) == "triton":
            raise ValueError(f"batch {n}: the Triton kernels take at most {TRITON_MAX_SAMPLES} samples "
                             "(their Grams hold a sample per row of one register tile); use backend='reference'")
        if n >= MIN_SAMPLES:
            return
        if self.global_batch:
            where = f"a global batch of {n} ({group_size(self.process_group)} process(es))"
            advice = "use more images per process"
        else:
            where = f"a batch of {n}"
            advice = ("use a larger batch, or under DDP global_batch=True to compute the CKA over the "
                      "batch of all processes")
        raise ValueError(
            f"CSKDLoss needs at least {MIN_SAMPLES} samples, got {where}: linear CKA over 2 samples is 1 "
            f"whatever the features (over 1 undefined), so the loss would be a constant with zero gradients; {advice}"
        )

    def _check(self, feat_s, feat_t):
        check_float_tensor("feat_s", feat_s)
        check_float_tensor("feat_t", feat_t)
        check_same_device(feat_s=feat_s, feat_t=feat_t)
        if feat_s.dim() != 4 or feat_t.dim() != 4:
            raise ValueError(f"feat_s {tuple(feat_s.shape)} and feat_t {tuple(feat_t.shape)} must be 4-D (B, C, H, W)")
        if feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]:
            raise ValueError(f"feat_s {tuple(feat_s.shape)} and feat_t {tuple(feat_t.shape)} differ in batch or spatial size")
        for name, t, expected in (("feat_s", feat_s, self.student_channels), ("feat_t", feat_t, self.teacher_channels)):
            if t.shape[1] != expected:
                raise ValueError(f"{name} {tuple(t.shape)} has {t.shape[1]} channels, the loss was built for {expected}")
        if self.grid is not None and (self.grid[0] > feat_s.shape[2] or self.grid[1] > feat_s.shape[3]):
            raise ValueError(f"grid {self.grid} is larger than the feature map {tuple(feat_s.shape[2:])}")
