"""linear_cka and cka_loss: every backend against the reference, values and gradients."""

import math

import pytest
import torch

import cskd_kernels
from cskd_kernels import reference, released
from conftest import TOLERANCES, fused_backends, requires_cuda, requires_extension

OPS = {"linear_cka": cskd_kernels.linear_cka, "cka_loss": cskd_kernels.cka_loss}
REFERENCE_OPS = {"linear_cka": reference.linear_cka, "cka_loss": reference.cka_loss}


def _dtypes(backend):
    if backend == "cpu":
        return [torch.float32, torch.float64]
    return [torch.float32, torch.float16, torch.bfloat16]


def _cases(backend, device):
    """(op, dtype, n, x shape, y shape, unbiased, grouped); small shapes under the Triton interpreter."""
    interpreted = backend == "triton" and device == "cpu"
    shapes = [
        (3, (3, 1), (3, 2), False),
        (5, (5, 7, 3), (5, 11), False),
        (8, (8, 3, 5, 7), (8, 2, 9, 4), False),
        (13, (13, 301), (13, 17, 3), False),
        (5, (4, 5, 19), (4, 5, 3, 3), True),  # 4 groups of n = 5
    ]
    if not interpreted:
        shapes += [(8, (8, 16, 9, 15), (8, 32, 7, 11), False), (13, (2, 13, 4093), (2, 13, 2048), True)]
    cases = []
    for op in OPS:
        for dtype in _dtypes(backend):
            for n, xs, ys, grouped in shapes:
                for unbiased in (False, True):
                    if unbiased and n < 4:
                        continue
                    cases.append(pytest.param(op, dtype, xs, ys, unbiased, grouped, id=f"{op}-{str(dtype)[6:]}-{xs}-{ys}-{'u' if unbiased else 'b'}"))
    return cases


def _all_cases():
    params = []
    for backend_param in fused_backends():
        backend, device = backend_param.values
        for case in _cases(backend, device):
            params.append(pytest.param(backend, device, *case.values, id=f"{backend_param.id}-{case.id}"))
    return params


def _assert_close(actual, expected, dtype, what):
    """Compare to the float64 reference; atol scales with the reference's magnitude (gradients vary in scale)."""
    rtol, atol = TOLERANCES[dtype]
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * max(scale, 1.0), msg=lambda m: f"{what}: {m}")


