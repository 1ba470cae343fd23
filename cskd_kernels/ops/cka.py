"""Linear CKA and the CKA loss (SPEC section 1), fused.

The heavy work is one pass over each input: the kernels compute the centered
Gram matrix Kc = (H x)(H x)^T of each group directly (float32 or float64
accumulation), so x x^T is formed once and never recomputed for the three
HSIC terms. Everything after that is algebra on tiny n x n matrices, done in
PyTorch. The backward needs dL/dKc = G (n x n) and then one pass over x:

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
from cskd_kernels.backend import extension, resolve_backend, triton_kernels


def _cpu_kernels():
    ext = extension()
    return ext.cka_centered_gram, ext.cka_centered_gram_backward


def _triton_kernels():
    module = triton_kernels("cka")
    return module.centered_gram, module.centered_gram_backward


_KERNELS = {"cpu": _cpu_kernels, "triton": _triton_kernels}


def _centering_matrix(n, dtype, device):
    return torch.eye(n, dtype=dtype, device=device) - 1.0 / n


class FusedCKAFunction(torch.autograd.Function):
    """head(Kc, Lc) for fused centered Grams; ``head`` is the small n x n algebra (CKA or its loss)."""

    @staticmethod
    def forward(ctx, x, y, head, backend):
        gram, _ = _KERNELS[backend]()
        acc = accumulation_dtype(x.dtype, y.dtype)
        kc = gram(x).to(acc)
        lc = gram(y).to(acc)
        ctx.head = head
        ctx.backend = backend
        ctx.save_for_backward(x, y, kc, lc)
        return head(kc, lc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, y, kc, lc = ctx.saved_tensors
        _, gram_backward = _KERNELS[ctx.backend]()
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The n x n algebra is differentiated by autograd: it is tiny and this
        # keeps one definition of it. The passes over x and y are the kernels'.
        with torch.enable_grad():
            kc = kc.detach().requires_grad_(need_x)
            lc = lc.detach().requires_grad_(need_y)
            out = ctx.head(kc, lc)
            wanted = [t for t, need in ((kc, need_x), (lc, need_y)) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        dx = _gram_input_grad(gram_backward, x, next(grads)) if need_x else None
        dy = _gram_input_grad(gram_backward, y, next(grads)) if need_y else None
        return dx, dy, None, None


def _gram_input_grad(gram_backward, x, grad_gram):
    n = x.shape[1]
    h = _centering_matrix(n, grad_gram.dtype, grad_gram.device)
    m = h @ (grad_gram + grad_gram.transpose(1, 2)) @ h
    return gram_backward(x, m.contiguous())


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
    if name == "reference":
        acc = accumulation_dtype(xg.dtype, yg.dtype)
        out = head(reference.centered_gram(xg.to(acc)), reference.centered_gram(yg.to(acc)))
    else:
        out = FusedCKAFunction.apply(xg, yg, head, name)
    return out if grouped else out[0]


def linear_cka(x, y, *, unbiased=False, grouped=False, backend=None):
    """Linear CKA of x (n, ...) and y (n, ...): samples along dim 0, features flattened.

    p and q (the flattened feature sizes) may differ. With ``grouped=True``
    dim 0 is a group dimension: x (g, n, ...) and y (g, n, ...) give g
    independent CKAs, shape (g,). ``unbiased`` selects Song et al.'s estimator
    (n >= 4). A side with no variance gives 0 with finite gradients.
    """

    def head(kc, lc):
        return reference.cka_from_grams(kc, lc, unbiased=unbiased)

    return _fused(x, y, unbiased, grouped, backend, head)


def cka_loss(x, y, *, unbiased=False, eps=1e-8, grouped=False, backend=None):
    """-log(max(|CKA(x, y)|, eps)), the CSKD similarity loss (same arguments as linear_cka)."""

    def head(kc, lc):
        return reference.cka_loss_from_cka(reference.cka_from_grams(kc, lc, unbiased=unbiased), eps)

    return _fused(x, y, unbiased, grouped, backend, head)
