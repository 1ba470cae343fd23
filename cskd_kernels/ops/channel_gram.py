"""The centered Gram of channel attention's output, keeping the attention (on "cpu" also A X) for the backward.

CSKDLoss needs the student's CAM(x) = gamma * A X + x only through its B x B
centered Gram. Holding CAM(x) (the size of x) through the rest of the loss
costs memory, and a checkpoint that recomputes the whole branch in the
backward costs the Gram X X^T, the softmax and A X again. This op keeps what
the channel-attention kernel already saves, A (C x C per image), and in the
backward recomputes CAM(x) = gamma * A X + x with one product:

    forward   out, A = channel_attention_forward(x);  K = H out out^T H;  out freed
    backward  out = gamma * A X + x;  dOut = M (out - out_0), M = H (dK + dK^T) H;
              dx, d gamma = channel_attention_backward(dOut, x, A)

Where the map is smaller than A (N < C positions: the demo's 6x6 maps with 128
channels) A is not kept either: the backward runs the forward again (the Gram
X X^T, C^2 N, and the softmax; A X was to be recomputed anyway), and the
largest tensor held from the forward to the backward is x itself.

On "cpu" the forward does not form CAM(x) at all: channel_attention_gram
gives A and the Gram of the rows (A X, X), each column panel of A X made and
taken into the Gram while it is in the cache, and K is the (gamma, 1)
combination of its centered blocks (at CamVid's teacher, 256 channels, 37 ->
28 ms against the forward and cell_cross_gram, 2 threads). The teacher's
side uses the same kernel through attention_cross_grams, A X never a map.
The student's keeps A X as it makes it (one map of memory, the size of x):
its backward makes CAM(x) = gamma A X + X from it panel by panel and mixes it
into dOut there (channel_attention_output_grad), instead of the product A X
again (dOut at Cityscapes' student, 8 x 128 x 8192, 2 threads: 14.4-14.9 -> 5.3-5.4 ms).

Fused backends only (the kernels' contract); the reference composes the ops.
"""

import torch

from cskd_kernels._validation import accumulation_dtype
from cskd_kernels.ops.channel_attention import (
    channel_attention_backward,
    channel_attention_forward,
    channel_attention_gram,
    channel_attention_output_grad,
)
from cskd_kernels.ops.cka import _gram_input_grad, centered_gram, centering_matrix
from cskd_kernels.ops.cross_gram import center_blocks, combine_grams, gram_mixing


def _double_centered(gram):
    """H K H in float64: the kernel's centered Gram, re-centered exactly (as the cross-Grams are)."""
    h = centering_matrix(gram.shape[-1], torch.float64, gram.device)
    return h @ gram.double() @ h


def _attention_and_gram(features, gamma, temperature, backend, keep_product):
    """(A, the centered Gram (1, B, B) float64 of CAM = gamma A X + X, A X on "cpu" when keep_product else
    None), CAM never kept."""
    if backend == "cpu":
        gram, attention, product = channel_attention_gram(features, temperature, keep_product)
        return attention, combine_grams(center_blocks(gram, 2), (gamma, 1.0)), product if keep_product else None
    out, attention = channel_attention_forward(features, gamma, temperature, backend)
    return attention, _double_centered(centered_gram(out.reshape(1, features.shape[0], -1), backend)), None


def attention_cross_grams(x, temperature):
    """(1, 2B, 2B) float64: the block-centered Grams of (A X, X) of x (B, C, H, W), on the C++ kernels.

    CAM(x) = gamma A X + X, so combine_grams(grams, (gamma, 1)) is its centered Gram.
    """
    b, c, h, w = x.shape
    gram, _, _ = channel_attention_gram(x.reshape(b, c, h * w).contiguous(), float(temperature), False)
    return center_blocks(gram, 2)


class ChannelGramFunction(torch.autograd.Function):
    """(1, B, B) float64 centered Gram of CAM(features), features (B, C, N) contiguous."""

    @staticmethod
    def forward(ctx, features, gamma, temperature, backend):
        keep_attention = features.shape[1] <= features.shape[2]  # A (C x C) no larger than the map (C x N)
        keep_product = keep_attention and any(ctx.needs_input_grad[:2])
        attention, gram, product = _attention_and_gram(features, gamma, temperature, backend, keep_product)
        ctx.save_for_backward(features, gamma, attention if keep_attention else None, product)
        ctx.temperature, ctx.backend = temperature, backend
        return gram

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_gram):
        features, gamma, attention, product = ctx.saved_tensors
        acc = accumulation_dtype(features.dtype)
        h = centering_matrix(grad_gram.shape[-1], torch.float64, grad_gram.device)
        out = None
        if attention is None:  # not kept (the map is smaller than A): the forward again, out with it
            out, attention = channel_attention_forward(features, gamma, ctx.temperature, ctx.backend)
        if product is not None:
            # CAM(x) made panel by panel from the kept A X and mixed in the cache: dOut without CAM(x) as a map.
            m = gram_mixing(grad_gram, 1)[0].to(features.dtype).contiguous()
            grad_out = channel_attention_output_grad(features, product, gamma, m)
        else:
            if out is None:
                x = features.to(acc)
                out = torch.bmm(attention, x).mul_(gamma).add_(x)
            grad_out = _gram_input_grad(out.reshape(1, out.shape[0], -1), (h @ grad_gram @ h).to(acc), ctx.backend)
        grad_x, grad_gamma = channel_attention_backward(
            grad_out.reshape(features.shape).to(features.dtype), features, attention, gamma, ctx.temperature,
            ctx.needs_input_grad[0], ctx.backend,
        )
        return (grad_x if ctx.needs_input_grad[0] else None), grad_gamma, None, None


def channel_gram(x, gamma, *, temperature, backend):
    """Centered Gram (1, B, B), float64, of channel_attention(x, gamma): differentiable in x and gamma.

    ``backend`` is a resolved fused backend ("cpu" or "triton"); x (B, C, H, W).
    """
    b, c, h, w = x.shape
    features = x.reshape(b, c, h * w).contiguous()
    gamma_acc = gamma.reshape(1).to(accumulation_dtype(x.dtype))
    return ChannelGramFunction.apply(features, gamma_acc, float(temperature), backend)
