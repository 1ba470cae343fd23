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

similarity="mse" is the released code's other comparison (its modes CAM_MSE,
gridPAM_MSE, separately_CAMgridPAM_MSE): the student is first mapped to the
teacher's width by a bias-free 1x1 convolution (the adapter), then

    cam = mean((CAM(adapter(s)) - CAM(t))^2)
    pam = mean over cells of mean((PAM(cell of adapter(s)) - PAM(cell of t))^2)

The same fused ops give the maps (no HW x HW map, all cells in one call):
CAM(x) = g Y + x and PAM(x) = g O + x, so the loss is a weighted sum of squares
of g (O_s - O_t) + (x_s - x_t), one elementwise pass (_AttentionMSE), with
each position weighted 1 / (B C |cell| cells): the mean within each cell,
then over cells, for cells of unequal sizes too. With a widening adapter
(C_s < C_t) the fused backends take the student's branches through the
adapter's factors, the adapted map W x never formed (modules/attention_mse.py):
the CAM's MSE from the C x C Grams x x^T, x x_t^T and x_t x_t^T alone, no CAM
output of either side formed (channel_mse_from_grams); the PAM's attention
applied to the student map itself, O = (Wv W) (x A^T) + b_v
(_adapted_position_mse): the value products at C_s channels.

