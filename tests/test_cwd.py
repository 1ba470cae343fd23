"""cwd_loss and CWDLoss (SPEC section 4): every backend against the reference, values and gradients."""

import math

import pytest
import torch

from cskd_kernels import CWDLoss, cwd_loss, reference, released
from cskd_kernels.backend import BackendError

from conftest import HAS_CUDA, HAS_EXTENSION, TOLERANCES, fused_backends, requires_cuda, requires_extension

# Odd sizes hit the tail paths of every kernel (blocks of 8 lanes, 512 and 4096 columns).
SMALL_SHAPES = [(2, 3, 5, 9), (1, 19, 8, 16), (3, 2, 1, 1), (1, 1, 33, 37)]
# Segmentation sizes: Cityscapes (19 classes) and VOC (21) at 64x128, plus odd maps.
LARGE_SHAPES = [(2, 19, 64, 128), (2, 21, 64, 128), (3, 19, 45, 45), (1, 21, 65, 129)]


def _make_logits(shape, dtype, device, scale=3.0):
    s = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return s, t


def _reference_value_and_grad(s, t, temperature, grad_out=1.0):
    s64 = s.detach().double().requires_grad_(True)
    loss = reference.cwd_loss(s64, t.detach().double(), temperature=temperature)
    (grad,) = torch.autograd.grad(loss * grad_out, s64)
    return loss.detach(), grad


def _fused_value_and_grad(s, t, temperature, backend, grad_out=1.0):
    s = s.detach().clone().requires_grad_(True)
    loss = cwd_loss(s, t, temperature=temperature, backend=backend)
    (grad,) = torch.autograd.grad(loss * grad_out, s)
    return loss.detach(), grad


def _assert_matches_reference(s, t, temperature, backend, dtype):
    rtol, atol = TOLERANCES[dtype]
    grad_out = 0.75  # not 1, so a backward that ignores grad_out fails
    expected, expected_grad = _reference_value_and_grad(s, t, temperature, grad_out)
    loss, grad = _fused_value_and_grad(s, t, temperature, backend, grad_out)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.dtype == s.dtype and grad.shape == s.shape
    torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=rtol, atol=atol)
    # Gradient entries are O(T / (B*C*N)): compare relative to the largest one.
    grad_atol = atol + rtol * expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), expected_grad.cpu(), rtol=rtol, atol=grad_atol)


# ---------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_matches_reference_float32(backend, device, shape, temperature):
    s, t = _make_logits(shape, torch.float32, device)
    _assert_matches_reference(s, t, temperature, backend, torch.float32)


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("n", [4099, 12289])
def test_long_rows_cross_several_blocks(backend, device, n):
    # 4099: 8 C++ blocks of 512 plus a tail, one Triton block held in registers.
    # 12289 = 3 * 4096 + 1: the Triton kernel's two-pass loop, with a one-lane last block.
    s, t = _make_logits((1, 2, 1, n), torch.float32, device)
    s[0, 0, 0, n - 1] = 12.0  # the row max arrives in the last block: the running sum is rescaled
    t[0, 1, 0, n - 1] = 12.0
    _assert_matches_reference(s, t, 2.0, backend, torch.float32)


@requires_extension
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_segmentation_sizes(shape, dtype):
    s, t = _make_logits(shape, dtype, "cpu")
    _assert_matches_reference(s, t, 2.0, "cpu", dtype)


@requires_extension
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_cpu_float64(shape):
    s, t = _make_logits(shape, torch.float64, "cpu")
    _assert_matches_reference(s, t, 1.5, "cpu", torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 5, 9), (1, 19, 8, 16)], ids=str)
def test_triton_half_precision(shape, dtype):
    pairs = [p for p in fused_backends() if p.values[0] == "triton"]
    if not pairs:
        pytest.skip("Triton cannot run here (no CUDA and no interpreter)")
    device = pairs[0].values[1]
    s, t = _make_logits(shape, dtype, device, scale=2.0)
    _assert_matches_reference(s, t, 2.0, "triton", dtype)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_cuda_segmentation_sizes(shape, dtype):
    s, t = _make_logits(shape, dtype, "cuda")
    _assert_matches_reference(s, t, 2.0, "triton", dtype)


@requires_cuda
@pytest.mark.cuda
def test_auto_backend_on_cuda_is_triton_and_matches():
    s, t = _make_logits((2, 19, 64, 128), torch.float32, "cuda")
    expected = reference.cwd_loss(s.double(), t.double(), temperature=2.0)
    torch.testing.assert_close(cwd_loss(s, t, temperature=2.0, backend="auto").double(), expected, rtol=2e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# gradcheck (float64: cpu and reference)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_extension), "reference"])
@pytest.mark.parametrize("shape", [(2, 3, 3, 5), (1, 2, 1, 7)], ids=str)
def test_gradcheck_float64(backend, shape):
    s, t = _make_logits(shape, torch.float64, "cpu", scale=1.0)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cwd_loss(x, t, temperature=1.7, backend=backend), (s,))


