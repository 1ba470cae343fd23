"""Position (spatial) self-attention, PAM's core (SPEC section 3), fused.

    out[:, i] = sum_j softmax_j(q[:, i] . k[:, j] / T) v[:, j]

over all H*W positions (grid=None) or inside each torch.chunk grid cell. The
fused backends never store the N x N affinity map: the forward runs an
online softmax over key blocks and saves only the row log-sum-exp; the
backward recomputes the probabilities blockwise (flash-attention style).
Memory is linear in N.

Cells are described by a small int32 table, one row per cell:
(row start, height, column start, width), computed on the host from
torch.chunk's sizes; global mode is the single cell covering the map. Every
cell of every image is handled in one kernel launch.

Kernels per backend (same contract everywhere):
    forward(q, k, v, cells, largest_cell, scale)                        -> (out, lse)
    backward(q, k, v, out, lse, grad_out, cells, largest_cell, scale)  -> (dq, dk, dv)
with lse of shape (B, H, W) holding log sum_j exp(s_ij) of the scaled scores
and largest_cell the size of the largest cell (a host int: the launch grid
is sized from it without reading the device table).
"""

import functools
import numbers

import torch

from cskd_kernels import reference
from cskd_kernels._validation import accumulation_dtype, check_float_tensor, check_same_device, check_temperature
from cskd_kernels._library import kernel_op
from cskd_kernels.backend import kernels, resolve_backend
from cskd_kernels.grid import chunk_sizes


@functools.lru_cache(maxsize=64)
def _cell_table_host(height, width, grid):
    if grid is None:
        return torch.tensor([[0, height, 0, width]], dtype=torch.int32)
    rows, cols = chunk_sizes(height, grid[0]), chunk_sizes(width, grid[1])
    row_starts = [sum(rows[:i]) for i in range(len(rows))]
    col_starts = [sum(cols[:j]) for j in range(len(cols))]
    table = [[r0, h, c0, w] for r0, h in zip(row_starts, rows) for c0, w in zip(col_starts, cols)]
    return torch.tensor(table, dtype=torch.int32)


@functools.lru_cache(maxsize=64)
def _cell_table_on(height, width, grid, device):
    return _cell_table_host(height, width, grid).to(device)


def largest_cell(height, width, grid):
    """Positions in the largest cell: torch.chunk's first chunk is never shorter than the others."""
    if grid is None:
        return height * width
    return chunk_sizes(height, grid[0])[0] * chunk_sizes(width, grid[1])[0]


def cell_table(height, width, grid, device="cpu"):
    """(cells, 4) int32: row start, height, column start, width of each torch.chunk cell, row-major."""
    grid = None if grid is None else tuple(grid)
    if torch.compiler.is_compiling():
        # Dynamo ignores lru_cache (and warns); a compiled graph builds the table once per compilation anyway.
        return _cell_table_host.__wrapped__(height, width, grid).to(device)
    return _cell_table_on(height, width, grid, torch.device(device))


# The two kernels are PyTorch ops (cskd_kernels._library: a custom op, and a
# triton_op on the Triton backend) with a registered autograd formula, so
# torch.compile traces them with no graph break and autograd sees one node.


def _launch(backend, name, *args, largest_cell):
    # The C++ kernels read the cell table on the host and need no size bound;
    # the Triton launchers size their launch grid from largest_cell.
    if backend == "cpu":
        return getattr(kernels("position_attention", backend), name)(*args)
    return getattr(kernels("position_attention", backend), name)(*args[:-1], largest_cell, args[-1])


@kernel_op("position_attention_forward")
def position_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cells: torch.Tensor, largest_cell: int, scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Cv, H, W) in the input dtype, lse (B, H, W) in the accumulation dtype)."""
    out, lse = _launch(backend, "forward", q, k, v, cells, scale, largest_cell=largest_cell)
    return out, lse


@position_attention_forward.register_fake
def _position_attention_forward_fake(q, k, v, cells, largest_cell, scale, backend):
    b, _, h, w = q.shape
    return torch.empty_like(v), q.new_empty((b, h, w), dtype=accumulation_dtype(q.dtype))


@kernel_op("position_attention_backward")
def position_attention_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
    cells: torch.Tensor, largest_cell: int, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the input dtype, by blockwise recomputation of the probabilities."""
    dq, dk, dv = _launch(backend, "backward", q, k, v, out, lse, grad_out, cells, scale, largest_cell=largest_cell)
    return dq, dk, dv


