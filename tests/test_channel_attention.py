"""channel_attention and ChannelAttention: every backend against the reference, values and gradients."""

import pytest
import torch

import cskd_kernels
from cskd_kernels import reference, released
from conftest import TOLERANCES, fused_backends, requires_cuda, requires_extension

# The sizes (odd C and N, C above a tile, C = 300 not a power of two, a CamVid 45x45 map)
# and C = 520, which the CPU Gram cuts into four uneven panels.
FULL_SHAPES = [(2, 7, 5, 9), (3, 128, 13, 26), (2, 300, 8, 8), (1, 64, 45, 45), (1, 520, 3, 5)]
# The Triton interpreter runs every program in Python: small maps, still odd and over one tile.
INTERPRETER_SHAPES = [(2, 7, 5, 9), (1, 33, 4, 5)]
GAMMA = 0.7


def _dtypes(backend):
    if backend == "cpu":
        return [torch.float32, torch.float64]
    return [torch.float32, torch.float16, torch.bfloat16]


def _features(shape, dtype=torch.float64, device="cpu", scale=None):
    """Random features with energies of order one (scale N^-1/4), so the softmax is neither one-hot nor flat."""
    n = shape[2] * shape[3]
    scale = n**-0.25 if scale is None else scale
    return (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _all_cases():
    params = []
    for backend_param in fused_backends():
        backend, device = backend_param.values
        interpreted = backend == "triton" and device == "cpu"
        for shape in INTERPRETER_SHAPES if interpreted else FULL_SHAPES:
            for dtype in _dtypes(backend):
                for temperature in (1.0, 2.0):
                    case_id = f"{backend_param.id}-{str(dtype)[6:]}-{shape}-T{temperature:g}"
                    params.append(pytest.param(backend, device, dtype, shape, temperature, id=case_id))
    return params


def _assert_close(actual, expected, dtype, what):
    """Compare to the float64 reference; atol scales with the reference's magnitude."""
    rtol, atol = TOLERANCES[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=atol * max(scale, 1.0), msg=lambda m: f"{what}: {m}"
    )


def _run(fn, x, gamma, grad_out, need_x=True):
    """out and the gradients of <out, grad_out> for fresh leaf copies of x and gamma."""
    x = x.detach().clone().requires_grad_(need_x)
    gamma = gamma.detach().clone().requires_grad_(True)
    out = fn(x, gamma)
    inputs = (x, gamma) if need_x else (gamma,)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return (out, *grads)


def _reference_run(x, gamma, grad_out, temperature, need_x=True):
    """The float64 reference on the same (already rounded) inputs."""
    return _run(
        lambda a, g: reference.channel_attention(a, g, temperature=temperature),
        x.double().cpu(),
        gamma.double().cpu(),
        grad_out.double().cpu(),
        need_x,
    )


@pytest.mark.parametrize("backend,device,dtype,shape,temperature", _all_cases())
def test_matches_reference(backend, device, dtype, shape, temperature):
    x = _features(shape, dtype, device)
    # A float32 gamma would round d gamma to float32: float64 runs take a float64 gamma.
    gamma = torch.tensor([GAMMA], device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    grad_out = torch.randn(shape, device=device).to(dtype)

    out, grad_x, grad_gamma = _run(
        lambda a, g: cskd_kernels.channel_attention(a, g, temperature=temperature, backend=backend), x, gamma, grad_out
    )
    ref_out, ref_grad_x, ref_grad_gamma = _reference_run(x, gamma, grad_out, temperature)

    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert grad_x.dtype == dtype and grad_gamma.dtype == gamma.dtype and grad_gamma.shape == gamma.shape
    _assert_close(out.cpu(), ref_out, dtype, "out")
    _assert_close(grad_x.cpu(), ref_grad_x, dtype, "grad x")
    # d gamma sums C*N products: compare on the scale of the sum of |dOut * A X| that it adds up.
    rtol, atol = TOLERANCES[dtype]
    attended = (ref_out - x.double().cpu()) / GAMMA
    magnitude = (grad_out.double().cpu() * attended).abs().sum().item()
    torch.testing.assert_close(grad_gamma.double().cpu(), ref_grad_gamma, rtol=rtol, atol=atol * magnitude)


@pytest.mark.parametrize("backend,device", fused_backends())
def test_gamma_gradient_without_x_gradient(backend, device):
    """The teacher's side in CSKD: x needs no gradient, gamma still gets its sum(dOut * A X)."""
    shape = (2, 7, 5, 9)
    x = _features(shape, torch.float32, device)
    gamma = torch.tensor([GAMMA], device=device)
    grad_out = torch.randn(shape, device=device)
    out, grad_gamma = _run(
        lambda a, g: cskd_kernels.channel_attention(a, g, temperature=2.0, backend=backend), x, gamma, grad_out, False
    )
    ref_out, ref_grad_gamma = _reference_run(x, gamma, grad_out, 2.0, need_x=False)
    _assert_close(out.cpu(), ref_out, torch.float32, "out")
    torch.testing.assert_close(grad_gamma.double().cpu(), ref_grad_gamma, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", fused_backends())
def test_x_gradient_with_a_fixed_gamma(backend, device):
    """gamma as a plain tensor (no gradient): dx alone, gamma * A^T dOut + (dE + dE^T) X + dOut."""
    shape = (1, 33, 4, 5)
    x = _features(shape, torch.float32, device).requires_grad_(True)
    gamma = torch.tensor([-1.3], device=device)
    grad_out = torch.randn(shape, device=device)
    (grad_x,) = torch.autograd.grad(
        cskd_kernels.channel_attention(x, gamma, temperature=2.0, backend=backend), (x,), grad_out
    )
    x64 = x.detach().double().cpu().requires_grad_(True)
    expected = reference.channel_attention(x64, gamma.double().cpu(), temperature=2.0)
    (ref_grad_x,) = torch.autograd.grad(expected, (x64,), grad_out.double().cpu())
    _assert_close(grad_x.cpu(), ref_grad_x, torch.float32, "grad x")


@pytest.mark.parametrize("backend,device", fused_backends())
def test_large_energies_stay_finite(backend, device):
    """Energies of 1e6 and more: the softmax must shift by the row extreme, not overflow to NaN."""
    shape = (2, 7, 5, 9)
    x = _features(shape, torch.float32, device, scale=200.0)
    gamma = torch.tensor([GAMMA], device=device)
    grad_out = torch.randn(shape, device=device)
    out, grad_x, grad_gamma = _run(
        lambda a, g: cskd_kernels.channel_attention(a, g, backend=backend), x, gamma, grad_out
    )
    ref_out, ref_grad_x, ref_grad_gamma = _reference_run(x, gamma, grad_out, 1.0)
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all() and torch.isfinite(grad_gamma).all()
    _assert_close(out.cpu(), ref_out, torch.float32, "out")


@requires_extension
def test_peaked_softmax_float64_cpu():
    """Unscaled features (energies of order N): an almost one-hot softmax, still equal to the reference."""
    shape = (1, 64, 45, 45)
    x = torch.randn(shape, dtype=torch.float64)
    gamma = torch.tensor([GAMMA], dtype=torch.float64)
    grad_out = torch.randn(shape, dtype=torch.float64)
    got = _run(lambda a, g: cskd_kernels.channel_attention(a, g, temperature=2.0, backend="cpu"), x, gamma, grad_out)
    expected = _reference_run(x, gamma, grad_out, 2.0)
    for what, a, b in zip(("out", "grad x", "grad gamma"), got, expected):
        _assert_close(a, b, torch.float64, what)


@requires_extension
def test_non_contiguous_input_cpu():
    shape = (2, 9, 6, 5)
    x = _features(shape).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    gamma = torch.tensor([GAMMA], dtype=torch.float64)
    grad_out = torch.randn(shape, dtype=torch.float64)
    got = _run(lambda a, g: cskd_kernels.channel_attention(a, g, backend="cpu"), x, gamma, grad_out)
    expected = _reference_run(x, gamma, grad_out, 1.0)
    for what, a, b in zip(("out", "grad x", "grad gamma"), got, expected):
        _assert_close(a, b, torch.float64, what)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_extension), "reference"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradcheck_float64(backend, temperature):
    x = _features((2, 5, 3, 4)).requires_grad_(True)
    gamma = torch.tensor([GAMMA], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, g: cskd_kernels.channel_attention(a, g, temperature=temperature, backend=backend), (x, gamma)
    )


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_auto_runs_triton(dtype):
    shape = (3, 128, 13, 26)
    x = _features(shape, dtype, "cuda")
    gamma = torch.tensor([GAMMA], device="cuda")
    out = cskd_kernels.channel_attention(x, gamma)
    expected = reference.channel_attention(x.double(), gamma.double())
    _assert_close(out.cpu(), expected.cpu(), dtype, "out")


def test_released_matches_reference_float64():
    shape = (2, 9, 5, 7)
    x = _features(shape)
    gamma = torch.tensor([GAMMA], dtype=torch.float64)
    grad_out = torch.randn(shape, dtype=torch.float64)
    for temperature in (1.0, 2.0):
        got = _run(lambda a, g: released.channel_attention(a, g, temperature), x, gamma, grad_out)
        expected = _reference_run(x, gamma, grad_out, temperature)
        for what, a, b in zip(("out", "grad x", "grad gamma"), got, expected):
            _assert_close(a, b, torch.float64, what)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

BACKENDS_HERE = ["reference"] + [p.values[0] for p in fused_backends()]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("shape", [(7, 5, 9), (2, 7, 5, 9, 1), (63,)])
def test_rejects_non_4d_input(backend, shape):
    with pytest.raises(ValueError, match=r"4-D.*" + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        cskd_kernels.channel_attention(torch.randn(shape), torch.tensor([GAMMA]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("gamma_shape", [(2,), (1, 2), (0,)])
def test_rejects_gamma_of_wrong_size(backend, gamma_shape):
    with pytest.raises(ValueError, match=r"gamma must be a 1-element tensor.*\(2, 7, 5, 9\)"):
        cskd_kernels.channel_attention(torch.randn(2, 7, 5, 9), torch.zeros(gamma_shape), backend=backend)


def test_accepts_gamma_of_any_single_element_shape():
    x = _features((2, 7, 5, 9), torch.float32)
    for gamma in (torch.tensor(GAMMA), torch.tensor([[GAMMA]])):
        out = cskd_kernels.channel_attention(x, gamma, backend="reference")
        assert out.shape == x.shape


def test_rejects_gamma_that_is_not_a_tensor():
    with pytest.raises(TypeError, match="gamma must be a 1-element torch.Tensor"):
        cskd_kernels.channel_attention(torch.randn(2, 7, 5, 9), 0.7)


def test_rejects_integer_dtypes():
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor.*\(2, 7, 5, 9\)"):
        cskd_kernels.channel_attention(torch.ones(2, 7, 5, 9, dtype=torch.int64), torch.tensor([GAMMA]))
    with pytest.raises(TypeError, match=r"gamma must be a floating-point tensor.*\(1,\)"):
        cskd_kernels.channel_attention(torch.randn(2, 7, 5, 9), torch.tensor([1]))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match=r"channel_attention: temperature must be a number in \[0.01, 100\]"):
        cskd_kernels.channel_attention(torch.randn(2, 7, 5, 9), torch.tensor([GAMMA]), temperature=temperature)


@requires_extension
def test_cpu_backend_rejects_half():
    with pytest.raises(ValueError, match="float16"):
        cskd_kernels.channel_attention(torch.randn(2, 7, 5, 9).half(), torch.tensor([GAMMA]), backend="cpu")


@requires_cuda
def test_rejects_gamma_on_another_device():
    with pytest.raises(ValueError, match="one device"):
        cskd_kernels.channel_attention(torch.randn(2, 7, 5, 9, device="cuda"), torch.tensor([GAMMA]))


# --------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------


def _module_backends():
    return ["reference"] + [p.values[0] for p in fused_backends() if p.values[1] == "cpu"]


@pytest.mark.parametrize("backend", _module_backends())
def test_module_starts_as_identity_and_learns_gamma(backend):
    module = cskd_kernels.ChannelAttention(temperature=2.0, backend=backend)
    assert [name for name, _ in module.named_parameters()] == ["gamma"]
    assert module.gamma.shape == (1,) and module.gamma.item() == 0.0
    x = _features((2, 7, 5, 9), torch.float32).requires_grad_(True)
    grad_out = torch.randn_like(x)
    out = module(x)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    out.backward(grad_out)
    # At gamma = 0: dx = dOut and d gamma = sum(dOut * A X) (nonzero for random dOut).
    torch.testing.assert_close(x.grad, grad_out, rtol=1e-6, atol=1e-6)
    _, _, ref_grad_gamma = _reference_run(x.detach(), torch.zeros(1), grad_out, 2.0)
    torch.testing.assert_close(module.gamma.grad.double(), ref_grad_gamma, rtol=1e-4, atol=1e-5)
    assert module.gamma.grad.abs().item() > 0


@pytest.mark.parametrize("backend", _module_backends())
def test_module_matches_functional(backend):
    module = cskd_kernels.ChannelAttention(temperature=2.0, backend=backend)
    with torch.no_grad():
        module.gamma.fill_(GAMMA)
    x = _features((2, 7, 5, 9), torch.float32)
    expected = reference.channel_attention(x.double(), torch.tensor([GAMMA], dtype=torch.float64), temperature=2.0)
    _assert_close(module(x), expected, torch.float32, "module out")
    assert "gamma" in module.state_dict()


def test_module_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match=r"ChannelAttention: temperature must be a number in \[0.01, 100\]"):
        cskd_kernels.ChannelAttention(temperature=0.0)
