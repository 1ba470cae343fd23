"""The released CSKD code's formulations, restated: the baselines users are replacing.

Kept as close to the published code as possible (same operations, same
recomputation), with two changes that do not alter the arithmetic: tensors are
created on the input's device (the original hard-codes CUDA), and the loss is
written as in the released training script. Benchmarks time these against the
fused kernels; tests check them against the reference in float64.
"""

import torch


def centering(k):
    n = k.shape[0]
    unit = torch.ones([n, n], dtype=k.dtype, device=k.device)
    identity = torch.eye(n, dtype=k.dtype, device=k.device)
    h = identity - unit / n
    return torch.matmul(torch.matmul(h, k), h)


def linear_hsic(x, y):
    l_x = torch.matmul(x, x.T)
    l_y = torch.matmul(y, y.T)
    return torch.sum(centering(l_x) * centering(l_y))


def linear_cka(x, y):
    """The released linear CKA: three HSICs, six Gram products, a new centering matrix each time."""
    hsic = linear_hsic(x, y)
    var1 = torch.sqrt(linear_hsic(x, x))
    var2 = torch.sqrt(linear_hsic(y, y))
    return hsic / (var1 * var2)


def cka_loss(x, y):
    """The released loss on flattened features: -log(mean |CKA| + 1e-8), the 1e-8 inside the log.

    The released line is ``-torch.log(torch.mean(torch.abs(torch.div(hsic, (var1 * var2)))) + 1e-8)``:
    its last parenthesis closes the log.
    """
    cka = linear_cka(x.flatten(1), y.flatten(1))
    return -torch.log(torch.mean(torch.abs(cka)) + 1e-8)


def cwd_loss(preds_s, preds_t, temperature=1.0):
    """The released channel-wise distillation loss on logits.

    CIRKD's CriterionCWD with norm_type="channel" and divergence="kl", as the
    released CSKD training script builds it (the 1x1 conv it holds only runs
    when the channel counts differ, never for logits).

    Softmax over the H*W positions of each channel, then softmax().log() for
    the student: -inf once a student probability underflows, an infinite loss
    and NaN gradients.
    KLDivLoss(reduction="sum"), divided by n*c, times T^2.
    """
    n, c, h, w = preds_s.shape
    norm_s = (preds_s / temperature).reshape((n, c, -1)).softmax(dim=-1)
    norm_t = (preds_t.detach() / temperature).reshape((n, c, -1)).softmax(dim=-1)
    norm_s = norm_s.log()
    loss = torch.nn.KLDivLoss(reduction="sum")(norm_s, norm_t)
    loss /= n * c
    return loss * (temperature**2)


def channel_attention(x, gamma, temperature=1.0):
    """The released CAM (DANet's CAM_Module with CSKD's temperature): materialises E, rowmax(E) - E, A and A X.

    gamma is passed in (the released module holds it as a parameter initialised to 0).
    """
    m_batchsize, c, height, width = x.size()
    proj_query = x.contiguous().view(m_batchsize, c, -1)
    proj_key = x.contiguous().view(m_batchsize, c, -1).permute(0, 2, 1)
    energy = torch.bmm(proj_query, proj_key)
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = torch.softmax(energy_new / temperature, dim=-1)
    proj_value = x.contiguous().view(m_batchsize, c, -1)
    out = torch.bmm(attention, proj_value)
    out = out.contiguous().view(m_batchsize, c, height, width)
    return gamma * out + x
# --------------------------------------------------------------------------
# Position attention (DANet's PAM_Module, as the released CSKD code runs it)
# --------------------------------------------------------------------------


