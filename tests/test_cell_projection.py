"""cell_projection against a per-cell 1x1 convolution of the reference's torch.chunk cells."""

import pytest
import torch
import torch.nn.functional as F

from cskd_kernels import reference
from cskd_kernels.ops import cell_projection as cell_projection_module
from cskd_kernels.ops.cell_projection import cell_projection
from cskd_kernels.grid import CellLayout
from conftest import HAS_EXTENSION, fused_backends

# "reference": the PyTorch path (padded cells, batched products); "cpu": the C++ kernels.
BACKENDS = ["reference"] + (["cpu"] if HAS_EXTENSION else [])


def _cases():
    """(backend, device, dtype): float64 where the backend runs it, float32 on every fused backend."""
    cases = [pytest.param(backend, "cpu", torch.float64, id=f"{backend}-float64") for backend in BACKENDS]
    for p in fused_backends():
        backend, device = p.values
        cases.append(pytest.param(backend, device, torch.float32, id=f"{p.id}-float32"))
        if device == "cuda":  # the interpreter's 16-bit dots are not the GPU's
            cases.append(pytest.param(backend, device, torch.bfloat16, id=f"{p.id}-bfloat16"))
    return cases


# (rtol, atol relative to the largest expected value) against the float64 per-cell convolution.
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}


def _per_cell_reference(x, projections, grid):
    """Each cell convolved with its own (or the shared) weights, reassembled with torch.cat."""
    cells = reference.grid_cells(x, grid) if grid else [[x]]
    outs = []
    for weight, bias in projections:
        rows, index = [], 0
        for row in cells:
            row_out = []
            for cell in row:
                w, b = (weight[index], bias[index]) if weight.shape[0] > 1 else (weight[0], bias[0])
                row_out.append(F.conv2d(cell, w[:, :, None, None], b))
                index += 1
            rows.append(torch.cat(row_out, dim=3))
        outs.append(torch.cat(rows, dim=2))
    return outs


@pytest.mark.parametrize("shape,grid", [((3, 5, 13, 26), (5, 5)), ((2, 4, 6, 6), (5, 5)), ((2, 3, 13, 11), (2, 3)),
                                        ((3, 4, 7, 9), None)])
@pytest.mark.parametrize("shared", [False, True], ids=["per-cell", "shared"])
@pytest.mark.parametrize("outputs", ["qkv", "four"])  # four: past the Triton kernels' three, the PyTorch path
@pytest.mark.parametrize("backend,device,dtype", _cases())
def test_matches_per_cell_convolution_values_and_gradients(shape, grid, shared, outputs, backend, device, dtype):
    b, c, h, w = shape
    cells = 1 if shared else CellLayout(h, w, grid or (1, 1)).num_cells
    sizes = (2, 2, c + 1) if outputs == "qkv" else (1, 2, 3, c)
    x = (torch.randn(shape, dtype=torch.float64) + 1.0).requires_grad_(True)
    projections = [(torch.randn(cells, out, c, dtype=torch.float64, requires_grad=True),
                    torch.randn(cells, out, dtype=torch.float64, requires_grad=True)) for out in sizes]
    leaves = [x] + [t for pair in projections for t in pair]
    inputs = [t.detach().to(device, dtype).requires_grad_(True) for t in leaves]
    outs = cell_projection(inputs[0], list(zip(inputs[1::2], inputs[2::2])), grid=grid, backend=backend)
    expected = _per_cell_reference(x, projections, grid)
    grads_out = [torch.randn_like(e) for e in expected]
    rtol, atol = TOLERANCES[dtype]
    for out, want in zip(outs, expected):
        assert out.is_contiguous() and out.dtype == dtype
        torch.testing.assert_close(out.cpu().double(), want, rtol=rtol, atol=atol * want.abs().max().item())
    torch.autograd.backward(outs, [g.to(device, dtype) for g in grads_out])
    torch.autograd.backward(expected, grads_out)
    for i, (leaf, got) in enumerate(zip(leaves, inputs)):
        torch.testing.assert_close(got.grad.cpu().double(), leaf.grad, rtol=rtol, atol=atol * leaf.grad.abs().max().item(),
                                   msg=lambda m: f"leaf {i}: {m}")


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [False, True], ids=["per-cell", "shared"])
def test_cpu_tasks_of_several_images(shared, dtype):
    """CamVid-like 9 x 9 cells (and a 9 x 8 last column): the C++ kernels take several images per task,
    here groups of 3 and 2 images, cells of two sizes in one group's tile."""
    test_matches_per_cell_convolution_values_and_gradients((5, 3, 45, 44), (5, 5), shared, "qkv", "cpu", "cpu", dtype)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 25 * (5 + 6) * 18 * 8, 2**30], ids=["one-image", "three-images", "whole-batch"])
def test_chunks_of_images_give_the_same_values_and_gradients(monkeypatch, chunk_bytes):
    """The image chunks (one image on the CPU at the released size, the whole batch on a GPU) change nothing."""
    x = torch.randn(7, 5, 13, 26, dtype=torch.float64, requires_grad=True)  # 7 images: a shorter last chunk
    projections = [(torch.randn(25, out, 5, dtype=torch.float64, requires_grad=True),
                    torch.randn(25, out, dtype=torch.float64, requires_grad=True)) for out in (2, 4)]
    leaves = [x] + [t for pair in projections for t in pair]
    expected = _per_cell_reference(x, projections, (5, 5))
    grads_out = [torch.randn_like(e) for e in expected]
    want = torch.autograd.grad(expected, leaves, grads_out)
    monkeypatch.setitem(cell_projection_module.CHUNK_BYTES, "cpu", chunk_bytes)
    outs = cell_projection(x, projections, grid=(5, 5), backend="reference")
    got = torch.autograd.grad(outs, leaves, grads_out)
    for out, e in zip(outs, expected):
        torch.testing.assert_close(out, e, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)  # 6x7 under (2, 2): 4 cells
    bias = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: cell_projection(x, [(w, b)], grid=(2, 2), backend=backend)[0],
                                    (x, w, bias))


def test_float32_output_in_input_dtype():
    x = torch.randn(2, 3, 13, 26)
    w, b = torch.randn(25, 2, 3), torch.randn(25, 2)
    (out,) = cell_projection(x, [(w, b)], grid=(5, 5))
    (want,) = _per_cell_reference(x.double(), [(w.double(), b.double())], (5, 5))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w_shape,b_shape", [((3, 2, 3), (3, 2)), ((25, 2, 4), (25, 2)), ((25, 2, 3), (25, 3))])
def test_bad_projection_shapes(w_shape, b_shape):
    with pytest.raises(ValueError, match=r"do not fit x \(2, 3, 13, 26\) with 25 cells"):
        cell_projection(torch.randn(2, 3, 13, 26), [(torch.randn(w_shape), torch.randn(b_shape))], grid=(5, 5))
