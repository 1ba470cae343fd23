"""Linear CKA and the CKA loss (SPEC section 1), fused.

The heavy work is one pass over each input: the kernels compute the centered
Gram matrix Kc = (H x)(H x)^T of each group directly (float32 or float64
accumulation), so x x^T is formed once and never recomputed for the three
HSIC terms. Everything after that is algebra on tiny n x n matrices, done in
PyTorch and differentiated by autograd. The backward of a Gram needs
dL/dKc = G (n x n) and then one pass over x:

    dL/dx = H (G + G^T) H x = M (x - x_0)     (M centered, x_0 the first sample)

which is the kernel's backward. An input that does not require grad (the
teacher) costs no backward work at all.

Kernels per backend (same contract everywhere):
    centered_gram(x)            x (g, n, p) -> Kc (g, n, n), float32/float64
    centered_gram_backward(x, m)              -> M (x - x_0), shape and dtype of x
"""

import torch

from cskd_kernels import reference
from cskd_kernels._validation import accumulation_dtype, check_float_tensor, check_same_device
from cskd_kernels.backend import kernels, resolve_backend


def _centering_matrix(n, dtype, device):
    return torch.eye(n, dtype=dtype, device=device) - 1.0 / n


# The two passes are PyTorch custom ops with a registered autograd formula (an
# autograd Function with a custom backward that torch.compile sees as one op).


@torch.library.custom_op("cskd::cka_centered_gram", mutates_args=())
def centered_gram(x: torch.Tensor, backend: str) -> torch.Tensor:
    """Kc = (H x)(H x)^T per group, x (g, n, p) -> (g, n, n) in float32 (float64 for float64 x)."""
    return kernels("cka", backend).centered_gram(x)


@centered_gram.register_fake
def _centered_gram_fake(x, backend):
    return x.new_empty((x.shape[0], x.shape[1], x.shape[1]), dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("cskd::cka_centered_gram_backward", mutates_args=())
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


def _centered_gram_grad(ctx, grad_gram):
    (x,) = ctx.saved_tensors
    # dL/dx = H (G + G^T) H x, and H x = H (x - x_0): the kernel applies M to x - x_0.
    h = _centering_matrix(x.shape[1], grad_gram.dtype, grad_gram.device)
    m = h @ (grad_gram + grad_gram.transpose(1, 2)) @ h
    return centered_gram_backward(x, m.contiguous(), ctx.backend), None


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


def _fused(x, y, unbiased, grouped, backend, head):
    xg, yg = _prepare(x, y, unbiased, grouped)
    name = resolve_backend(backend, xg, yg)
    acc = accumulation_dtype(xg.dtype, yg.dtype)
    if name == "reference":
        out = head(reference.centered_gram(xg.to(acc)), reference.centered_gram(yg.to(acc)), torch.finfo(acc).tiny)
    else:
        # The n x n algebra runs in float64: the unbiased estimator cancels terms
        # of order p (the Gram entries) down to the signal, which float32 loses.
        kc = centered_gram(xg, name).double()
        lc = centered_gram(yg, name).double()
        out = head(kc, lc, torch.finfo(acc).tiny).to(acc)
    return out if grouped else out[0]


def linear_cka(x, y, *, unbiased=False, grouped=False, backend=None):
    """Linear CKA of x (n, ...) and y (n, ...): samples along dim 0, features flattened.

    p and q (the flattened feature sizes) may differ. With ``grouped=True``
    dim 0 is a group dimension: x (g, n, ...) and y (g, n, ...) give g
    independent CKAs, shape (g,). ``unbiased`` selects Song et al.'s estimator
    (n >= 4). A side with no variance gives 0 with finite gradients.
    """

    def head(kc, lc, tiny):
        return reference.cka_from_grams(kc, lc, unbiased=unbiased, tiny=tiny)

    return _fused(x, y, unbiased, grouped, backend, head)


def cka_loss(x, y, *, unbiased=False, eps=1e-8, grouped=False, backend=None):
    """-log(max(|CKA(x, y)|, eps)), the CSKD similarity loss (same arguments as linear_cka)."""

    def head(kc, lc, tiny):
        return reference.cka_loss_from_cka(reference.cka_from_grams(kc, lc, unbiased=unbiased, tiny=tiny), eps)

    return _fused(x, y, unbiased, grouped, backend, head)
