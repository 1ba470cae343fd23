"""channel_gram (the centered Gram of CAM's output, CAM recomputed from A in the backward) against the reference."""

import pytest
import torch

from cskd_kernels import reference
from cskd_kernels.ops.channel_gram import channel_gram
from conftest import fused_backends


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
