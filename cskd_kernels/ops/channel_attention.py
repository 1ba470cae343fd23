"""Channel self-attention, CAM (SPEC section 2), fused.

Per image X (C x N, N = H*W): E = X X^T, A = softmax_rows(-E / T) (which is
softmax((rowmax(E) - E) / T), computed stably), out = gamma * (A X) + X.

The forward saves only A (C x C per image, small) next to x; the backward
needs neither the Gram matrix nor Y = A X again. With G = dOut X^T (C x C):

    d gamma = sum(dOut * A X) = sum(A * G)
    r       = rowsum(A * G)                       (softmax backward's rowsum(dA * A) / gamma)
    dE      = -(gamma / T) * A * (G - r)
    dX      = gamma * A^T dOut + (dE + dE^T) X + dOut

so the backward is three C x C x N products (G, A^T dOut, (dE + dE^T) X) and
no C x N temporary besides dX itself; without a gradient for x (the
teacher's side in CSKD) it is the one product G.

Kernels per backend (same contract everywhere), x is contiguous (B, C, N):
    channel_attention_forward(x, gamma, temperature)
        -> (out (B, C, N) in x's dtype, attention (B, C, C) float32/float64)
    channel_attention_backward(grad_out, x, attention, gamma, temperature, need_x)
        -> (dx or None, dgamma shaped like gamma)
and on "cpu" channel_attention_gram(x, temperature, keep_product) -> (the Gram
of the rows (A X, X), attention, A X if kept): what CSKDLoss's CKA needs of
CAM(x) = gamma A X + X, without CAM(x) as a map (cskd_kernels/ops/channel_gram.py).
"""

import torch

from cskd_kernels import reference
from cskd_kernels._validation import accumulation_dtype, check_float_tensor, check_same_device, check_temperature
from cskd_kernels._library import kernel_op
from cskd_kernels.backend import kernels, resolve_backend

# The two kernels are PyTorch ops (cskd_kernels._library: a custom op, and a
# triton_op on the Triton backend) with a registered autograd formula, so
# torch.compile traces them with no graph break and autograd sees one node.


@kernel_op("channel_attention_forward")
def channel_attention_forward(
    features: torch.Tensor, gamma: torch.Tensor, temperature: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, C, N) in the dtype of features, attention (B, C, C) in the accumulation dtype)."""
    # The extension returns a list; a custom op must return a tuple (autograd ignores a list).
    out, attention = kernels("channel_attention", backend).forward(features, gamma, temperature)
    return out, attention


@channel_attention_forward.register_fake
def _channel_attention_forward_fake(features, gamma, temperature, backend):
    b, c, _ = features.shape
    return torch.empty_like(features), features.new_empty((b, c, c), dtype=accumulation_dtype(features.dtype))


@kernel_op("channel_attention_backward")
def channel_attention_backward(
    grad_out: torch.Tensor,
    features: torch.Tensor,
    attention: torch.Tensor,
    gamma: torch.Tensor,
    temperature: float,
    need_x: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, or an empty tensor when not need_x, d gamma shaped like gamma)."""
    grad_x, grad_gamma = kernels("channel_attention", backend).backward(
        grad_out, features, attention, gamma, temperature, need_x
    )
    # A custom op returns tensors only: "no dx" is an empty one.
    return (grad_x if need_x else features.new_empty(0)), grad_gamma


@channel_attention_backward.register_fake
def _channel_attention_backward_fake(grad_out, features, attention, gamma, temperature, need_x, backend):
    return (torch.empty_like(features) if need_x else features.new_empty(0)), torch.empty_like(gamma)


