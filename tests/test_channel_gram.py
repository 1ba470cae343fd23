"""channel_gram (the centered Gram of CAM's output, CAM recomputed from A in the backward) against the reference."""

import pytest
import torch

from cskd_kernels import CSKDLoss, reference
from cskd_kernels.ops import channel_gram as channel_gram_module
from cskd_kernels.ops.channel_attention import (channel_attention_forward, channel_attention_gram,
                                               channel_attention_output_grad)
from cskd_kernels.ops.channel_gram import channel_gram
from cskd_kernels.ops.cross_gram import cell_cross_gram, center_blocks, combine_grams
from cskd_kernels.ops.position_attention import cell_table
from conftest import HAS_EXTENSION, fused_backends


def _expected_gram(x, gamma, temperature):
    out = reference.channel_attention(x, gamma, temperature=temperature)
    flat = out.reshape(1, out.shape[0], -1).double()
    return reference.centered_gram(flat)


@pytest.mark.parametrize("backend,device", fused_backends())
# The last two have fewer positions than channels: A is not kept but made again in the backward.
@pytest.mark.parametrize("shape", [(5, 7, 3, 5), (2, 3, 4, 4), (6, 12, 5, 9), (4, 9, 2, 3), (3, 17, 1, 5)])
def test_matches_the_reference_values_and_gradients(backend, device, shape):
    dtype = torch.float64 if backend == "cpu" else torch.float32  # Triton kernels take float32 at most
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    x = (torch.randn(shape, dtype=dtype, device=device) + 3.0).requires_grad_(True)  # an offset for the centering
    gamma = torch.tensor([0.7], dtype=dtype, device=device, requires_grad=True)
    gram = channel_gram(x, gamma, temperature=2.0, backend=backend)
    # The reference in float64 on the CPU, whatever the backend computes in.
    x_ref = x.detach().cpu().double().requires_grad_(True)
    gamma_ref = gamma.detach().cpu().double().requires_grad_(True)
    expected = _expected_gram(x_ref, gamma_ref, 2.0)
    torch.testing.assert_close(gram.cpu(), expected, **tol)
    weights = torch.randn_like(expected)
    (gram * weights.to(gram.device)).sum().backward()
    (expected * weights).sum().backward()
    if dtype == torch.float32:  # gradients reach ~100 here: float32 rounding scales with them
        tol = dict(rtol=2e-4, atol=2e-5 * x_ref.grad.abs().max().item())
    torch.testing.assert_close(x.grad.cpu().double(), x_ref.grad, **tol)
    torch.testing.assert_close(gamma.grad.cpu().double(), gamma_ref.grad, **tol)


@pytest.mark.parametrize("backend,device", [p for p in fused_backends() if p.values[0] == "cpu"])
@pytest.mark.parametrize("shape", [(3, 4, 3, 3), (3, 7, 2, 2)])
def test_gradcheck_float64(backend, device, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g: channel_gram(x, g, temperature=1.5, backend=backend), (x, gamma))


@pytest.mark.parametrize("backend,device", fused_backends())
@pytest.mark.parametrize("shape,keeps", [((2, 4, 2, 3), True), ((2, 7, 2, 3), False)])
def test_attention_is_kept_only_when_no_larger_than_the_map(backend, device, shape, keeps):
    """A (C x C per image) is held for the backward only when C <= N; otherwise the backward makes it again."""
    x = torch.randn(shape, device=device, requires_grad=True)
    gamma = torch.tensor([0.5], device=device, requires_grad=True)
    gram = channel_gram(x, gamma, temperature=1.0, backend=backend)
    channels = shape[1]
    held = [t for t in gram.grad_fn.saved_tensors if t is not None and t.shape == (shape[0], channels, channels)]
    assert len(held) == (1 if keeps else 0)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# Panels of max(256, C rounded up to 64) columns: one short panel, several with a short last one, C above 256.
