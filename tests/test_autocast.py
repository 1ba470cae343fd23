"""The ops and CSKDLoss under torch.autocast (bfloat16), on the CPU and, when there is one, on CUDA.

Autocast hands the ops float32 tensors (the teacher, the student's features
outside autocast's op list) and bfloat16 ones (a student's conv outputs)
side by side. What is expected:

- float32 input to a fused backend under autocast: exactly the float32
  computation. The kernels turn autocast off (cskd_kernels.backend.kernels):
  otherwise PyTorch calls inside them are re-dispatched to bfloat16 (the C++
  CAM kernel's at::bmm: a dtype error before the fix).
- The reference CKA turns autocast off for its Gram product (float32
  accumulation, SPEC section 1): it used to run in bfloat16 and return a
  bfloat16 CKA.
- bfloat16 input: runs (on the CPU "auto" takes the reference, the C++
  kernels run float32/float64 only; on CUDA the Triton kernels, float32
  accumulation), no dtype error, finite, within TOLERANCES[bfloat16] of the
  float32 computation on the same bfloat16-rounded inputs. CAM and PAM keep
  the input dtype, the losses (CKA, CWD) come out in float32.
- CSKDLoss: within CSKD_TOLERANCE of the float32 loss (below).

The ops are not on autocast's cast lists: like any unlisted op they run in
their inputs' dtype. Reduced precision comes from the bfloat16 tensors that
autocast's convolutions and products hand them (the student's features, the
PAM projections inside CSKDLoss); accumulation stays float32.
"""

import pytest
import torch

from cskd_kernels import CSKDLoss, channel_attention, cka_loss, cwd_loss, linear_cka, position_attention
from conftest import TOLERANCES, requires_cuda, requires_extension

BF16 = torch.bfloat16

# CSKDLoss in bfloat16 against float32: each CKA term is -log(CKA) with CKA
# near 1 for these inputs, so the loss is a small number and its error is
# absolute: bfloat16 features (8 mantissa bits) move CKA by up to about 5e-3
# (measured: 4.6e-3 at most over three seeds at these shapes), hence atol
# 1e-2 on loss, cam and pam; the gradient of feat_s within 5e-2 of its
# largest entry (measured up to 2.2e-2).
CSKD_TOLERANCE = {"loss_atol": 1e-2, "grad_rtol_of_max": 5e-2}

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=requires_cuda, id="cuda")]
FUSED_DEVICES = [pytest.param("cpu", marks=requires_extension, id="cpu"),
                 pytest.param("cuda", marks=requires_cuda, id="cuda")]


def _fused_backend(device):
    return "cpu" if device == "cpu" else "triton"


# Each case: (op(backend, *tensors), shapes of the tensors, indices of those that take a gradient).
CASES = {
    "linear_cka": (lambda b, x, y: linear_cka(x, y, backend=b), [(5, 3, 4, 3), (5, 7, 2)], (0, 1)),
    "cka_loss": (lambda b, x, y: cka_loss(x, y, backend=b), [(5, 3, 4, 3), (5, 7, 2)], (0, 1)),
    "channel_attention": (
        lambda b, x, g: channel_attention(x, g, temperature=2.0, backend=b), [(2, 5, 3, 4), (1,)], (0, 1)
    ),
    "cwd_loss": (lambda b, s, t: cwd_loss(s, t, temperature=2.0, backend=b), [(2, 3, 4, 5), (2, 3, 4, 5)], (0,)),
    "position_attention": (
        lambda b, q, k, v: position_attention(q, k, v, temperature=2.0, backend=b),
        [(2, 3, 5, 7), (2, 3, 5, 7), (2, 6, 5, 7)],
        (0, 1, 2),
    ),
    "position_attention_grid": (
        lambda b, q, k, v: position_attention(q, k, v, temperature=2.0, grid=(2, 3), backend=b),
        [(2, 3, 5, 7), (2, 3, 5, 7), (2, 6, 5, 7)],
        (0, 1, 2),
    ),
}


def _inputs(shapes, grads, device, dtype):
    tensors = [torch.randn(shape, device=device) for shape in shapes]
    tensors = [t.to(dtype) if len(t.shape) > 1 else t.fill_(0.6) for t in tensors]  # gamma stays float32
    return [t.requires_grad_(i in grads) for i, t in enumerate(tensors)]