def _run(fn, x, y, grad_out=None):
    """Value and gradients of fn(x, y) for fresh leaf copies of x and y."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    out = fn(x, y)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grad_x, grad_y = torch.autograd.grad(out, (x, y), grad_out.to(out.dtype))
    return out, grad_x, grad_y, grad_out


@pytest.mark.parametrize("backend,device,op,dtype,x_shape,y_shape,unbiased,grouped", _all_cases())
def test_matches_reference(backend, device, op, dtype, x_shape, y_shape, unbiased, grouped):
    x = torch.randn(x_shape, device=device).to(dtype)
    y = (torch.randn(y_shape, device=device) + 0.5).to(dtype)
    kwargs = dict(unbiased=unbiased, grouped=grouped)

    out, grad_x, grad_y, grad_out = _run(lambda a, b: OPS[op](a, b, backend=backend, **kwargs), x, y)
    expected = _run(lambda a, b: REFERENCE_OPS[op](a, b, **kwargs), x.double(), y.double(), grad_out.double())

    assert out.shape == expected[0].shape == ((x_shape[0],) if grouped else ())
    # Outputs are accumulated in float32 at least, whatever the input dtype.
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad_x.dtype == dtype and grad_y.dtype == dtype
    tolerance_dtype = dtype if dtype != torch.float64 else torch.float64
    _assert_close(out, expected[0], tolerance_dtype, "value")
    _assert_close(grad_x, expected[1], tolerance_dtype, "grad x")
    _assert_close(grad_y, expected[2], tolerance_dtype, "grad y")


@pytest.mark.parametrize("backend,device", fused_backends())
def test_teacher_side_gets_no_gradient(backend, device):
    student = torch.randn(6, 40, device=device, requires_grad=True)
    teacher = torch.randn(6, 90, device=device)
    loss = cskd_kernels.cka_loss(student, teacher, backend=backend)
    loss.backward()
    expected_student = torch.autograd.grad(reference.cka_loss(student, teacher), student)[0]
    torch.testing.assert_close(student.grad, expected_student, rtol=2e-4, atol=1e-6)
    assert teacher.grad is None


@pytest.mark.parametrize("backend,device", fused_backends())
def test_non_contiguous_inputs(backend, device):
    base_x = torch.randn(30, 7, device=device)
    base_y = torch.randn(9, 7, 4, device=device)
    x = base_x.t()  # (7, 30), stride (1, 7)
    y = base_y.permute(1, 2, 0)  # (7, 4, 9)
    assert not x.is_contiguous() and not y.is_contiguous()
    out, gx, gy, go = _run(lambda a, b: cskd_kernels.cka_loss(a, b, backend=backend), x, y)
    expected = _run(lambda a, b: reference.cka_loss(a, b), x.double(), y.double(), go.double())
    _assert_close(out, expected[0], torch.float32, "value")
    _assert_close(gx, expected[1], torch.float32, "grad x")
    _assert_close(gy, expected[2], torch.float32, "grad y")


@pytest.mark.slow
@requires_extension
@pytest.mark.parametrize("unbiased", [False, True])
def test_over_a_million_features_cpu(unbiased):
    x = torch.randn(5, 1_048_583)
    y = torch.randn(5, 3) + 1.0
    out, gx, gy, go = _run(lambda a, b: cskd_kernels.linear_cka(a, b, unbiased=unbiased, backend="cpu"), x, y)
    expected = _run(lambda a, b: reference.linear_cka(a, b, unbiased=unbiased), x.double(), y.double(), go.double())
    _assert_close(out, expected[0], torch.float32, "value")
    _assert_close(gx, expected[1], torch.float32, "grad x")
    _assert_close(gy, expected[2], torch.float32, "grad y")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=requires_extension)])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_gradcheck_float64(backend, unbiased, grouped):
    shape_x, shape_y = ((2, 5, 3, 2), (2, 5, 4)) if grouped else ((6, 3, 2), (6, 5))
    x = torch.randn(shape_x, dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape_y, dtype=torch.float64, requires_grad=True)
    for op in OPS.values():
        assert torch.autograd.gradcheck(lambda a, b: op(a, b, unbiased=unbiased, grouped=grouped, backend=backend), (x, y))


@pytest.mark.parametrize("backend,device", fused_backends() + [pytest.param("reference", "cpu", id="reference")])
def test_constant_side_gives_zero_and_finite_gradients(backend, device):
    student = torch.randn(7, 33, device=device, requires_grad=True)
    constant = torch.full((7, 12), 0.3, device=device, requires_grad=True)  # 0.3 * 7 is inexact: no lucky rounding
    cka = cskd_kernels.linear_cka(student, constant, backend=backend)
    assert cka.item() == 0.0
    loss = cskd_kernels.cka_loss(student, constant, backend=backend)
    assert loss.item() == pytest.approx(-math.log(1e-8))
    (cka + loss).backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(constant.grad).all()


@pytest.mark.parametrize("backend,device", fused_backends() + [pytest.param("reference", "cpu", id="reference")])
def test_nan_input_propagates(backend, device):
    x = torch.randn(5, 20, device=device)
    x[2, 3] = float("nan")
    y = torch.randn(5, 8, device=device)
    assert torch.isnan(cskd_kernels.linear_cka(x, y, backend=backend))
    assert torch.isnan(cskd_kernels.cka_loss(x, y, backend=backend))


def test_loss_is_negative_log_of_absolute_cka():
    x, y = torch.randn(8, 50, dtype=torch.float64), torch.randn(8, 30, dtype=torch.float64)
    cka = reference.linear_cka(x, y)
    assert reference.cka_loss(x, y).item() == pytest.approx(-math.log(abs(cka.item())))
    assert reference.cka_loss(x, -y).item() == pytest.approx(reference.cka_loss(x, y).item())
    assert reference.cka_loss(x, y, eps=0.99).item() == pytest.approx(-math.log(0.99))


def test_reference_matches_the_released_formulation():
    x, y = torch.randn(8, 3, 5, 5, dtype=torch.float64) + 2.0, torch.randn(8, 7, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(reference.linear_cka(x, y), released.linear_cka(x.flatten(1), y.flatten(1)))
    cka = reference.linear_cka(x, y).abs()
    torch.testing.assert_close(-torch.log(cka + 1e-8), released.cka_loss(x, y))
    # The 1e-8 sits inside the log: samples whose centered Grams do not overlap have CKA 0, and the
    # released loss is then -log(1e-8), finite (with the 1e-8 outside the log it would be infinite).
    x0 = torch.tensor([[1.0], [-1.0], [0.0], [0.0]], dtype=torch.float64)
    y0 = torch.tensor([[0.0], [0.0], [1.0], [-1.0]], dtype=torch.float64)
    assert released.linear_cka(x0, y0).item() == 0.0
    assert released.cka_loss(x0, y0).item() == pytest.approx(-math.log(1e-8))


def _literal_unbiased_hsic(k, l):
    """SPEC section 1's unbiased HSIC on uncentered Grams, written as literally as possible."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype)
    value = torch.trace(k @ l) + (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
    value = value - 2.0 / (n - 2) * (ones.T @ k @ l @ ones)
    return value.squeeze() / (n * (n - 3))


def test_reference_unbiased_matches_the_literal_formula():
    x, y = torch.randn(9, 40, dtype=torch.float64) + 1.0, torch.randn(9, 13, dtype=torch.float64) - 3.0
    k, l = x @ x.T, y @ y.T
    expected = _literal_unbiased_hsic(k, l) / torch.sqrt(_literal_unbiased_hsic(k, k) * _literal_unbiased_hsic(l, l))
    torch.testing.assert_close(reference.linear_cka(x, y, unbiased=True), expected)


def test_cka_is_invariant_to_scale_and_offset():
    x, y = torch.randn(6, 20, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    base = reference.linear_cka(x, y)
    torch.testing.assert_close(reference.linear_cka(3.0 * x + 5.0, y), base)
    torch.testing.assert_close(reference.linear_cka(x, x), torch.tensor(1.0, dtype=torch.float64))


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(OPS.values()), ids=list(OPS))
@pytest.mark.parametrize(
    "x,y,kwargs,error,pattern",
    [
        (torch.randn(5, 3), torch.randn(6, 3), {}, ValueError, r"\(5, 3\).*\(6, 3\)"),
        (torch.randn(1, 3), torch.randn(1, 4), {}, ValueError, r"n >= 2.*\(1, 3\)"),
        (torch.randn(3, 3), torch.randn(3, 4), {"unbiased": True}, ValueError, r"n >= 4.*\(3, 3\)"),
        (torch.randn(2, 5, 3), torch.randn(3, 5, 3), {"grouped": True}, ValueError, r"\(2, 5, 3\).*\(3, 5, 3\).*groups"),
        (torch.randint(0, 5, (5, 3)), torch.randn(5, 3), {}, TypeError, r"floating-point.*\(5, 3\)"),
        (torch.randn(5, 3), torch.zeros(5, 0), {}, ValueError, r"empty.*\(5, 0\)"),
        (torch.randn(5, 3), torch.randn(5, 3, device="meta"), {}, ValueError, r"one device.*cpu.*meta"),
        ([[1.0, 2.0]], torch.randn(5, 3), {}, TypeError, r"torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(op, x, y, kwargs, error, pattern):
    for backend in ("reference", "auto"):
        with pytest.raises(error, match=pattern):
            op(x, y, backend=backend, **kwargs)


@requires_cuda
def test_auto_runs_triton_on_cuda():
    x = torch.randn(8, 100, device="cuda")
    y = torch.randn(8, 60, device="cuda")
    assert cskd_kernels.resolve_backend("auto", x, y) == "triton"
    torch.testing.assert_close(cskd_kernels.linear_cka(x, y), reference.linear_cka(x.double(), y.double()).float(), rtol=1e-4, atol=1e-5)


@requires_cuda
def test_different_devices_is_a_clear_error_on_cuda():
    with pytest.raises(ValueError, match="one device"):
        cskd_kernels.linear_cka(torch.randn(5, 3, device="cuda"), torch.randn(5, 3))


def _backward_expected(x, m):
    return m.double() @ (x.double() - x.double()[:, :1])


@requires_extension
def test_pooled_gradients_are_never_shared_while_alive():
    """The CPU backward reuses large freed gradient buffers: a live one must never be handed out again."""
    ext = cskd_kernels.backend.extension()
    x = torch.randn(1, 4, 700_001)  # 11 MiB: above the pool's size threshold, p not a multiple of 16
    m1, m2 = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    first = ext.cka_centered_gram_backward(x, m1)
    second = ext.cka_centered_gram_backward(x, m2)
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first.double(), _backward_expected(x, m1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second.double(), _backward_expected(x, m2), rtol=1e-4, atol=1e-4)
    del first
    third = ext.cka_centered_gram_backward(x, m2)  # may reuse the freed buffer: fully overwritten
    torch.testing.assert_close(third.double(), _backward_expected(x, m2), rtol=1e-4, atol=1e-4)
    del second, third
    ext.empty_cache()
    fourth = ext.cka_centered_gram_backward(x, m1)
    torch.testing.assert_close(fourth.double(), _backward_expected(x, m1), rtol=1e-4, atol=1e-4)


@requires_extension
@pytest.mark.parametrize("n", [5, 12])  # the register kernels (n <= 9) and the tile path
def test_cpu_result_does_not_depend_on_the_thread_count(n):
    x = torch.randn(n, 3 * 8192 + 77)
    y = torch.randn(n, 5 * 8192 + 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(lambda a, b: cskd_kernels.cka_loss(a, b, backend="cpu"), x, y, torch.tensor(1.0))
        torch.set_num_threads(2)
        two = _run(lambda a, b: cskd_kernels.cka_loss(a, b, backend="cpu"), x, y, torch.tensor(1.0))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one[:3], two[:3]):
        assert torch.equal(a, b)
