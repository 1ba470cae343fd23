"""Channel-wise distillation on logits, CWD (SPEC section 4), fused.

    loss = T^2 / (B*C) * sum over (b, c) of KL(softmax_N(t/T) || softmax_N(s/T))

The loss is terminal, so the kernels compute its gradient in the same pass
as its value (Liger's JSD pattern): per (b, c) row, one pass for the
log-sum-exp statistics of s/T and t/T, one for the KL terms and

    dloss/ds = T^2/(B*C) * (p_s - p_t) / T = T/(B*C) * (p_s - p_t).

The forward (one custom op, cskd::cwd_loss_rows) saves ds and the backward
only scales it by grad_out. ds is computed only when s requires grad (a
frozen student, or evaluation under no_grad, costs the value alone). t never
gets a gradient: the teacher is treated as detached, as in the reference.

Kernels per backend (same contract everywhere):
    cwd_forward(s, t, temperature, grad_scale, compute_grad)
        s, t (R, N) contiguous -> (kl_rows (R,), ds (R, N) or nothing)
    kl_rows[r] = sum p_t (log p_t - log p_s) over row r, in float32 (float64
    for float64 input); ds in the dtype of s.
"""

import torch

from cskd_kernels import reference
from cskd_kernels._validation import accumulation_dtype, check_float_tensor, check_same_device, check_temperature
from cskd_kernels._library import kernel_op
from cskd_kernels.backend import kernels, resolve_backend
from cskd_kernels.resize import check_resize, match_spatial_size

# The kernel is a PyTorch op (cskd_kernels._library: a custom op, and a
# triton_op on the Triton backend) with a registered autograd formula, so
# torch.compile traces it with no graph break and autograd sees one node.


@kernel_op("cwd_loss_rows")
def cwd_loss_rows(
    s_rows: torch.Tensor, t_rows: torch.Tensor, temperature: float, pairs: int, compute_grad: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, 0-dim in the accumulation dtype, ds (R, N) in s's dtype or an empty tensor) on (B*C, N) rows."""
    grad_scale = temperature / pairs
    kl_rows, ds = kernels("cwd", backend).forward(s_rows, t_rows, temperature, grad_scale, compute_grad)
    loss = kl_rows.sum() * (temperature * temperature / pairs)
    # A custom op returns tensors only: "no ds" is an empty one.
    return loss, (ds if compute_grad else s_rows.new_empty(0))


@cwd_loss_rows.register_fake
def _cwd_loss_rows_fake(s_rows, t_rows, temperature, pairs, compute_grad, backend):
    loss = s_rows.new_empty((), dtype=accumulation_dtype(s_rows.dtype))
    return loss, (torch.empty_like(s_rows) if compute_grad else s_rows.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, ds = output
    ctx.mark_non_differentiable(ds)  # the saved gradient, not a result
    ctx.set_materialize_grads(False)  # no zero-filled gradient for ds (the size of s) in the backward
    ctx.save_for_backward(ds)


@torch.autograd.function.once_differentiable
def _backward(ctx, grad_loss, _grad_ds):
    (ds,) = ctx.saved_tensors
    grad_s = None
    if ctx.needs_input_grad[0] and grad_loss is not None:  # None: the loss's gradient is undefined (zero)
        # A new tensor, never ds itself: autograd may adopt the returned
        # gradient as s.grad and accumulate into it in place, which would
        # corrupt the saved ds for a retained graph.
        grad_s = ds * grad_loss.to(ds.dtype)
    return grad_s, None, None, None, None, None


cwd_loss_rows.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(s, t, temperature, resize):
    check_float_tensor("s", s)
    check_float_tensor("t", t)
    for name, x in (("s", s), ("t", t)):
        if x.dim() != 4:
            raise ValueError(
                f"cwd_loss expects 4-D logits (B, C, H, W); got {name} of shape {tuple(x.shape)} "
                f"(s {tuple(s.shape)}, t {tuple(t.shape)})"
            )
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(f"cwd_loss needs s and t of one batch and class count, got s {tuple(s.shape)} and "
                         f"t {tuple(t.shape)}")
    check_same_device(s=s, t=t)
    check_temperature(temperature, "cwd_loss")
    check_resize(resize, "cwd_loss")


def _rows(x):
    """(B, C, H, W) -> contiguous (B*C, H*W)."""
    b, c, h, w = x.shape
    return x.reshape(b * c, h * w).contiguous()


def cwd_loss(s, t, *, temperature=1.0, backend=None, resize=None):
    """Channel-wise distillation loss of student logits s against teacher logits t, both (B, C, H, W).

    Per (image, class): the softmax over the H*W positions of t/T against the
    log-softmax of s/T, KL summed over everything and scaled by T^2/(B*C).
    No gradient flows to t. Stable for logits of any finite magnitude (the
    released code's softmax().log() gives -inf there). ``temperature`` in
    [MIN_TEMPERATURE, MAX_TEMPERATURE] (cskd_kernels._validation). Logits of
    different spatial sizes need ``resize`` ("student" or "teacher": that
    side is resized to the other's size, bilinear; cskd_kernels/resize.py).
    Returns a 0-dim tensor in float32 (float64 for float64 input).
    """
    _check_inputs(s, t, temperature, resize)
    s, t = match_spatial_size(s, t, resize, "cwd_loss")
    temperature = float(temperature)
    name = resolve_backend(backend, s, t)
    acc = accumulation_dtype(s.dtype, t.dtype)
    if name == "reference":
        return reference.cwd_loss(s.to(acc), t.to(acc), temperature=temperature)
    b, c = s.shape[0], s.shape[1]
    s_rows, t_rows = _rows(s), _rows(t)
    if name == "cpu" and t_rows.dtype != s_rows.dtype:
        # The C++ kernel takes one dtype: run mixed float32/float64 input in float64.
        s_rows, t_rows = s_rows.to(acc), t_rows.to(acc)
    # The gradient is computed in the forward pass, so only when it will be asked for.
    compute_grad = torch.is_grad_enabled() and s_rows.requires_grad
    out, _ = cwd_loss_rows(s_rows, t_rows.detach(), temperature, b * c, compute_grad, name)
    return out.to(acc)
