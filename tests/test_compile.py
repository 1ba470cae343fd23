"""The ops as PyTorch custom ops: torch.library checks, torch.compile(fullgraph=True) against eager.

Every fused kernel is a ``cskd::`` custom op with a fake implementation and a
registered autograd formula, so dynamo traces a function that calls the
public ops into one graph (fullgraph=True fails on any graph break) and the
compiled values and gradients equal eager ones.

Compiling is slow on a few CPU cores: shapes are tiny, the fused "cpu"
backend goes through the default compiler (inductor, the real thing), the
plain-PyTorch "reference" backend through "aot_eager" (dynamo and AOTAutograd,
no code generation). All tests carry the ``compile`` marker
(``-m "not compile"`` skips them).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from cskd_kernels import CSKDLoss, channel_attention, cka_loss, cwd_loss, linear_cka, position_attention
from cskd_kernels.ops import channel_attention as cam_ops
from cskd_kernels.ops import cka as cka_ops
from cskd_kernels.ops import cwd as cwd_ops
from cskd_kernels.ops import position_attention as pam_ops
from conftest import HAS_CUDA, fused_backends, requires_extension

pytestmark = pytest.mark.compile

# Interpreted Triton (no GPU) goes through aot_eager: inductor adds nothing
# around an opaque custom op but minutes of compiling.
COMPILER = {"cpu": "inductor", "reference": "aot_eager", "triton": "inductor" if HAS_CUDA else "aot_eager"}


def _backends():
    """The backends CSKDLoss is compiled on: the C++ extension and the reference (CPU, float32)."""
    cpu = pytest.param("cpu", marks=requires_extension, id="cpu")
    return [cpu, pytest.param("reference", id="reference")]


def _op_backends():
    """(backend, device) for the single ops: every fused backend that runs here, and the reference."""
    return [*fused_backends(), pytest.param("reference", "cpu", id="reference")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompilation limits carried between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn, backend):
    return torch.compile(fn, fullgraph=True, backend=COMPILER[backend])


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def _grads(out, inputs, weight):
    """The gradients of sum(weight * out) for the inputs that require grad."""
    return torch.autograd.grad((out * weight).sum(), [t for t in inputs if t.requires_grad])


def _assert_compiled_matches_eager(fn, inputs, backend):
    """Same inputs through eager and torch.compile(fullgraph=True): values and every gradient."""
    eager_inputs, compiled_inputs = _leaves(inputs), _leaves(inputs)
    expected = fn(*eager_inputs)
    weight = torch.randn_like(expected)  # a random grad_out, not all-ones
    expected_grads = _grads(expected, eager_inputs, weight)
    actual = _compile(fn, backend)(*compiled_inputs)
    actual_grads = _grads(actual, compiled_inputs, weight)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert len(actual_grads) == len(expected_grads) > 0
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Each public op
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", _op_backends())
@pytest.mark.parametrize("op", [linear_cka, cka_loss], ids=["linear_cka", "cka_loss"])
def test_cka(backend, device, op):
    x = torch.randn(5, 3, 4, 3, device=device, requires_grad=True)
    y = torch.randn(5, 7, 2, device=device, requires_grad=True)
    _assert_compiled_matches_eager(lambda a, b: op(a, b, backend=backend), [x, y], backend)


@pytest.mark.parametrize("backend,device", _op_backends())
@pytest.mark.parametrize("x_grad", [True, False], ids=["student", "teacher"])
def test_channel_attention(backend, device, x_grad):
    # The teacher side (x without grad) takes the kernel's d-gamma-only backward.
    x = torch.randn(2, 5, 3, 4, device=device, requires_grad=x_grad)
    gamma = torch.tensor([0.6], device=device, requires_grad=True)
    fn = lambda a, g: channel_attention(a, g, temperature=2.0, backend=backend)  # noqa: E731
    _assert_compiled_matches_eager(fn, [x, gamma], backend)


@pytest.mark.parametrize("backend,device", _op_backends())
def test_cwd_loss(backend, device):
    s = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, device=device)
    _assert_compiled_matches_eager(lambda a, b: cwd_loss(a, b, temperature=2.0, backend=backend), [s, t], backend)


@pytest.mark.parametrize("backend,device", _op_backends())
@pytest.mark.parametrize("grid", [None, (2, 3)], ids=["global", "grid2x3"])
def test_position_attention(backend, device, grid):
    q = torch.randn(2, 3, 5, 7, device=device, requires_grad=True)
    k = torch.randn(2, 3, 5, 7, device=device, requires_grad=True)
    v = torch.randn(2, 6, 5, 7, device=device, requires_grad=True)
    fn = lambda a, b, c: position_attention(a, b, c, temperature=2.0, grid=grid, backend=backend)  # noqa: E731
    _assert_compiled_matches_eager(fn, [q, k, v], backend)


DYNAMIC_CASES = {
    "cka_loss": (lambda b, x, y: cka_loss(x, y, backend=b), lambda n: [(n + 2, 3, n), (n + 2, 4)]),
    "channel_attention": (lambda b, x: channel_attention(x, torch.tensor([0.6], device=x.device), temperature=2.0, backend=b),
                          lambda n: [(n, 3, n, 4)]),
    "cwd_loss": (lambda b, s: cwd_loss(s, s.detach().flip(0), temperature=2.0, backend=b), lambda n: [(n, 3, n, 4)]),
    "position_attention_grid": (
        lambda b, q, v: position_attention(q, q * 2, v, temperature=2.0, grid=(2, 2), backend=b),
        lambda n: [(n, 2, n + 1, 4), (n, 5, n + 1, 4)],
    ),
}


@pytest.mark.parametrize("backend,device", fused_backends())
@pytest.mark.parametrize("case", DYNAMIC_CASES)
def test_dynamic_shapes(backend, device, case):
    """dynamic=True: the fakes take symbolic sizes; one compiled graph serves inputs of several sizes."""
    op, shapes = DYNAMIC_CASES[case]
    fn = lambda *t: op(backend, *t)  # noqa: E731
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for n in (6, 7):  # no size equal to another: duck sizing would tie them in the first graph
        inputs = [torch.randn(shape, device=device, requires_grad=True) for shape in shapes(n)]
        expected = fn(*inputs)
        actual = compiled(*inputs)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        for got, want in zip(torch.autograd.grad(actual.sum(), inputs), torch.autograd.grad(expected.sum(), inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, "recompiled for a new size"


# --------------------------------------------------------------------------
# The whole CSKD loss
# --------------------------------------------------------------------------


def _cskd_loss(projection, backend, generator_seed=None):
    generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    loss = CSKDLoss(8, 16, grid=(2, 3), projection=projection, backend=backend, generator=generator)
    with torch.no_grad():  # away from the initial 0, so every gradient is exercised
        loss.gamma_cam.fill_(0.5)
        loss.gamma_pam.fill_(0.7)
    return loss


def _cskd_run(loss, feat_s, feat_t):
    """(loss, cam, pam) and the gradients of the loss for feat_s and every parameter."""
    feat_s = feat_s.detach().clone().requires_grad_(True)
    out = loss(feat_s, feat_t)
    params = [p for _, p in sorted(loss.named_parameters())]
    grads = torch.autograd.grad(out.loss, [feat_s, *params])
    return [t.detach() for t in out], grads


def _assert_cskd_matches(actual, expected):
    for got, want in zip(actual[0], expected[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(actual[1]) == len(expected[1])
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("projection", ["fixed", "learned"])
def test_cskd_loss(backend, projection):
    feat_s, feat_t = torch.randn(4, 8, 6, 7), torch.randn(4, 16, 6, 7)
    loss = _cskd_loss(projection, backend)
    expected = _cskd_run(loss, feat_s, feat_t)
    actual = _cskd_run(_compile(loss, backend), feat_s, feat_t)
    # learned: gamma_cam, gamma_pam and both sides' six projection tensors; fixed: the two gammas.
    assert len(actual[1]) == 1 + (14 if projection == "learned" else 2)
    _assert_cskd_matches(actual, expected)


@pytest.mark.parametrize("backend", _backends())
def test_cskd_loss_resample_with_graph_breaks(backend):
    # projection="resample" draws with torch.rand(..., generator=g). Dynamo
    # (torch 2.14) cannot put a torch.Generator object into a graph ("Failed to
    # convert args/kwargs to proxy"), so fullgraph=True fails at the draw; with
    # graph breaks allowed the draw runs eagerly between two compiled graphs,
    # and the same seed gives the same projections, so results equal eager.
    # (Without a generator the draw would trace, but compiled code has its
    # own RNG stream: values could not be compared with eager.)
    feat_s, feat_t = torch.randn(4, 8, 6, 7), torch.randn(4, 16, 6, 7)
    expected = _cskd_run(_cskd_loss("resample", backend, generator_seed=5), feat_s, feat_t)
    loss = _cskd_loss("resample", backend, generator_seed=5)
    # aot_eager on both backends: the many small graphs are what is tested here, not code generation.
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, fullgraph=False, backend=counter)
    _assert_cskd_matches(_cskd_run(compiled, feat_s, feat_t), expected)
    assert counter.frame_count >= 2  # compiled graphs around the eager draws, not all eager


# --------------------------------------------------------------------------
# The custom op registrations themselves
# --------------------------------------------------------------------------


def _opcheck_cases(backend, device):
    """(op, args) of every cskd:: custom op on one fused backend, odd sizes (float64 where it runs)."""
    f = dict(dtype=torch.float64 if backend == "cpu" else torch.float32, device=device)
    x = torch.randn(2, 5, 7, **f, requires_grad=True)
    gamma = torch.tensor([0.6], **f, requires_grad=True)
    _, attention = cam_ops.channel_attention_forward(x.detach(), gamma.detach(), 2.0, backend)
    q, k = (torch.randn(2, 3, 5, 7, **f, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 6, 5, 7, **f, requires_grad=True)
    cells = pam_ops.cell_table(5, 7, (2, 3), device)
    largest = pam_ops.largest_cell(5, 7, (2, 3))
    out, lse = pam_ops.position_attention_forward(q.detach(), k.detach(), v.detach(), cells, largest, 0.5, backend)
    s = torch.randn(6, 20, **f, requires_grad=True)
    return {
        "cka": (cka_ops.centered_gram, (torch.randn(2, 5, 9, **f, requires_grad=True), backend)),
        "cam_forward": (cam_ops.channel_attention_forward, (x, gamma, 2.0, backend)),
        "cam_backward": (cam_ops.channel_attention_backward,
                         (torch.randn(2, 5, 7, **f), x.detach(), attention, gamma.detach(), 2.0, True, backend)),
        "cam_backward_gamma_only": (cam_ops.channel_attention_backward,
                                    (torch.randn(2, 5, 7, **f), x.detach(), attention, gamma.detach(), 2.0, False,
                                     backend)),
        "cwd": (cwd_ops.cwd_loss_rows, (s, torch.randn(6, 20, **f), 2.0, 6, True, backend)),
        "cwd_no_grad": (cwd_ops.cwd_loss_rows, (s.detach(), torch.randn(6, 20, **f), 2.0, 6, False, backend)),
        "pam_forward": (pam_ops.position_attention_forward, (q, k, v, cells, largest, 0.5, backend)),
        "pam_backward": (pam_ops.position_attention_backward,
                         (q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(out), cells, largest, 0.5,
                          backend)),
    }


OPCHECK_OPS = ["cka", "cam_forward", "cam_backward", "cam_backward_gamma_only", "cwd", "cwd_no_grad", "pam_forward",
               "pam_backward"]


@pytest.mark.parametrize("backend,device", fused_backends())
@pytest.mark.parametrize("name", OPCHECK_OPS)
def test_opcheck(backend, device, name):
    """torch.library.opcheck: schema, fake implementation, autograd registration and AOT dispatch agree."""
    op, args = _opcheck_cases(backend, device)[name]
    torch.library.opcheck(op.for_backend(backend), args)


def _double_backward_cases():
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 7, dtype=torch.float64)
    return [
        pytest.param(lambda: (cka_loss(x, y, backend="cpu"), x), id="cka_loss"),
        pytest.param(lambda: (channel_attention(x, gamma, backend="cpu"), x), id="channel_attention"),
        pytest.param(lambda: (cwd_loss(x, x.detach().flip(0), backend="cpu"), x), id="cwd_loss"),
        pytest.param(lambda: (position_attention(q, q * 2, q * 3, backend="cpu"), q), id="position_attention"),
    ]


@requires_extension
@pytest.mark.parametrize("make", _double_backward_cases())
def test_double_backward_is_a_clear_error(make):
    """The fused backwards are not differentiable: a second differentiation raises, never a wrong value."""
    out, x = make()
    grad_out = torch.randn_like(out, requires_grad=True)
    (grad_x,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
    # once_differentiable's error; CKA's backward op has no autograd formula, which torch reports.
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula was registered"):
        grad_x.sum().backward()