@pytest.mark.parametrize("shape", [(3, 5, 37), (4, 9, 517), (2, 300, 700), (5, 16, 512)])
def test_attention_gram_kernel_matches_the_forward_and_the_cross_gram(dtype, shape):
    """channel_attention_gram: A as the forward gives it, and cell_cross_gram's Gram of (A X, X), on any thread count."""
    b, c, n = shape
    x = torch.randn(shape, dtype=torch.float64).add_(4.0).to(dtype)  # a common offset: the shift keeps it accurate
    gram, attention, product = channel_attention_gram(x, 1.3, False)
    assert product.numel() == 0  # A X not kept
    out, expected_attention = channel_attention_forward(x, torch.ones(1, dtype=dtype), 1.3, "cpu")
    assert torch.equal(attention, expected_attention)
    kept_gram, _, kept_product = channel_attention_gram(x, 1.3, True)
    assert torch.equal(kept_gram, gram)  # the panels' Gram the same, whether A X is written or not
    product_tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    assert (kept_product - (out - x)).abs().max().item() <= product_tolerance * (out - x).abs().max().item()
    maps = [(out - x).view(b, c, 1, n), x.view(b, c, 1, n)]
    expected = cell_cross_gram(maps, cell_table(1, n, None, x.device), "cpu")
    assert gram.dtype == torch.float64 and gram.shape == (1, 2 * b, 2 * b)
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-6}[dtype]
    assert (gram - expected).abs().max().item() <= tolerance * expected.abs().max().item()
    # Against the reference's float64 CAM: the centered blocks make CAM's centered Gram with (gamma, 1).
    gamma = torch.tensor([0.6], dtype=torch.float64)
    cam = combine_grams(center_blocks(gram, 2), (gamma, 1.0))
    reference_gram = _expected_gram(x.double().view(b, c, 1, n), gamma, 1.3)
    torch.testing.assert_close(cam, reference_gram, rtol={torch.float64: 1e-9, torch.float32: 1e-4}[dtype],
                               atol={torch.float64: 1e-9, torch.float32: 1e-4}[dtype] * reference_gram.abs().max().item())
    # Panels summed in order, not as threads finish: every call gives the same bits. Across thread counts
    # only to rounding: MKL on Intel CPUs picks its float64 kernels by its thread setting.
    assert all(torch.equal(channel_attention_gram(x, 1.3, False)[0], gram) for _ in range(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert (channel_attention_gram(x, 1.3, False)[0] - gram).abs().max().item() <= tolerance * gram.abs().max().item()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")
def test_attention_gram_kernel_keeps_a_nan_visible():
    x = torch.randn(3, 8, 300)
    x[1, 2, 290] = float("nan")
    gram, attention, product = channel_attention_gram(x, 2.0, True)
    assert gram.isnan().any() and attention[1].isnan().any() and attention[0].isfinite().all()
    assert product[1].isnan().any() and product[0].isfinite().all()


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")
def test_cskd_loss_takes_both_cam_grams_through_the_kernel(monkeypatch):
    """On "cpu" the teacher's and the student's CAM Grams come from channel_attention_gram; the loss is the reference's."""
    calls = []
    original = channel_gram_module.channel_attention_gram

    def counting(features, temperature, keep_product):
        calls.append((features.shape[1], keep_product))
        return original(features, temperature, keep_product)
    monkeypatch.setattr(channel_gram_module, "channel_attention_gram", counting)
    feat_s, feat_t = torch.randn(4, 16, 9, 11, requires_grad=True), torch.randn(4, 32, 9, 11)
    results = []
    for backend in ("cpu", "reference"):
        loss = CSKDLoss(16, 32, lambda_pam=0.0, backend=backend)
        with torch.no_grad():
            loss.gamma_cam.fill_(0.4)
        cam = loss(feat_s, feat_t).cam
        results.append((cam, *torch.autograd.grad(cam, (feat_s, loss.gamma_cam))))
    assert calls == [(32, False), (16, True)]  # the teacher's, then the student's (A X kept), on "cpu" only
    for cpu, ref in zip(*results):
        torch.testing.assert_close(cpu, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 37), (4, 9, 517), (2, 300, 700)])
def test_output_grad_kernel_is_the_mixing_of_cam_output(dtype, shape):
    """channel_attention_output_grad = M (out - out_0), out = gamma A X + X from the kept A X, for a centered M:
    every panel, any C."""
    b, c, n = shape
    generator = torch.Generator().manual_seed(n)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) + 3.0).to(dtype)
    _, attention, product = channel_attention_gram(x, 1.4, True)
    h = torch.eye(b, dtype=torch.float64) - 1.0 / b
    m = h @ torch.randn(b, b, generator=generator, dtype=torch.float64) @ h
    gamma = torch.tensor([0.7], dtype=dtype)
    grad = channel_attention_output_grad(x, product, gamma, m.to(dtype).contiguous())
    out = 0.7 * torch.bmm(attention.double(), x.double()) + x.double()
    expected = torch.einsum("ij,jcn->icn", m, out - out[:1])
    assert grad.dtype == dtype and grad.shape == x.shape
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-5}[dtype]
    assert (grad.double() - expected).abs().max().item() <= tolerance * expected.abs().max().item()
