"""position_attention: the fused backends against the reference (materialised map) and PyTorch's SDPA.

Cases (SPEC section 7 shapes; x is N, the positions of the map):
    global_d16_cv128, global_d32_cv256   B=2, N = 64x64 and 64x128, attention over the whole map
    grid5x5_d16_cv128, grid5x5_d32_cv256 B=8, 64x128 cut in torch.chunk's 5x5 cells (13x26 .. 12x24)
    n_sweep                              B=2, (16, 128), N = 1024 .. 16384: memory growth in N

Providers: "cpu" / "triton" (ours), "reference" (the N x N map materialised;
its grid mode is a Python loop over the cells), "sdpa"
(torch.nn.functional.scaled_dot_product_attention with PyTorch's default
choice of backend; in grid mode applied cell by cell) and, on CUDA, every SDPA
backend forced one at a time ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
"sdpa_math"; a backend that rejects the shapes, e.g. flash with d != Cv, is
skipped).

Floor: forward + backward with recomputation costs 2 N^2 (4d + 3Cv) FLOPs per
image and cell (forward 2 N^2 (d + Cv); backward recomputes S and does dP, dV,
dQ, dK: 2 N^2 (3d + 2Cv)), divided by the float32 matmul rate of the same run.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import cskd_kernels
from benchmarks.harness import Workload, declare_cases
from cskd_kernels import reference
from cskd_kernels.grid import chunk_sizes

GLOBAL_BATCH = 2
GRID_BATCH = 8
GRID = (5, 5)
MAPS = {1024: (32, 32), 2048: (32, 64), 4096: (64, 64), 8192: (64, 128), 16384: (128, 128)}

SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}


def _as_sequence(t):
    """(B, C, H, W) -> (B, 1, H*W, C): SDPA's (batch, heads, length, width) layout."""
    return t.flatten(2).transpose(1, 2).unsqueeze(1)


def _sdpa(q, k, v, temperature, backend=None):
    b, cv, h, w = v.shape
    args = (_as_sequence(q), _as_sequence(k), _as_sequence(v))
    if backend is None:
        out = F.scaled_dot_product_attention(*args, scale=1.0 / temperature)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            out = F.scaled_dot_product_attention(*args, scale=1.0 / temperature)
    return out.squeeze(1).transpose(1, 2).reshape(b, cv, h, w)


def _sdpa_cells(q, k, v, temperature, grid, backend=None):
    """SDPA applied cell by cell (a Python loop over the torch.chunk cells), as a user would without our grid mode."""
    rows = []
    for q_row, k_row, v_row in zip(*(torch.chunk(t, grid[0], dim=2) for t in (q, k, v))):
        cells = [
            _sdpa(qc, kc, vc, temperature, backend)
            for qc, kc, vc in zip(*(torch.chunk(t, grid[1], dim=3) for t in (q_row, k_row, v_row)))
        ]
        rows.append(torch.cat(cells, dim=3))
    return torch.cat(rows, dim=2)


def _attention_fn(provider, grid):
    if provider == "reference":
        return functools.partial(reference.position_attention, grid=grid)
    if provider in ("cpu", "triton"):
        return functools.partial(cskd_kernels.position_attention, grid=grid, backend=provider)
    if provider == "sdpa" or provider in SDPA_BACKENDS:
        backend = SDPA_BACKENDS.get(provider)
        if grid is None:
            return lambda q, k, v, temperature: _sdpa(q, k, v, temperature, backend)
        return lambda q, k, v, temperature: _sdpa_cells(q, k, v, temperature, grid, backend)
    raise ValueError(f"unknown provider {provider!r}")


def _workload(provider, batch, d, cv, n, grid, device):
    if provider in SDPA_BACKENDS and torch.device(device).type != "cuda":
        pytest.skip(f"{provider} is a CUDA backend of SDPA")
    h, w = MAPS[n]
    q = torch.randn(batch, d, h, w, device=device, requires_grad=True)
    k = torch.randn(batch, d, h, w, device=device, requires_grad=True)
    v = torch.randn(batch, cv, h, w, device=device, requires_grad=True)
    grad_output = torch.randn(batch, cv, h, w, device=device)
    fn = _attention_fn(provider, grid)
    forward = functools.partial(fn, q, k, v, temperature=1.0)
    if provider in SDPA_BACKENDS:
        try:  # a backend that rejects these shapes (flash: d != Cv) is not timed
            forward()
        except RuntimeError as error:
            pytest.skip(f"{provider} does not accept d={d}, Cv={cv}: {str(error).splitlines()[0][:120]}")
    return Workload(forward=forward, grad_inputs=(q, k, v), grad_output=grad_output)