def _run(op, backend, tensors, device, autocast):
    """op's output and the gradients of sum(w * output) (w fixed, random).

    Only the forward runs under autocast: PyTorch's documented pattern (its
    backward ops run in the dtypes autocast chose for the forward).
    """
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    with torch.autocast(device, dtype=BF16, enabled=autocast):
        out = op(backend, *leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(device)
    grads = torch.autograd.grad((out.float() * weight).sum(), [t for t in leaves if t.requires_grad])
    return out.detach(), grads


@pytest.mark.parametrize("device", FUSED_DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_float32_input_to_a_fused_backend_is_unaffected(device, case):
    """Autocast must not reach inside the kernels: the float32 result, to float32 rounding."""
    op, shapes, grads = CASES[case]
    backend = _fused_backend(device)
    tensors = _inputs(shapes, grads, device, torch.float32)
    expected, expected_grads = _run(op, backend, tensors, device, autocast=False)
    actual, actual_grads = _run(op, backend, tensors, device, autocast=True)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(actual_grads, expected_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_input_under_autocast(device, case):
    """bfloat16 features (a student under autocast) on backend="auto": finite, tolerance of float32."""
    op, shapes, grads = CASES[case]
    tensors = _inputs(shapes, grads, device, BF16)
    actual, actual_grads = _run(op, "auto", tensors, device, autocast=True)
    # The float32 computation on the same (already rounded) inputs, no autocast.
    expected, expected_grads = _run(op, "reference", [t.float() for t in tensors], device, autocast=False)
    losses = ("linear_cka", "cka_loss", "cwd_loss")
    assert actual.dtype == (torch.float32 if case in losses else BF16)
    assert torch.isfinite(actual).all()
    rtol, atol = TOLERANCES[BF16]
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol)
    for tensor, got, want in zip([t for t in tensors if t.requires_grad], actual_grads, expected_grads, strict=True):
        assert got.dtype == tensor.dtype  # float32 gamma keeps a float32 gradient next to bfloat16 x
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_channel_attention_float32_gamma_with_bfloat16_features(device):
    """The module's float32 gamma next to bfloat16 x: the output keeps x's dtype (it used to promote to float32)."""
    x = torch.randn(2, 5, 3, 4, device=device, dtype=BF16)
    gamma = torch.tensor([0.6], device=device, requires_grad=True)
    for autocast in (False, True):
        with torch.autocast(device, dtype=BF16, enabled=autocast):
            out = channel_attention(x, gamma)
        assert out.dtype == BF16, f"autocast={autocast}"


def _cskd_loss(device, projection):
    loss = CSKDLoss(16, 32, grid=(2, 3), projection=projection).to(device)
    with torch.no_grad():  # away from the initial 0, so attention changes the features
        loss.gamma_cam.fill_(0.5)
        loss.gamma_pam.fill_(0.7)
    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student_dtype", [torch.float32, BF16], ids=["float32-student", "bfloat16-student"])
@pytest.mark.parametrize("projection", ["fixed", "learned"])
def test_cskd_loss_under_autocast(device, student_dtype, projection):
    """The whole loss under autocast (the projections run in bfloat16) within CSKD_TOLERANCE of float32."""
    loss = _cskd_loss(device, projection)
    feat_s = torch.randn(4, 16, 9, 11, device=device).to(student_dtype)
    feat_t = torch.randn(4, 32, 9, 11, device=device)
    student = feat_s.detach().clone().requires_grad_(True)
    with torch.autocast(device, dtype=BF16):
        out = loss(student, feat_t)
    out.loss.backward()
    # float32 on the same rounded student features, no autocast.
    student_f32 = feat_s.float().requires_grad_(True)
    expected = loss(student_f32, feat_t)
    expected.loss.backward()
    for name, got, want in zip(out._fields, out, expected):
        assert got.dtype == torch.float32 and torch.isfinite(got), name
        torch.testing.assert_close(got, want, rtol=0, atol=CSKD_TOLERANCE["loss_atol"], msg=lambda m: f"{name}: {m}")
    assert student.grad.dtype == student_dtype and torch.isfinite(student.grad).all()
    scale = student_f32.grad.abs().max()
    error = (student.grad.float() - student_f32.grad).abs().max()
    assert error <= CSKD_TOLERANCE["grad_rtol_of_max"] * scale, f"feat_s gradient off by {error} (largest {scale})"

