"""Plain PyTorch implementations of every op in SPEC.md: the specification in code.

These functions define what every fused backend must compute (values and,
through autograd, gradients). They favour clarity over speed and materialise
every intermediate (Gram matrices, the N x N position affinity map). Inputs are
assumed valid: the public ops in cskd_kernels.ops check them first.
Tests and benchmarks import the reference from here and nowhere else.
"""

import torch
import torch.nn.functional as F

from cskd_kernels._validation import accumulation_dtype

# --------------------------------------------------------------------------
# Linear CKA (SPEC section 1)
# --------------------------------------------------------------------------


def centered_features(x):
    """H x for x of shape (..., n, p): the features minus their mean over the n samples.

    The first sample is subtracted before the mean. Centering is invariant to
    that shift, and it makes a constant (zero-variance) column exactly zero in
    floating point, so a side with no variance gives an exactly zero centered
    Gram matrix and CKA = 0 instead of rounding noise.
    """
    shifted = x - x[..., :1, :]
    return shifted - shifted.mean(dim=-2, keepdim=True)


def centered_gram(x):
    """Hc K Hc with K = x x^T, for x of shape (..., n, p); equals (H x)(H x)^T, in x's dtype.

    Autocast is turned off for the product: it would run it in bfloat16,
    and the Gram entries must accumulate in the dtype the caller chose
    (float32 at least).
    """
    xc = centered_features(x)
    with torch.autocast(x.device.type, enabled=False):
        return xc @ xc.transpose(-1, -2)


def hsic(kc, lc, *, unbiased=False):
    """HSIC of two centered Gram matrices (..., n, n).

    Biased: sum(Kc * Lc). Unbiased (Song et al. 2012): the U-statistic on the
    Grams with zeroed diagonals. The unbiased estimator is invariant to
    centering the features, so it is evaluated on Kc, Lc as well.
    """
    if not unbiased:
        return (kc * lc).sum(dim=(-2, -1))
    n = kc.shape[-1]
    off_diagonal = 1.0 - torch.eye(n, dtype=kc.dtype, device=kc.device)
    k = kc * off_diagonal
    l = lc * off_diagonal
    trace_kl = (k * l).sum(dim=(-2, -1))
    sum_k = k.sum(dim=(-2, -1))
    sum_l = l.sum(dim=(-2, -1))
    ones_k_l_ones = (k.sum(dim=-1) * l.sum(dim=-1)).sum(dim=-1)  # 1^T K L 1, K and L symmetric
    return (trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_k_l_ones) / (n * (n - 3))


def cka_from_grams(kc, lc, *, unbiased=False, tiny=None):
    """CKA from centered Grams; the denominator is clamped so a zero-variance side gives 0.

    ``tiny``, the clamp, defaults to the smallest normal number of the Grams'
    dtype; pass the input precision's when the Grams are held wider, so the
    gradient of a zero-variance side stays finite in the input dtype.
    """
    if tiny is None:
        tiny = torch.finfo(kc.dtype).tiny
    hkl = hsic(kc, lc, unbiased=unbiased)
    hkk = hsic(kc, kc, unbiased=unbiased).clamp_min(tiny)
    hll = hsic(lc, lc, unbiased=unbiased).clamp_min(tiny)
    # Two square roots instead of sqrt(hkk * hll): the product underflows for small features.
    return hkl / (hkk.sqrt() * hll.sqrt())


def as_cka_groups(x, y, grouped):
    """(g, n, p) and (g, n, q) views of the inputs (g = 1 when not grouped)."""
    if grouped:
        return x.reshape(x.shape[0], x.shape[1], -1), y.reshape(y.shape[0], y.shape[1], -1)
    return x.reshape(1, x.shape[0], -1), y.reshape(1, y.shape[0], -1)


def linear_cka(x, y, *, unbiased=False, grouped=False):
    """Linear CKA between x (n, ...) and y (n, ...); with grouped=True, (g, n, ...) -> (g,)."""
    acc = accumulation_dtype(x.dtype, y.dtype)
    xg, yg = as_cka_groups(x, y, grouped)
    cka = cka_from_grams(centered_gram(xg.to(acc)), centered_gram(yg.to(acc)), unbiased=unbiased)
    return cka if grouped else cka[0]


def cka_loss_from_cka(cka, eps=1e-8):
    return -torch.log(cka.abs().clamp_min(eps))


def cka_loss(x, y, *, unbiased=False, eps=1e-8, grouped=False):
    """-log(max(|CKA|, eps))."""
    return cka_loss_from_cka(linear_cka(x, y, unbiased=unbiased, grouped=grouped), eps)


# --------------------------------------------------------------------------
# Channel self-attention, CAM (SPEC section 2)
# --------------------------------------------------------------------------


