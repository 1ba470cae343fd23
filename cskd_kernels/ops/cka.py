"""Linear CKA and the CKA loss (SPEC section 1), fused.

The heavy work is one pass over each input: the kernels compute the centered
Gram matrix Kc = (H x)(H x)^T of each group directly (float32 or float64
accumulation), so x x^T is formed once and never recomputed for the three
HSIC terms. Everything after that is algebra on tiny n x n matrices, done in
PyTorch (float64) inside one autograd node with a closed-form gradient. The
backward of a Gram needs dL/dKc = G (n x n) and then one pass over x:

    dL/dx = H (G + G^T) H x = M (x - x_0)     (M centered, x_0 the first sample)

which is the kernel's backward. An input that does not require grad (the
teacher) costs no backward work at all.

Kernels per backend (same contract everywhere):
    centered_gram(x)            x (g, n, p) -> Kc (g, n, n), float32/float64
    centered_gram_backward(x, m)              -> M (x - x_0), shape and dtype of x
"""

import torch
from torch.autograd.function import once_differentiable

from cskd_kernels import reference
from cskd_kernels._validation import accumulation_dtype, check_float_tensor, check_same_device
from cskd_kernels._library import kernel_op
from cskd_kernels.backend import kernels, resolve_backend

# Samples (rows) a Triton Gram kernel takes: every sample of a column sits in one register tile.
# The CKA's and the per-cell cross-Grams' kernels share it (cskd_kernels/triton/).
TRITON_MAX_SAMPLES = 128


def centering_matrix(n, dtype, device):
    return torch.eye(n, dtype=dtype, device=device) - 1.0 / n


# The two passes are PyTorch ops (cskd_kernels._library: a custom op, and a
# triton_op on the Triton backend) with a registered autograd formula.


@kernel_op("cka_centered_gram")
def centered_gram(x: torch.Tensor, backend: str) -> torch.Tensor:
    """Kc = (H x)(H x)^T per group, x (g, n, p) -> (g, n, n) in float32 (float64 for float64 x)."""
    return kernels("cka", backend).centered_gram(x)


@centered_gram.register_fake
def _centered_gram_fake(x, backend):
    return x.new_empty((x.shape[0], x.shape[1], x.shape[1]), dtype=accumulation_dtype(x.dtype))


@kernel_op("cka_centered_gram_backward")
def centered_gram_backward(x: torch.Tensor, m: torch.Tensor, backend: str) -> torch.Tensor:
    """M (x - x_0) for a centered n x n matrix M per group: one pass over x."""
    return kernels("cka", backend).centered_gram_backward(x, m)


@centered_gram_backward.register_fake
def _centered_gram_backward_fake(x, m, backend):
    return torch.empty_like(x)