A branch whose lambda is 0 is not computed (nothing drawn for it either): its
part of the output is a zero tensor, 0 times the branch's parameters, so that
they still get a (zero) gradient as DDP expects of every parameter.
"""
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cskd_kernels import reference
from cskd_kernels._validation import accumulation_dtype, check_float_tensor, check_same_device, check_temperature
from cskd_kernels.resize import check_resize, match_spatial_size
from cskd_kernels.batch_gather import broadcast_from_first_rank, gather_batch, group_size
from cskd_kernels.grid import CellLayout
from cskd_kernels.modules.attention_mse import (  # noqa: F401 (MSE_CHUNK_ELEMENTS: the tests set it here)
    MSE_CHUNK_ELEMENTS, _AdaptedPositionMSE, _AttentionMSE, channel_mse_from_grams)
from cskd_kernels.backend import extension, resolve_backend
from cskd_kernels.ops.channel_gram import attention_cross_grams, channel_gram
from cskd_kernels.ops.channel_attention import run_channel_attention
from cskd_kernels.ops.cka import TRITON_MAX_SAMPLES
from cskd_kernels.ops.cross_gram import combine_grams, run_centered_cross_grams
from cskd_kernels.ops.projected_position_attention import run_projected_position_attention, run_projected_position_grams

PROJECTIONS = ("resample", "fixed", "learned")
SIMILARITIES = ("cka", "mse")
ADAPTERS = ("resample", "fixed", "learned")
# Samples (images) the CKA needs: over 2, linear CKA is 1 whatever the features (over 1 it is undefined).
MIN_SAMPLES = 3


class CSKDOutput(NamedTuple):
    loss: torch.Tensor
    cam: torch.Tensor
    pam: torch.Tensor


def uniform_fill_(parts, *, generator=None):
    """Fill each tensor of ``parts`` in turn with what successive torch.rand calls of their shapes would give.

    The parts may be slices of larger tensors (filled in their logical order).
    float32 on the CPU comes from the C++ extension (csrc/uniform.cpp), which
    draws the CPU generator's Mersenne Twister stream in bulk, bit for bit
    what torch.rand gives: about 13x faster here (4.1 million values, a
    released-shape step's projections, 2.1 ms against 26-30 ms).
    """
    like = parts[0]
    # Checked first: torch.compile traces torch.rand, but not the extension's import (a graph break).
    fused = not torch.compiler.is_compiling() and like.device.type == "cpu" and like.dtype == torch.float32
    ext = extension() if fused else None
    if ext is not None:
        ext.uniform_float_(list(parts), generator)
        return
    for part in parts:
        part.copy_(torch.rand(part.shape, generator=generator, device=part.device, dtype=part.dtype))


def draw_projections(channels, reduction, cells=1, *, generator=None, device=None, dtype=torch.float32):
    """Fresh 1x1 projections (wq, bq, wk, bk, wv, bv) for ``cells`` cells, weights (cells, out, in).

    PyTorch's default Conv2d initialisation, which the released code gets by
    building new layers: weights and biases uniform in +-1/sqrt(fan_in).
    Drawn in this order: wq, bq, wk, bk, wv, bv.

    The six are row slices of one stacked weight (cells, q|k|v rows, in) and
    one stacked bias, the layout the fused projection takes, so it reads them
    without a copy (ops/cell_projection.py: stacked_rows). Clone them to keep
    one alone.
    """
    bound = 1.0 / math.sqrt(channels)
    rows = (channels // reduction, channels // reduction, channels)
    weight = torch.empty(cells, sum(rows), channels, device=device, dtype=dtype)
    bias = torch.empty(cells, sum(rows), device=device, dtype=dtype)
    starts = [sum(rows[:i]) for i in range(len(rows))]
    parts = [stacked[:, start:start + count] for start, count in zip(starts, rows) for stacked in (weight, bias)]
    uniform_fill_(parts, generator=generator)
    for stacked in (weight, bias):
        stacked.mul_(2.0 * bound).sub_(bound)
    return tuple(parts)


def draw_adapter(student_channels, teacher_channels, *, generator=None, device=None):
    """A fresh student adapter weight (teacher_channels, student_channels), float32.

    The released code's ``nn.Conv2d(CS, CT, kernel_size=1, bias=False)`` with
    PyTorch's default initialisation, by the same call: kaiming_uniform_(a=sqrt(5)),
    uniform in +-sqrt(3) * sqrt(2 / (1 + 5)) / sqrt(CS), which is 1/sqrt(CS)
    (one unit in the last place below it in floating point). Drawn in float32 as
    the layer is, so on the CPU with the same seed it is the released layer's weight.
    """
    weight = torch.empty(teacher_channels, student_channels, 1, 1, device=device)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight.view(teacher_channels, student_channels)


class StudentAdapter(nn.Module):
    """The 1x1 bias-free map student -> teacher width of similarity="mse": resampled each call, a buffer, or a parameter."""

    def __init__(self, student_channels, teacher_channels, mode):
        super().__init__()
        self.student_channels, self.teacher_channels, self.mode = student_channels, teacher_channels, mode
        if mode == "resample":
            return
        weight = draw_adapter(student_channels, teacher_channels)
        if mode == "learned":
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def weights(self, generator, like):
        """The (CT, CS) weight of this call, in like's dtype."""
        if self.mode == "resample":
            weight = draw_adapter(self.student_channels, self.teacher_channels, generator=generator,
                                  device=like.device)
        else:
            weight = self.weight
        return weight.to(like.dtype)

    @staticmethod
    def apply_to(x, weight):
        """(B, CT, H, W) = weight (CT, CS) applied at every position of x (B, CS, H, W): one batched product."""
        b, _, h, w = x.shape
        return torch.matmul(weight, x.reshape(b, x.shape[1], h * w)).view(b, weight.shape[0], h, w)


def mse_position_weights(height, width, grid, batch, channels, *, device=None, dtype=torch.float32):
    """Weight of each position in the PAM's MSE: the mean within each cell, then over cells.

    grid=None: the plain mean, 1 / (B C H W) (a float). Otherwise an (H, W)
    tensor holding 1 / (B C |cell| cells) at the positions of each torch.chunk
    cell, exactly the released ``sum(mse(cell_s, cell_t)) / n`` for uneven cells.
    """
    if grid is None:
        return 1.0 / (batch * channels * height * width)
    layout = CellLayout(height, width, grid)
    rows = torch.tensor(layout.rows, dtype=torch.float64)
    cols = torch.tensor(layout.cols, dtype=torch.float64)
    per_row = torch.repeat_interleave(1.0 / rows, rows.long())
    per_col = torch.repeat_interleave(1.0 / cols, cols.long())
    weights = torch.outer(per_row, per_col) / (batch * channels * layout.num_cells)
    return weights.to(device=device, dtype=dtype)


class PositionProjection(nn.Module):
    """The q, k, v 1x1 projections of one side: resampled each call, fixed buffers, or learned parameters."""

    NAMES = ("wq", "bq", "wk", "bk", "wv", "bv")

    def __init__(self, channels, reduction, mode):
        super().__init__()
        self.channels, self.reduction, self.mode = channels, reduction, mode
        if mode == "resample":
            return
        for name, tensor in zip(self.NAMES, draw_projections(channels, reduction)):
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # its own storage, not the stacked one
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

    ``similarity="mse"`` compares the maps by their mean squared error, as the
    released *_MSE modes do, after a bias-free 1x1 ``adapter`` from the
    student's width to the teacher's: "resample" (default; a fresh layer with
    PyTorch's default Conv2d initialisation on every call, as released),
    "fixed" (drawn once, a buffer) or "learned" (a parameter). The PAM
    projections of both sides then have the teacher's width. The MSE needs no
    minimum batch and takes no ``global_batch`` (a mean over elements: DDP's
    gradient averaging already gives the whole batch's). ``adapter`` applies
    only to "mse". A lambda of 0 skips its branch (see the module docstring).
    """

    def __init__(self, student_channels, teacher_channels, *, temperature=2.0, lambda_cam=0.3, lambda_pam=0.8,
                 grid=(5, 5), projection="resample", reduction=8, backend=None, generator=None,
                 global_batch=False, process_group=None, similarity="cka", adapter=None, resize=None):
        super().__init__()
        self.resize = check_resize(resize, "CSKDLoss")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r} is not one of {SIMILARITIES}")
        if similarity == "cka" and adapter is not None:
            raise ValueError(f"adapter={adapter!r} applies only to similarity='mse' (the CKA compares maps of "
                             f"different widths as they are); leave adapter unset with similarity='cka'")
        if similarity == "mse":
            adapter = "resample" if adapter is None else adapter
            if adapter not in ADAPTERS:
                raise ValueError(f"adapter={adapter!r} is not one of {ADAPTERS}")
            if global_batch:
                raise ValueError("global_batch=True applies only to similarity='cka': the MSE is a mean over "
                                 "elements, which DDP's gradient averaging already takes over the whole batch")
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
        self.similarity, self.adapter_mode = similarity, adapter
        self.gamma_cam = nn.Parameter(torch.zeros(1))
        self.gamma_pam = nn.Parameter(torch.zeros(1))
        # With the MSE the student's maps are adapted to the teacher's width before the PAM.
        self.adapter = StudentAdapter(student_channels, teacher_channels, adapter) if similarity == "mse" else None
        self.student_projection = PositionProjection(
            teacher_channels if similarity == "mse" else student_channels, reduction, projection)
        self.teacher_projection = PositionProjection(teacher_channels, reduction, projection)

    def forward(self, feat_s, feat_t):
        self._check(feat_s, feat_t)
        feat_t = feat_t.detach()
        feat_s, feat_t = match_spatial_size(feat_s, feat_t, self.resize, "CSKDLoss", names=("feat_s", "feat_t"))
        if self.global_batch:
            feat_s, feat_t = gather_batch(feat_s, self.process_group), gather_batch(feat_t, self.process_group)
        # The loss comes out in float32 at least (16-bit features under autocast included), like cka_loss.
        loss_dtype = accumulation_dtype(feat_s.dtype, feat_t.dtype)
        # Checked (above) and resolved once per call, here: the ops below take both as given, so a
        # step pays one resolution and one set of checks, not one per op (host time, which a GPU waits on).
        backend = resolve_backend(self.backend, feat_s, feat_t)
        do_cam, do_pam = self.lambda_cam != 0, self.lambda_pam != 0
        if self.similarity == "mse":
            # Its products in the features' own dtype (the kernels ignore autocast; so does this path).
            with torch.autocast(feat_s.device.type, enabled=False):
                cam, pam = self._mse_parts(feat_s, feat_t, do_cam, do_pam, backend)
        else:
            self._check_samples(feat_s, backend)
            cam, pam = self._cka_parts(feat_s, feat_t, do_cam, do_pam, loss_dtype, backend)
        cam = cam.to(loss_dtype) if do_cam else self._skipped(self._cam_parameters(do_pam), loss_dtype, feat_s)
        pam = pam.to(loss_dtype) if do_pam else self._skipped(self._pam_parameters(do_cam), loss_dtype, feat_s)
        return CSKDOutput(self.lambda_cam * cam + self.lambda_pam * pam, cam, pam)

    def _cam_parameters(self, adapter_used):
        adapter = [] if adapter_used or self.adapter is None else list(self.adapter.parameters())
        return [self.gamma_cam, *adapter]

    def _pam_parameters(self, adapter_used):
        adapter = [] if adapter_used or self.adapter is None else list(self.adapter.parameters())
        return [self.gamma_pam, *self.student_projection.parameters(), *self.teacher_projection.parameters(),
                *adapter]

    @staticmethod
    def _skipped(parameters, dtype, like):
        """The part of a branch that is not computed: zero, 0 * its parameters (each gets a zero gradient)."""
        zero = torch.zeros((), dtype=dtype, device=like.device)
        for parameter in parameters:
            if parameter.requires_grad:
                zero = zero + parameter.sum().to(dtype) * 0.0
        return zero

    def _cka_parts(self, feat_s, feat_t, do_cam, do_pam, loss_dtype, backend):
        cam = pam = None
        # The teacher first: its transients (attention outputs) come and go while little else is held. Its
        # CAM draws nothing, so it runs before the projections are drawn: its C x C matrices and the
        # projections (the largest tensors at small maps) are never held at once.
        if do_cam:
            cam_t = self._teacher_channel_gram(feat_t, backend)
        if do_pam:
            student_weights, weights_t = self._projections(feat_s, feat_t)
            pam_t = combine_grams(self._position_grams(feat_t, weights_t, backend), (self.gamma_pam, 1.0))
            del weights_t  # resampled: not held while the student's side runs
        if do_cam:
            cam_s = self._student_channel_gram(feat_s, backend)
            cam = _cka_loss_from_grams(cam_s, cam_t, loss_dtype)[0]
        if do_pam:
            pam_s = combine_grams(self._position_grams(feat_s, student_weights(), backend), (self.gamma_pam, 1.0))
            pam = _cka_loss_from_grams(pam_s, pam_t, loss_dtype).mean()
        return cam, pam

    def _projections(self, feat_s, feat_t):
        """(student's, teacher's) projections of this call, drawn in that order (the reference's).

        The student's come as a function that gives them. Resampled on the CPU,
        they are drawn, dropped, and drawn again from the same generator state
        when the student's side runs (the generator then left where the teacher's
        draw left it): the two sides' projections, the largest tensors of a step
        at small maps (0.7 MiB a side at the demo's), are never held at once.
        """
        cells = CellLayout(feat_s.shape[2], feat_s.shape[3], self.grid or (1, 1)).num_cells
        projection = self.student_projection
        redraw = (projection.mode == "resample" and not self.global_batch and feat_s.device.type == "cpu"
                  and not torch.compiler.is_compiling())
        generator = self.generator if self.generator is not None else torch.default_generator
        before = generator.get_state() if redraw else None
        weights_s = projection.weights(cells, self.generator, feat_s)
        if redraw:
            del weights_s
        weights_t = self.teacher_projection.weights(cells, self.generator, feat_t)
        if self.global_batch and projection.mode == "resample":
            # Every rank computes the same loss over the whole batch: it needs the same projections.
            broadcast_from_first_rank(weights_s + weights_t, self.process_group)
        if not redraw:
            return (lambda: weights_s), weights_t
        after = generator.get_state()

        def student_weights():
            generator.set_state(before)
            try:
                return projection.weights(cells, self.generator, feat_s)
            finally:
                generator.set_state(after)
        return student_weights, weights_t

    def _mse_parts(self, feat_s, feat_t, do_cam, do_pam, backend):
        """The released *_MSE modes on the fused ops: adapter, then the CAM and (cell-wise) PAM MSEs."""
        cam = pam = None
        if not (do_cam or do_pam):
            return cam, pam
        # Drawn in the released order: the adapter, then the student's projections, then the teacher's.
        adapter = self.adapter.weights(self.generator, feat_s)
        # The fused backends take the student's branches through the adapter's factors (below) in 32 and
        # 64 bits when that is cheaper: the CAM when the adapter does not narrow, the PAM when it widens.
        folds = backend != "reference" and feat_s.dtype in (torch.float32, torch.float64)
        student_channels, teacher_channels = adapter.shape[1], adapter.shape[0]
        factored_cam = do_cam and folds and student_channels <= teacher_channels
        factored_pam = do_pam and folds and student_channels < teacher_channels
        factored_pam = factored_pam and feat_s.dtype == feat_t.dtype
        adapted = None
        if (do_pam and not factored_pam) or (do_cam and not factored_cam):
            adapted = StudentAdapter.apply_to(feat_s, adapter)
        if do_pam:
            student_weights, weights_t = self._projections(feat_s, feat_t)
            need_graph = torch.is_grad_enabled() and any(w.requires_grad for w in weights_t)
            with torch.set_grad_enabled(need_graph):
                o_t = self._position_attention(feat_t, weights_t, backend)
            del weights_t  # resampled: not held while the student's side runs
            weights_s = student_weights()
            batch, channels, height, width = feat_t.shape
            weight = mse_position_weights(height, width, self.grid, batch, channels, device=feat_t.device,
                                          dtype=accumulation_dtype(feat_s.dtype, feat_t.dtype))
            if factored_pam:
                pam = self._adapted_position_mse(feat_s, adapter, weights_s, feat_t, o_t, weight, backend)
            else:
                o_s = self._position_attention(adapted, weights_s, backend)
                pam = _AttentionMSE.apply(self.gamma_pam, adapted, o_s, feat_t, o_t, weight)
                del o_s
            del o_t
        if do_cam and factored_cam:
            cam = channel_mse_from_grams(feat_s, feat_t, adapter, self.gamma_cam, self.temperature)
        elif do_cam:
            with torch.no_grad():  # the teacher's Y = CAM with gamma 1, minus x: a constant
                y_t = self._channel_attention(feat_t, torch.ones(1, dtype=feat_t.dtype, device=feat_t.device), backend)
                y_t = y_t.sub_(feat_t)
            cam_s = self._channel_attention(adapted, self.gamma_cam, backend)
            cam = _AttentionMSE.apply(self.gamma_cam, cam_s, None, feat_t, y_t, 1.0 / feat_t.numel())
        return cam, pam

    def _position_attention(self, x, weights, backend):
        """The cell-wise position attention O of x (PAM(x) = g O + x per cell), all cells in one call."""
        return run_projected_position_attention(x, weights, self.temperature, self.grid, backend)

    def _adapted_position_mse(self, x, adapter, weights, feat_t, o_t, weight, backend):
        """The PAM MSE of the adapted map W x (W = adapter), its attention at the student's width.

        The projections of W x are those of x by the folded weights (Wq W, Wk W,
        Wv W), and the attention's rows sum to 1, so with Z = x A^T (the
        attention applied to x itself) its O = (Wv W) Z + b_v. The attention's
        value products, the largest, then run at C_s channels instead of C_t,
        and no C_t x C_t value projection is taken (fewer products whenever
        C_s < C_t: at 128 -> 256 about 40% of the student's PAM work, 41 instead
        of 71 GFLOP). _AdaptedPositionMSE runs it all, W x never formed.
        """
        wq, bq, wk, bk, wv, bv = weights
        qk_weight, qk_bias = torch.cat([wq @ adapter, wk @ adapter], dim=1), torch.cat([bq, bk], dim=1)
        return _AdaptedPositionMSE.apply(self.gamma_pam, x, qk_weight, qk_bias, adapter, wv @ adapter, bv, feat_t,
                                         o_t, weight, self.grid, self.temperature, backend)

    def _channel_attention(self, x, gamma, backend):
        return run_channel_attention(x, gamma, self.temperature, backend)

    def _student_channel_gram(self, x, backend):
        """Centered Gram (1, B, B) of CAM(x), differentiable in x and gamma_cam; CAM(x) not held."""
        if backend == "reference":
            # The branch is recomputed in the backward rather than held through it.
            def grams(x):
                return run_centered_cross_grams((self._channel_attention(x, self.gamma_cam, backend),), None, backend)
            return checkpoint(grams, x, use_reentrant=False)
        return channel_gram(x, self.gamma_cam, temperature=self.temperature, backend=backend)

    def _teacher_channel_gram(self, x, backend):
        """Centered Gram of CAM(x) = g Y + x as a function of g = gamma_cam, CAM(x) never stored.

        On "cpu" one kernel gives the Grams of (Y, x), Y never a map, and
        CAM(x) = g Y + x. Elsewhere, with gamma = 1 the kernel gives Z = Y + x,
        so CAM(x) = g Z + (1 - g) x and its Gram is sum_ij c_i c_j K_ij with
        c = (g, 1 - g), K from (Z, x).
        """
        if backend == "cpu":
            with torch.no_grad():
                grams = attention_cross_grams(x, self.temperature)
            return combine_grams(grams, (self.gamma_cam, 1.0))
        with torch.no_grad():
            z = self._channel_attention(x, torch.ones(1, dtype=x.dtype, device=x.device), backend)
            grams = run_centered_cross_grams((z, x), None, backend)
            del z
        return combine_grams(grams, (self.gamma_cam, 1.0 - self.gamma_cam))

    def _position_grams(self, x, weights, backend):
        """Per-cell cross-Grams (cells, 2B, 2B) of (O, x), O the cell-wise position attention of x.

        PAM(x) = g O + x per cell, so its Gram is combine_grams(..., (g, 1)).
        Without a gradient path to O (teacher, fixed or resampled projections)
        O is a transient constant.
        """
        need_graph = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
        with torch.set_grad_enabled(need_graph):
            return run_projected_position_grams(x, weights, self.temperature, self.grid, backend)

    def _check_samples(self, feat_s, backend):
        """MIN_SAMPLES to TRITON_MAX_SAMPLES (Triton) images in the batch the CKAs run over (after gathering)."""
        n = feat_s.shape[0]
        if n > TRITON_MAX_SAMPLES and backend == "triton":
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
        if feat_s.shape[0] != feat_t.shape[0]:
            raise ValueError(f"feat_s {tuple(feat_s.shape)} and feat_t {tuple(feat_t.shape)} differ in batch size")
        if feat_s.shape[2:] != feat_t.shape[2:] and self.resize is None:
            match_spatial_size(feat_s, feat_t, None, "CSKDLoss", names=("feat_s", "feat_t"))  # raises, naming both
        for name, t, expected in (("feat_s", feat_s, self.student_channels), ("feat_t", feat_t, self.teacher_channels)):
            if t.shape[1] != expected:
                raise ValueError(f"{name} {tuple(t.shape)} has {t.shape[1]} channels, the loss was built for {expected}")
        size = tuple((feat_t if self.resize == "student" else feat_s).shape[2:])  # the size the loss runs at
        if self.grid is not None and (self.grid[0] > size[0] or self.grid[1] > size[1]):
            raise ValueError(f"grid {self.grid} is larger than the feature map {size}")