@position_attention_backward.register_fake
def _position_attention_backward_fake(q, k, v, out, lse, grad_out, cells, largest_cell, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cells, largest_cell, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # saved for the backward, not a result
    ctx.set_materialize_grads(False)  # no zero-filled gradient for it in the backward
    ctx.save_for_backward(q, k, v, out, lse, cells)
    ctx.largest_cell, ctx.scale, ctx.backend = largest_cell, scale, backend


@torch.autograd.function.once_differentiable
def _backward(ctx, grad_out, _grad_lse):
    if grad_out is None:  # the output's gradient is undefined (zero)
        return None, None, None, None, None, None, None
    q, k, v, out, lse, cells = ctx.saved_tensors
    dq, dk, dv = position_attention_backward(
        q, k, v, out, lse, grad_out.contiguous(), cells, ctx.largest_cell, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None


position_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_grid(grid, height, width):
    if grid is None:
        return None
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or any(isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 1 for g in grid)
    ):
        raise ValueError(f"grid={grid!r} must be None or two positive ints (rows, columns)")
    return (int(grid[0]), int(grid[1]))


def _check_inputs(q, k, v, temperature):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    check_same_device(q=q, k=k, v=v)
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype} ({shapes})")
    if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]:
        raise ValueError(f"q, k and v must have the same batch size: {shapes}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same width d (dim 1): {shapes}")
    if q.shape[2:] != k.shape[2:] or q.shape[2:] != v.shape[2:]:
        raise ValueError(f"q, k and v must have the same spatial size (H, W): {shapes}")
    check_temperature(temperature, "position_attention")


def position_attention(q, k, v, *, temperature=1.0, grid=None, backend=None):
    """softmax(Q^T K / temperature) applied to V over the H*W positions, or inside each grid cell.

    q, k: (B, d, H, W); v: (B, Cv, H, W) (d and Cv may differ). grid=(gh, gw)
    cuts the map as torch.chunk(x, gh, dim=2) then torch.chunk(cell, gw,
    dim=3) do (uneven cells; fewer cells when torch.chunk gives fewer).
    ``temperature`` in [MIN_TEMPERATURE, MAX_TEMPERATURE] (cskd_kernels._validation).
    Returns (B, Cv, H, W); gradients flow to q, k and v.
    """
    _check_inputs(q, k, v, temperature)
    grid = _check_grid(grid, q.shape[2], q.shape[3])
    return run_position_attention(q, k, v, temperature, grid, resolve_backend(backend, q, k, v))


def run_position_attention(q, k, v, temperature, grid, backend):
    """position_attention on checked inputs (grid a tuple or None) and a resolved backend name.

    For callers that checked and resolved once at their own boundary (CSKDLoss): no check repeated per call.
    """
    if backend == "reference":
        return reference.position_attention(q, k, v, temperature=temperature, grid=grid)
    out, _ = run_position_attention_saving(q, k, v, temperature, grid, backend)
    return out


def run_position_attention_saving(q, k, v, temperature, grid, backend):
    """(out, lse) of the fused kernels without autograd, for an autograd Function of its own.

    Its backward passes both back to run_position_attention_grads. Fused backends ("cpu", "triton") only.
    """
    height, width = q.shape[2], q.shape[3]
    cells = cell_table(height, width, grid, q.device)
    return position_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), cells,
                                      largest_cell(height, width, grid), 1.0 / float(temperature), backend)


def run_position_attention_grads(q, k, v, out, lse, grad_out, temperature, grid, backend):
    """(dq, dk, dv) from run_position_attention_saving's (out, lse) and the output's gradient."""
    height, width = q.shape[2], q.shape[3]
    cells = cell_table(height, width, grid, q.device)
    return position_attention_backward(q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
                                       grad_out.contiguous(), cells, largest_cell(height, width, grid),
                                       1.0 / float(temperature), backend)