def channel_attention(x, gamma, *, temperature=1.0):
    """gamma * softmax_rows((rowmax(E) - E) / T) X + X with E = X X^T, per image."""
    b, c, h, w = x.shape
    features = x.reshape(b, c, h * w)
    energy = features @ features.transpose(1, 2)
    # softmax((rowmax(E) - E) / T) == softmax(-E / T); softmax subtracts the row max itself.
    attention = torch.softmax(-energy / temperature, dim=-1)
    out = attention @ features
    # gamma is a float32 parameter while features may be bfloat16 (autocast, a
    # half-precision student): the sum promotes, the result keeps x's dtype.
    return (gamma * out + features).to(x.dtype).reshape(b, c, h, w)


# --------------------------------------------------------------------------
# Position self-attention core, PAM (SPEC section 3)
# --------------------------------------------------------------------------


def _global_position_attention(q, k, v, temperature):
    b, _, h, w = q.shape
    query = q.reshape(b, q.shape[1], h * w)
    key = k.reshape(b, k.shape[1], h * w)
    value = v.reshape(b, v.shape[1], h * w)
    scores = query.transpose(1, 2) @ key / temperature  # (B, N, N): materialised on purpose
    probabilities = torch.softmax(scores, dim=-1)
    out = value @ probabilities.transpose(1, 2)
    return out.reshape(b, v.shape[1], h, w)


def grid_cells(x, grid):
    """The cells of x (B, C, H, W) exactly as torch.chunk cuts them: a list of rows of cells."""
    gh, gw = grid
    return [list(torch.chunk(row, gw, dim=3)) for row in torch.chunk(x, gh, dim=2)]


def position_attention(q, k, v, *, temperature=1.0, grid=None):
    """softmax(Q^T K / T) applied to V, globally or inside each torch.chunk grid cell."""
    if grid is None:
        return _global_position_attention(q, k, v, temperature)
    rows = []
    for q_row, k_row, v_row in zip(grid_cells(q, grid), grid_cells(k, grid), grid_cells(v, grid)):
        cells = [_global_position_attention(qc, kc, vc, temperature) for qc, kc, vc in zip(q_row, k_row, v_row)]
        rows.append(torch.cat(cells, dim=3))
    return torch.cat(rows, dim=2)


# --------------------------------------------------------------------------
# Channel-wise distillation on logits, CWD (SPEC section 4)
# --------------------------------------------------------------------------


def cwd_loss(s, t, *, temperature=1.0):
    """T^2 / (B*C) * sum KL(softmax_N(t/T) || softmax_N(s/T)); no gradient to t."""
    b, c, h, w = s.shape
    student = s.reshape(b * c, h * w) / temperature
    teacher = t.detach().reshape(b * c, h * w) / temperature
    log_p_t = F.log_softmax(teacher, dim=-1)
    log_p_s = F.log_softmax(student, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * temperature**2 / (b * c)


# --------------------------------------------------------------------------
# The CSKD loss (SPEC section 5), composed from the reference ops
# --------------------------------------------------------------------------


def position_attention_module(x, gamma, projection, *, temperature=1.0):
    """PAM(x) = gamma * position_attention(Wq x + bq, Wk x + bk, Wv x + bv) + x, global attention.

    ``projection`` is (wq, bq, wk, bk, wv, bv) with 2-D weights (out, in).
    """
    wq, bq, wk, bk, wv, bv = projection
    q = F.conv2d(x, wq[:, :, None, None], bq)
    k = F.conv2d(x, wk[:, :, None, None], bk)
    v = F.conv2d(x, wv[:, :, None, None], bv)
    return gamma * position_attention(q, k, v, temperature=temperature) + x


def cskd_loss(feat_s, feat_t, gamma_cam, gamma_pam, projections_s, projections_t, *, temperature=2.0,
              lambda_cam=0.3, lambda_pam=0.8, grid=(5, 5)):
    """lambda_cam * cam + lambda_pam * pam, as SPEC section 5 states it, one cell at a time.

    ``projections_s`` / ``projections_t``: a callable ``cell_index -> (wq, bq, wk, bk, wv, bv)``
    (cell_index is 0 in global mode), so fixed, learned and per-cell resampled
    projections all fit. Returns (loss, cam, pam).
    """
    feat_t = feat_t.detach()
    cam = cka_loss(channel_attention(feat_s, gamma_cam, temperature=temperature),
                   channel_attention(feat_t, gamma_cam, temperature=temperature))
    if grid is None:
        pam = cka_loss(position_attention_module(feat_s, gamma_pam, projections_s(0), temperature=temperature),
                       position_attention_module(feat_t, gamma_pam, projections_t(0), temperature=temperature))
    else:
        cells_s = [cell for row in grid_cells(feat_s, grid) for cell in row]
        cells_t = [cell for row in grid_cells(feat_t, grid) for cell in row]
        losses = [
            cka_loss(position_attention_module(cs, gamma_pam, projections_s(i), temperature=temperature),
                     position_attention_module(ct, gamma_pam, projections_t(i), temperature=temperature))
            for i, (cs, ct) in enumerate(zip(cells_s, cells_t))
        ]
        pam = torch.stack(losses).mean()
    return lambda_cam * cam + lambda_pam * pam, cam, pam