def position_attention_module(x, gamma, *, reduction=8, temperature=1.0):
    """DANet's PAM_Module forward with its 1x1 convolutions created inside the call.

    The released code builds a new PAM_Module (so new, default-initialised
    query/key/value Conv2d layers) every time it computes the loss; only gamma
    is shared. The HW x HW energy and attention maps are materialised, and the
    attention is transposed for the value product, as in DANet.
    """
    batch, channels, height, width = x.shape
    query_conv = torch.nn.Conv2d(channels, channels // reduction, kernel_size=1).to(device=x.device, dtype=x.dtype)
    key_conv = torch.nn.Conv2d(channels, channels // reduction, kernel_size=1).to(device=x.device, dtype=x.dtype)
    value_conv = torch.nn.Conv2d(channels, channels, kernel_size=1).to(device=x.device, dtype=x.dtype)
    proj_query = query_conv(x).view(batch, -1, width * height).permute(0, 2, 1)
    proj_key = key_conv(x).view(batch, -1, width * height)
    energy = torch.bmm(proj_query, proj_key) / temperature
    attention = torch.softmax(energy, dim=-1)
    proj_value = value_conv(x).view(batch, -1, width * height)
    out = torch.bmm(proj_value, attention.permute(0, 2, 1))
    out = out.view(batch, channels, height, width)
    return gamma * out + x


def position_attention_grid(x, gamma, *, grid=(5, 5), reduction=8, temperature=1.0):
    """The released grid mode: a Python loop over the torch.chunk cells, a fresh PAM_Module per cell."""
    rows = []
    for row in torch.chunk(x, grid[0], dim=2):
        cells = [position_attention_module(cell, gamma, reduction=reduction, temperature=temperature)
                 for cell in torch.chunk(row, grid[1], dim=3)]
        rows.append(torch.cat(cells, dim=3))
    return torch.cat(rows, dim=2)


def cskd_loss(feat_s, feat_t, gamma_cam, gamma_pam, *, temperature=2.0, lambda_cam=0.3, lambda_pam=0.8,
              grid=(5, 5), reduction=8):
    """The released CSKD loss: CAM and the four-Gram CKA, then a Python loop over the grid cells
    with a freshly built PAM_Module (new Conv2d layers) per cell and side."""
    feat_t = feat_t.detach()
    cam = cka_loss(channel_attention(feat_s, gamma_cam, temperature), channel_attention(feat_t, gamma_cam, temperature))
    if grid is None:
        pairs = [(feat_s, feat_t)]
    else:
        pairs = [
            (cell_s, cell_t)
            for row_s, row_t in zip(torch.chunk(feat_s, grid[0], dim=2), torch.chunk(feat_t, grid[0], dim=2))
            for cell_s, cell_t in zip(torch.chunk(row_s, grid[1], dim=3), torch.chunk(row_t, grid[1], dim=3))
        ]
    losses = [
        cka_loss(position_attention_module(s, gamma_pam, reduction=reduction, temperature=temperature),
                 position_attention_module(t, gamma_pam, reduction=reduction, temperature=temperature))
        for s, t in pairs
    ]
    pam = sum(losses) / len(losses)
    return lambda_cam * cam + lambda_pam * pam


# --------------------------------------------------------------------------
# The released CriterionSA's seven modes (losses/sa.py) and CriterionKD
# --------------------------------------------------------------------------

RELEASED_MODES = ("CAM_MSE", "CAM_CKA", "PAM_CKA", "gridPAM_MSE", "gridPAM_CKA",
                  "separately_CAMgridPAM_MSE", "separately_CAMgridPAM_CKA")


def _grid_pams(x, gamma, grid, reduction, temperature):
    """The released cell loop: torch.chunk rows, then columns, a fresh PAM_Module per cell."""
    parts = []
    for row in torch.chunk(x, grid[0], dim=2):
        for cell in torch.chunk(row, grid[1], dim=3):
            parts.append(position_attention_module(cell, gamma, reduction=reduction, temperature=temperature))
    return parts


def criterion_sa(feat_s, feat_t, gamma_cam, gamma_pam, feature_transform, *, temperature=1.0, grid=(5, 5),
                 reduction=8):
    """The released ``CriterionSA.forward(feat_S, feat_T, feature_transform)``, every mode, as released.

    ``temperature`` is its ``temperaturesa`` (the CAM's and PAM's); the
    released code hard-codes the 5 x 5 grid (``grid``). Every call builds the
    student adapter ``nn.Conv2d(CS, CT, 1, bias=False)`` first, in every mode
    (the CKA modes draw it and never use it), then, in the *_MSE modes, maps
    the student through it and takes ``nn.MSELoss()`` (mean) of the CAMs and,
    cell by cell, of the PAMs (whose fresh projections then have the
    teacher's width); the per-cell MSEs (or CKA losses) are summed and divided
    by the number of cells. CAM-only and PAM-only modes return one loss, the
    separately_* modes (loss_CAM, loss_PAM). The teacher features are used
    as given (the released script computes them under no_grad).
    """
    if feature_transform not in RELEASED_MODES:
        raise ValueError(f"feature_transform={feature_transform!r} is not one of {RELEASED_MODES}")
    channels_s, channels_t = feat_s.shape[1], feat_t.shape[1]
    conv = torch.nn.Conv2d(channels_s, channels_t, kernel_size=1, bias=False).to(device=feat_s.device,
                                                                                 dtype=feat_s.dtype)
    mse = torch.nn.MSELoss(reduction="mean")

    def cam(x):
        return channel_attention(x, gamma_cam, temperature)

    def grid_pams(x):
        return _grid_pams(x, gamma_pam, grid, reduction, temperature)

    if feature_transform == "CAM_MSE":
        feat_s = conv(feat_s)
        return mse(cam(feat_s), cam(feat_t))
    if feature_transform == "CAM_CKA":
        return cka_loss(cam(feat_s), cam(feat_t))
    if feature_transform == "PAM_CKA":
        return cka_loss(position_attention_module(feat_s, gamma_pam, reduction=reduction, temperature=temperature),
                        position_attention_module(feat_t, gamma_pam, reduction=reduction, temperature=temperature))
    mse_mode = feature_transform.endswith("_MSE")
    if mse_mode:
        feat_s = conv(feat_s)
    parts_s, parts_t = grid_pams(feat_s), grid_pams(feat_t)
    n = len(parts_s)
    loss_pam = 0
    for i in range(0, n):
        loss_pam += mse(parts_s[i], parts_t[i]) if mse_mode else cka_loss(parts_s[i], parts_t[i])
    loss_pam = loss_pam / n
    if feature_transform.startswith("gridPAM"):
        return loss_pam
    loss_cam = mse(cam(feat_s), cam(feat_t)) if mse_mode else cka_loss(cam(feat_s), cam(feat_t))
    return loss_cam, loss_pam


def kd_loss(pred, soft, temperature=1.0):
    """The released CriterionKD (CIRKD's losses/kd.py): Hinton KD on logits, pixel by pixel.

    softmax over the classes of each pixel's logits / T; KL(teacher || student)
    summed over classes and pixels, divided by the B*H*W pixels
    (``reduction="batchmean"`` of the (B*H*W, C) rows), times T^2.
    """
    b, c, h, w = soft.size()
    scale_pred = pred.permute(0, 2, 3, 1).contiguous().view(-1, c)
    scale_soft = soft.permute(0, 2, 3, 1).contiguous().view(-1, c)
    p_s = torch.nn.functional.log_softmax(scale_pred / temperature, dim=1)
    p_t = torch.nn.functional.softmax(scale_soft / temperature, dim=1)
    return torch.nn.functional.kl_div(p_s, p_t, reduction="batchmean") * (temperature**2)