@torch.library.custom_op("cskd::channel_attention_gram", mutates_args=())
def channel_attention_gram(features: torch.Tensor, temperature: float,
                           keep_product: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G (1, 2B, 2B) float64, A (B, C, C), P) on the C++ kernels (backend "cpu"): A the attention, G the Gram
    of the rows (A X, X) shifted by row 0 (cell_cross_gram's form); P = A X (B, C, N) when keep_product (for
    channel_attention_output_grad), else empty and A X never a map."""
    gram, attention, product = kernels("channel_attention", "cpu").gram(features, temperature, keep_product)
    return gram, attention, product


@channel_attention_gram.register_fake
def _channel_attention_gram_fake(features, temperature, keep_product):
    b, c, _ = features.shape
    return (features.new_empty((1, 2 * b, 2 * b), dtype=torch.float64), features.new_empty((b, c, c)),
            torch.empty_like(features) if keep_product else features.new_empty(0))


@torch.library.custom_op("cskd::channel_attention_output_grad", mutates_args=())
def channel_attention_output_grad(features: torch.Tensor, product: torch.Tensor, gamma: torch.Tensor,
                                  m: torch.Tensor) -> torch.Tensor:
    """M (out - out_0) for out = gamma A X + X, never a map, on the C++ kernels (backend "cpu") from the product
    A X that channel_attention_gram kept: the gradient of out's centered Gram by out, M = H (dK + dK^T) H
    (B x B, features' dtype)."""
    return kernels("channel_attention", "cpu").output_grad(features, product, gamma, m)


@channel_attention_output_grad.register_fake
def _channel_attention_output_grad_fake(features, product, gamma, m):
    return torch.empty_like(features)


def _setup_context(ctx, inputs, output):
    features, gamma, temperature, backend = inputs
    _, attention = output
    ctx.mark_non_differentiable(attention)  # saved for the backward, not a result
    ctx.set_materialize_grads(False)  # no zero-filled gradient for it in the backward
    ctx.save_for_backward(features, gamma, attention)
    ctx.temperature, ctx.backend = temperature, backend


@torch.autograd.function.once_differentiable
def _backward(ctx, grad_out, _grad_attention):
    features, gamma, attention = ctx.saved_tensors
    need_x, need_gamma = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_out is None or not (need_x or need_gamma):  # None: the output's gradient is undefined (zero)
        return None, None, None, None
    # Without need_x (the CAM teacher side) the kernel does only d gamma's work.
    grad_x, grad_gamma = channel_attention_backward(
        grad_out.contiguous(), features, attention, gamma, ctx.temperature, need_x, ctx.backend
    )
    return (grad_x if need_x else None), (grad_gamma if need_gamma else None), None, None


channel_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x, gamma, temperature):
    check_float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D feature map (B, C, H, W), got shape {tuple(x.shape)}")
    if not isinstance(gamma, torch.Tensor):
        raise TypeError(f"gamma must be a 1-element torch.Tensor, got {type(gamma).__name__}")
    if gamma.numel() != 1:
        raise ValueError(f"gamma must be a 1-element tensor, got shape {tuple(gamma.shape)} (x {tuple(x.shape)})")
    if not gamma.is_floating_point():
        raise TypeError(f"gamma must be a floating-point tensor, got dtype {gamma.dtype} (shape {tuple(gamma.shape)})")
    check_same_device(x=x, gamma=gamma)
    return check_temperature(temperature, "channel_attention")


def channel_attention(x, gamma, *, temperature=1.0, backend=None):
    """DANet/CSKD channel attention: gamma * softmax_rows((rowmax(E) - E) / T) X + X, E = X X^T per image.

    ``x`` is (B, C, H, W) and ``gamma`` a 1-element tensor (the module's
    learnable scale); the result has x's shape and dtype. Gradients flow to x
    and gamma. ``temperature`` (in [MIN_TEMPERATURE, MAX_TEMPERATURE],
    cskd_kernels._validation) divides the energies before the softmax.
    """
    temperature = _check_inputs(x, gamma, temperature)
    return run_channel_attention(x, gamma, temperature, resolve_backend(backend, x))


def run_channel_attention(x, gamma, temperature, backend):
    """channel_attention on checked inputs and a resolved backend name (for callers that checked once)."""
    if backend == "reference":
        return reference.channel_attention(x, gamma, temperature=temperature)
    b, c, h, w = x.shape
    features = x.reshape(b, c, h * w).contiguous()
    # Kernels take gamma in the accumulation dtype; autograd casts its gradient back.
    gamma_acc = gamma.reshape(1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    out, _ = channel_attention_forward(features, gamma_acc, temperature, backend)
    return out.reshape(b, c, h, w)