def _centered_gram_setup(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _gram_input_grad(x, grad_gram, backend):
    """dL/dx from dL/dKc = G: H (G + G^T) H x = M (x - x_0), H x = H (x - x_0), one pass over x."""
    h = centering_matrix(x.shape[1], grad_gram.dtype, grad_gram.device)
    m = h @ (grad_gram + grad_gram.transpose(1, 2)) @ h
    return centered_gram_backward(x, m.contiguous(), backend)


def _centered_gram_grad(ctx, grad_gram):
    (x,) = ctx.saved_tensors
    return _gram_input_grad(x, grad_gram, ctx.backend), None


centered_gram.register_autograd(_centered_gram_grad, setup_context=_centered_gram_setup)


def _prepare(x, y, unbiased, grouped):
    """Validate and return (g, n, p), (g, n, q) views."""
    check_float_tensor("x", x)
    check_float_tensor("y", y)
    check_same_device(x=x, y=y)
    sample_dim = 1 if grouped else 0
    min_dims = 2 if grouped else 1
    for name, t in (("x", x), ("y", y)):
        if t.dim() < min_dims:
            raise ValueError(f"{name} of shape {tuple(t.shape)} has no {'group and ' if grouped else ''}sample dimension")
    if grouped and x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} have different numbers of groups")
    n = x.shape[sample_dim]
    if y.shape[sample_dim] != n:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} have different numbers of samples n")
    min_n = 4 if unbiased else 2
    if n < min_n:
        estimator = "the unbiased estimator" if unbiased else "linear CKA"
        raise ValueError(f"{estimator} needs n >= {min_n} samples, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    return reference.as_cka_groups(x, y, grouped)


def _hsic_gradient(lc, unbiased):
    """The gradient of hsic(kc, lc) with respect to kc (symmetrized; it does not depend on kc).

    HSIC is bilinear and symmetric in its two Grams, so the gradient of
    hsic(kc, kc) is twice this with lc = kc. Only the symmetric part of a Gram
    gradient matters (the input gradient uses G + G^T).
    """
    if not unbiased:
        return lc
    n = lc.shape[-1]
    off_diagonal = 1.0 - torch.eye(n, dtype=lc.dtype, device=lc.device)
    l = lc * off_diagonal
    row_sums = l.sum(dim=-1, keepdim=True)  # L~ 1, (g, n, 1)
    total = row_sums.sum(dim=-2, keepdim=True)  # 1^T L~ 1
    # d/dK~ of tr(K~ L~) + (1^T K~ 1)(1^T L~ 1)/((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1, symmetrized;
    # the zeroed diagonal of K~ takes no gradient.
    grad = l + total / ((n - 1) * (n - 2)) - (row_sums + row_sums.transpose(-1, -2)) / (n - 2)
    return grad * off_diagonal / (n * (n - 3))


class _FusedCka(torch.autograd.Function):
    """CKA (or the CKA loss) of x (g, n, p) and y (g, n, q) from the two fused Gram passes.

    One autograd node for the whole op: the n x n head runs in float64 without
    recording a graph (a few dozen tiny ops and their autograd nodes cost more
    than the Gram kernels' own overhead), and the backward applies its closed-form
    gradient: with s_k = sqrt(hsic(Kc, Kc)), s_l = sqrt(hsic(Lc, Lc)),
    dCKA/dKc = A(Lc) / (s_k s_l) - CKA A(Kc) / s_k^2 (A = _hsic_gradient), then
    one backward pass over each input that needs a gradient.
    """

    @staticmethod
    def forward(ctx, x, y, backend, unbiased, eps, tiny):
        # The n x n algebra runs in float64: the unbiased estimator cancels terms
        # of order p (the Gram entries) down to the signal, which float32 loses.
        kc = centered_gram(x, backend).double()
        lc = centered_gram(y, backend).double()
        cka = reference.cka_from_grams(kc, lc, unbiased=unbiased, tiny=tiny)
        ctx.save_for_backward(x, y, kc, lc, cka)
        ctx.config = (backend, unbiased, eps, tiny)
        out = cka if eps is None else reference.cka_loss_from_cka(cka, eps)
        return out.to(accumulation_dtype(x.dtype, y.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, y, kc, lc, cka = ctx.saved_tensors
        backend, unbiased, eps, tiny = ctx.config
        grad_cka = grad_out.double()
        if eps is not None:
            # d(-log max(|c|, eps))/dc = -1/c above the clamp, 0 below it (as autograd of the reference).
            grad_cka = torch.where(cka.abs() >= eps, -grad_cka / cka, torch.zeros_like(cka))
        hkk = reference.hsic(kc, kc, unbiased=unbiased).clamp_min(tiny)
        hll = reference.hsic(lc, lc, unbiased=unbiased).clamp_min(tiny)
        scale = (grad_cka / (hkk.sqrt() * hll.sqrt()))[:, None, None]
        a_k, a_l = _hsic_gradient(kc, unbiased), _hsic_gradient(lc, unbiased)
        grad_x = grad_y = None
        # Below the clamp a Gram is exactly zero, so its own term vanishes as the clamp's gradient does.
        if ctx.needs_input_grad[0]:
            grad_x = _gram_input_grad(x, scale * a_l - (grad_cka * cka / hkk)[:, None, None] * a_k, backend)
        if ctx.needs_input_grad[1]:
            grad_y = _gram_input_grad(y, scale * a_k - (grad_cka * cka / hll)[:, None, None] * a_l, backend)
        return grad_x, grad_y, None, None, None, None


def _fused(x, y, unbiased, grouped, backend, eps):
    """linear_cka (eps None) or cka_loss of the validated inputs."""
    xg, yg = _prepare(x, y, unbiased, grouped)
    name = resolve_backend(backend, xg, yg)
    acc = accumulation_dtype(xg.dtype, yg.dtype)
    tiny = torch.finfo(acc).tiny
    if name == "reference":
        out = reference.cka_from_grams(reference.centered_gram(xg.to(acc)), reference.centered_gram(yg.to(acc)),
                                       unbiased=unbiased, tiny=tiny)
        if eps is not None:
            out = reference.cka_loss_from_cka(out, eps)
    else:
        out = _FusedCka.apply(xg, yg, name, unbiased, eps, tiny)
    return out if grouped else out[0]


def linear_cka(x, y, *, unbiased=False, grouped=False, backend=None):
    """Linear CKA of x (n, ...) and y (n, ...): samples along dim 0, features flattened.

    p and q (the flattened feature sizes) may differ. With ``grouped=True``
    dim 0 is a group dimension: x (g, n, ...) and y (g, n, ...) give g
    independent CKAs, shape (g,). ``unbiased`` selects Song et al.'s estimator
    (n >= 4). A side with no variance gives 0 with finite gradients.

    Bias: with few samples and many features the biased estimator (the
    paper's, the default) is close to 1 even for unrelated data. Random
    x (8, 16384) and y (8, 32768) give 0.9997 biased and 0.054 unbiased:
    compare CKAs of one n and one p, or pass ``unbiased=True`` (Song et al.)
    when the value itself matters. CSKDLoss uses the biased estimator, as
    released, for its gradient signal.
    """

    return _fused(x, y, unbiased, grouped, backend, None)


def cka_loss(x, y, *, unbiased=False, eps=1e-8, grouped=False, backend=None):
    """-log(max(|CKA(x, y)|, eps)), the CSKD similarity loss (same arguments as linear_cka)."""

    return _fused(x, y, unbiased, grouped, backend, eps)