# ---------------------------------------------------------------------------
# Large logits: the released softmax().log() breaks, the fused kernels do not
# ---------------------------------------------------------------------------


def _large_logits(shape, device, dtype=torch.float32):
    """Logits in [-50, 50]; in every (b, c) row the student's +50 and -50 sit where the teacher puts +50.

    At temperature <= 0.5 the student probability at its -50 is exp(-200) or
    less: 0 in float32, so log(softmax) is -inf there while the teacher's
    probability is about 1.
    """
    s = torch.rand(shape, dtype=torch.float64) * 100 - 50
    t = torch.rand(shape, dtype=torch.float64) * 100 - 50
    s[:, :, 0, 0] = 50.0
    s.view(shape[0], shape[1], -1)[:, :, -1] = -50.0
    t.view(shape[0], shape[1], -1)[:, :, -1] = 50.0
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def test_released_formulation_fails_on_large_logits():
    # The defect this package fixes: the released loss is not finite on such logits.
    s, t = _large_logits((2, 3, 8, 16), "cpu")
    temperature = 0.5
    assert not torch.isfinite(released.cwd_loss(s, t, temperature=temperature))
    assert torch.isfinite(cwd_loss(s, t, temperature=temperature, backend="reference"))


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.25])
def test_large_logits_finite_and_correct(backend, device, temperature):
    s, t = _large_logits((2, 3, 8, 16), device)
    _assert_matches_reference(s, t, temperature, backend, torch.float32)


@requires_extension
def test_large_logits_cpu_segmentation_size():
    s, t = _large_logits((1, 19, 64, 128), "cpu")
    _assert_matches_reference(s, t, 0.5, "cpu", torch.float32)


def test_large_logits_reference_finite():
    s, t = _large_logits((2, 3, 8, 16), "cpu")
    s.requires_grad_(True)
    loss = cwd_loss(s, t, temperature=0.25, backend="reference")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", fused_backends())
def test_identical_logits_give_zero_loss_and_gradient(backend, device):
    s, _ = _make_logits((2, 3, 5, 9), torch.float32, device)
    loss, grad = _fused_value_and_grad(s, s.clone(), 2.0, backend)
    assert abs(loss.item()) < 1e-5
    assert grad.abs().max().item() < 1e-7


@pytest.mark.parametrize("backend, device", fused_backends())
def test_no_gradient_to_teacher(backend, device):
    s, t = _make_logits((2, 3, 5, 9), torch.float32, device)
    s.requires_grad_(True)
    t.requires_grad_(True)
    cwd_loss(s, t, temperature=2.0, backend=backend).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("backend, device", fused_backends())
