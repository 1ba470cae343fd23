"""Non-finite input gives non-finite output and gradients, on every backend (issue #19, defect 6).

A NaN, +Inf or -Inf anywhere in an input must show in the result and in the
gradient of every input that requires grad, wherever the reference (the plain
PyTorch definition, in float64) shows it: a fused kernel whose maximum or
exponential drops a NaN would otherwise hand the optimiser a finite, plausible
gradient computed from garbage. Where the reference's gradient stays finite
(e.g. a -Inf student logit in CWD: that probability is 0), ours must equal it.

Small odd sizes keep the Triton interpreter fast; the bad value sits at a
position inside the tensor and at its last element (a tail lane of the
vector loops).
"""

import pytest
import torch

import cskd_kernels
from cskd_kernels import reference
from conftest import fused_backends

# The interpreter warns of the NaN it computes with (numpy's invalid-value warnings): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

B, C, H, W = 3, 5, 7, 9
BAD_VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def _cwd(inputs, **kw):
    s, t = inputs
    return cskd_kernels.cwd_loss(s, t, temperature=2.0, **kw)


def _cka_loss(inputs, **kw):
    return cskd_kernels.cka_loss(*inputs, **kw)


def _linear_cka(inputs, **kw):
    return cskd_kernels.linear_cka(*inputs, **kw)


def _linear_cka_unbiased(inputs, **kw):
    return cskd_kernels.linear_cka(*inputs, unbiased=True, **kw)


def _linear_cka_grouped(inputs, **kw):
    return cskd_kernels.linear_cka(*inputs, grouped=True, **kw)


def _channel_attention(inputs, **kw):
    x, gamma = inputs
    return cskd_kernels.channel_attention(x, gamma, temperature=2.0, **kw)


def _position_attention(inputs, **kw):
    return cskd_kernels.position_attention(*inputs, temperature=2.0, **kw)


def _position_attention_grid(inputs, **kw):
    return cskd_kernels.position_attention(*inputs, temperature=2.0, grid=(2, 3), **kw)


# op -> (function, {input name: shape}, names of the inputs that require grad)
OPS = {
    "cwd_loss": (_cwd, {"s": (B, C, H, W), "t": (B, C, H, W)}, ("s",)),
    "cka_loss": (_cka_loss, {"x": (B + 2, C, H, W), "y": (B + 2, C + 1, H, W)}, ("x", "y")),
    "linear_cka": (_linear_cka, {"x": (B + 2, C, H, W), "y": (B + 2, C + 1, H, W)}, ("x", "y")),
    "linear_cka_unbiased": (_linear_cka_unbiased, {"x": (B + 2, C, H, W), "y": (B + 2, C + 1, H, W)}, ("x", "y")),
    "linear_cka_grouped": (_linear_cka_grouped, {"x": (2, B + 2, C, H), "y": (2, B + 2, C + 1, W)}, ("x", "y")),
    "channel_attention": (_channel_attention, {"x": (B, C, H, W), "gamma": (1,)}, ("x", "gamma")),
    "position_attention": (_position_attention, {"q": (B, 4, H, W), "k": (B, 4, H, W), "v": (B, 6, H, W)},
                           ("q", "k", "v")),
    "position_attention_grid": (_position_attention_grid,
                                {"q": (B, 4, H, W), "k": (B, 4, H, W), "v": (B, 6, H, W)}, ("q", "k", "v")),
}


def _backends():
    pairs = [pytest.param("reference", "cpu", torch.float32, id="reference-float32"),
             pytest.param("reference", "cpu", torch.float64, id="reference-float64")]
    for pair in fused_backends():
        backend, device = pair.values
        pairs.append(pytest.param(backend, device, torch.float32, id=f"{pair.id}-float32"))
        if backend == "cpu":  # the C++ kernels' float64 bodies are the portable scalar loops
            pairs.append(pytest.param(backend, device, torch.float64, id=f"{pair.id}-float64"))
    return pairs


def _cases():
    for op, (_, shapes, _) in OPS.items():
        for name in shapes:
            for where in ("inside", "last"):
                yield pytest.param(op, name, where, id=f"{op}-{name}-{where}")


def _inputs(op, bad_name, where, value, dtype, device):
    _, shapes, needs_grad = OPS[op]
    inputs = []
    for name, shape in shapes.items():
        x = torch.randn(shape, dtype=torch.float64)
        if name == "gamma":
            x.fill_(0.7)
        if name == bad_name:
            flat = x.view(-1)
            flat[min(7, flat.numel() - 1) if where == "inside" else -1] = value
        inputs.append(x.to(device=device, dtype=dtype).requires_grad_(name in needs_grad))
    return inputs


def _run(op, inputs, **kw):
    fn, shapes, needs_grad = OPS[op]
    out = fn(inputs, **kw)
    grad_out = torch.ones_like(out) if out.dim() else None
    leaves = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, dict(zip([n for n in shapes if n in needs_grad], grads))


@pytest.mark.parametrize("bad", list(BAD_VALUES))
@pytest.mark.parametrize("op,bad_name,where", list(_cases()))
@pytest.mark.parametrize("backend,device,dtype", _backends())
def test_nonfinite_input_gives_nonfinite_output_and_gradients(backend, device, dtype, op, bad_name, where, bad):
    inputs = _inputs(op, bad_name, where, BAD_VALUES[bad], dtype, device)
    exact = [x.detach().cpu().double().requires_grad_(x.requires_grad) for x in inputs]
    ref_out, ref_grads = _run(op, exact, backend="reference")
    out, grads = _run(op, inputs, backend=backend)

    assert not torch.isfinite(ref_out).all(), "the reference itself should not be finite here"
    ref_bad = ~torch.isfinite(ref_out)
    got_bad = ~torch.isfinite(out.detach().cpu())
    assert got_bad[ref_bad].all(), f"{op} ({backend}): finite output where the reference's is not: {out}"
    for name, ref_grad in ref_grads.items():
        grad = grads[name].detach().cpu().double()
        ref_bad = ~torch.isfinite(ref_grad)
        if ref_bad.any():
            missing = int((ref_bad & torch.isfinite(grad)).sum())
            assert missing == 0, (
                f"{op} ({backend}): the gradient of {name} is finite at {missing} of the "
                f"{int(ref_bad.sum())} entries where the reference's is not"
            )
        else:  # the reference's gradient is finite: ours must be that gradient
            rtol, atol = (1e-9, 1e-11) if dtype == torch.float64 else (2e-4, 1e-5)
            torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol, msg=lambda m: f"{op} d{name}: {m}")