def build_global_d16_cv128(provider, n, device):
    return _workload(provider, GLOBAL_BATCH, 16, 128, n, None, device)


def build_global_d32_cv256(provider, n, device):
    return _workload(provider, GLOBAL_BATCH, 32, 256, n, None, device)


def build_grid_d16_cv128(provider, n, device):
    return _workload(provider, GRID_BATCH, 16, 128, n, GRID, device)


def build_grid_d32_cv256(provider, n, device):
    return _workload(provider, GRID_BATCH, 32, 256, n, GRID, device)


def _cell_sizes(n, grid):
    if grid is None:
        return [n]
    h, w = MAPS[n]
    return [rows * cols for rows in chunk_sizes(h, grid[0]) for cols in chunk_sizes(w, grid[1])]


def flops_of(batch, d, cv, grid):
    """2 N^2 (d + Cv) forward, 2 N^2 (3d + 2Cv) backward, per image and cell of N positions."""

    def flops(n, mode):
        squares = batch * sum(size * size for size in _cell_sizes(n, grid))
        forward, backward = 2 * squares * (d + cv), 2 * squares * (3 * d + 2 * cv)
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]

    return flops


def bytes_of(batch, d, cv):
    """Reading q, k, v and writing out (forward); reading q, k, v, out, dO and writing dq, dk, dv (backward)."""

    def bytes_moved(n, mode):
        forward = 4 * batch * n * (2 * d + 2 * cv)
        backward = 4 * batch * n * (4 * d + 4 * cv)
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]

    return bytes_moved


PROVIDERS = ("cpu", "triton", "reference", "sdpa") + (tuple(SDPA_BACKENDS) if torch.cuda.is_available() else ())
MODES = ("forward", "backward", "full")


def _floors(batch, d, cv, grid):
    return {"flops": flops_of(batch, d, cv, grid), "bytes_moved": bytes_of(batch, d, cv)}


CASES = (
    declare_cases(op="position_attention", case="global_d16_cv128", providers=PROVIDERS, modes=MODES,
                  xs=(4096, 8192), x_name="N", build=build_global_d16_cv128, **_floors(GLOBAL_BATCH, 16, 128, None))
    + declare_cases(op="position_attention", case="global_d32_cv256", providers=PROVIDERS, modes=MODES,
                    xs=(4096, 8192), x_name="N", build=build_global_d32_cv256, **_floors(GLOBAL_BATCH, 32, 256, None))
    + declare_cases(op="position_attention", case="grid5x5_d16_cv128", providers=PROVIDERS, modes=MODES,
                    xs=(8192,), x_name="N", build=build_grid_d16_cv128, **_floors(GRID_BATCH, 16, 128, GRID))
    + declare_cases(op="position_attention", case="grid5x5_d32_cv256", providers=PROVIDERS, modes=MODES,
                    xs=(8192,), x_name="N", build=build_grid_d32_cv256, **_floors(GRID_BATCH, 32, 256, GRID))
    + declare_cases(op="position_attention", case="n_sweep", providers=("cpu", "triton", "reference", "sdpa"),
                    modes=("full",), xs=(1024, 2048, 4096, 8192, 16384), x_name="N", build=build_global_d16_cv128,
                    **_floors(GLOBAL_BATCH, 16, 128, None))
)


@pytest.mark.parametrize("case", CASES)
def test_bench_position_attention(benchmark, bench, case):
    if case.case == "n_sweep" and case.provider == "reference" and case.x > 8192 and case.device == "cpu":
        pytest.skip("the reference's 16384^2 maps (1 GiB each, several per image) do not fit this machine's memory")
    bench.run(benchmark, case)