def test_value_without_grad_matches(backend, device):
    # s that does not require grad takes the loss-only path of the kernels.
    s, t = _make_logits((1, 19, 8, 16), torch.float32, device)
    expected = reference.cwd_loss(s.double(), t.double(), temperature=2.0)
    with torch.no_grad():
        loss = cwd_loss(s, t, temperature=2.0, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_non_contiguous_input(backend, device):
    s, t = _make_logits((2, 9, 5, 3), torch.float32, device)
    s_nc, t_nc = s.transpose(2, 3), t.transpose(2, 3)  # (2, 9, 3, 5), non-contiguous
    assert not s_nc.is_contiguous()
    _assert_matches_reference(s_nc, t_nc, 2.0, backend, torch.float32)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_mixed_dtypes(backend, device):
    # A float32 student against a float64 teacher (cpu) or a float16 one (triton).
    s, t = _make_logits((2, 3, 5, 9), torch.float32, device)
    t = t.to(torch.float64 if backend == "cpu" else torch.float16)
    _assert_matches_reference(s, t, 2.0, backend, torch.float32 if backend == "cpu" else torch.float16)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_backward_twice_with_retain_graph(backend, device):
    s, t = _make_logits((2, 3, 5, 9), torch.float32, device)
    s.requires_grad_(True)
    loss = cwd_loss(s, t, temperature=2.0, backend=backend)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(2 * loss, s)
    torch.testing.assert_close(g2, 2 * g1)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_gradient_accumulates_over_retained_backwards(backend, device):
    # The CPU backward hands the saved gradient to autograd without a copy when
    # grad_out is 1: accumulating into s.grad must not alter what is saved.
    s, t = _make_logits((2, 3, 5, 9), torch.float32, device)
    _, expected_grad = _reference_value_and_grad(s, t, 2.0)
    s.requires_grad_(True)
    loss = cwd_loss(s, t, temperature=2.0, backend=backend)
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(s.grad.double().cpu(), 3 * expected_grad.cpu(), rtol=2e-4, atol=1e-7)
    loss_again = cwd_loss(s, t, temperature=2.0, backend=backend)
    loss_again.backward()
    torch.testing.assert_close(s.grad.double().cpu(), 4 * expected_grad.cpu(), rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_output_dtype_and_shape(backend, device):
    s, t = _make_logits((2, 3, 5, 9), torch.float32, device)
    loss = cwd_loss(s, t, backend=backend)
    assert loss.shape == () and loss.dtype == torch.float32


def test_released_formulation_matches_reference_float64():
    s, t = _make_logits((2, 19, 16, 24), torch.float64, "cpu", scale=2.0)
    s.requires_grad_(True)
    expected = reference.cwd_loss(s, t, temperature=2.0)
    (expected_grad,) = torch.autograd.grad(expected, s)
    got = released.cwd_loss(s, t, temperature=2.0)
    (got_grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-9, atol=1e-14)


def test_known_value():
    # One image, one class, two positions: p_t = softmax([0, 0]) = (1/2, 1/2), p_s = softmax([log 3, 0]) = (3/4, 1/4).
    s = torch.tensor([[[[math.log(3.0), 0.0]]]], dtype=torch.float64)
    t = torch.zeros_like(s)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    for backend in ["reference"] + (["cpu"] if HAS_EXTENSION else []):
        assert cwd_loss(s, t, backend=backend).item() == pytest.approx(expected, rel=1e-12)


def test_temperature_scaling():
    # T^2/(B*C) scaling: with s/T and t/T fixed, the loss scales with T^2.
    s, t = _make_logits((2, 3, 4, 5), torch.float64, "cpu")
    base = cwd_loss(s, t, temperature=1.0, backend="reference")
    scaled = cwd_loss(3.0 * s, 3.0 * t, temperature=3.0, backend="reference")
    torch.testing.assert_close(scaled, 9.0 * base)


# ---------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", fused_backends() + [pytest.param("reference", "cpu", id="reference")])
def test_module_matches_function(backend, device):
    s, t = _make_logits((2, 3, 5, 9), torch.float32, device)
    module = CWDLoss(temperature=2.0, backend=backend)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    out_module = module(s1, t)
    out_function = cwd_loss(s2, t, temperature=2.0, backend=backend)
    out_module.backward()
    out_function.backward()
    torch.testing.assert_close(out_module, out_function)
    torch.testing.assert_close(s1.grad, s2.grad)
    assert "temperature=2.0" in repr(module)
    assert list(module.parameters()) == []


def test_module_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        CWDLoss(temperature=0.0)


def test_auto_backend_cpu():
    s, t = _make_logits((2, 3, 5, 9), torch.float32, "cpu")
    expected = reference.cwd_loss(s.double(), t.double(), temperature=2.0)
    torch.testing.assert_close(cwd_loss(s, t, temperature=2.0, backend="auto").double(), expected, rtol=2e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 5, 9, 1), (45,)], ids=str)
def test_rejects_non_4d(shape):
    s = torch.randn(shape)
    with pytest.raises(ValueError, match=r"4-D.*" + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        cwd_loss(s, s.clone())


def test_rejects_shape_mismatch():
    s = torch.randn(2, 3, 5, 9)
    t = torch.randn(2, 4, 5, 9)
    with pytest.raises(ValueError, match=r"\(2, 3, 5, 9\).*\(2, 4, 5, 9\)"):
        cwd_loss(s, t)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_rejects_bad_temperature(temperature):
    s = torch.randn(2, 3, 5, 9)
    with pytest.raises(ValueError, match="temperature"):
        cwd_loss(s, s.clone(), temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_rejects_integer_dtypes(dtype):
    s = torch.randn(2, 3, 5, 9)
    bad = torch.zeros(2, 3, 5, 9, dtype=dtype)
    with pytest.raises(TypeError, match=r"\(2, 3, 5, 9\)"):
        cwd_loss(bad, s)
    with pytest.raises(TypeError, match=r"\(2, 3, 5, 9\)"):
        cwd_loss(s, bad)


def test_rejects_empty():
    s = torch.randn(2, 0, 5, 9)
    with pytest.raises(ValueError, match="empty"):
        cwd_loss(s, s.clone())


def test_rejects_non_tensor():
    with pytest.raises(TypeError):
        cwd_loss([[1.0]], torch.randn(1, 1, 1, 1))


@requires_extension
def test_cpu_backend_rejects_half():
    s = torch.randn(2, 3, 5, 9, dtype=torch.float16)
    with pytest.raises(BackendError, match="float16"):
        cwd_loss(s, s.clone(), backend="cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only machine's Triton error")
def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s = torch.randn(2, 3, 5, 9)
    with pytest.raises(BackendError):
        cwd_loss(s, s.clone(), backend="triton")
