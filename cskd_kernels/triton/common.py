"""What several Triton ops share: the grid-cell addressing of (B, C, H, W) maps and the launch size.

A cell table (cells, 4) int32 holds per torch.chunk cell its row start,
height, column start and width (cskd_kernels.ops.position_attention.cell_table);
kernels read cells in place through it, nothing is cut or padded on the host.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from cskd_kernels.backend import triton_interpreting

PROGRAMS_PER_SM = 4
# The interpreter runs every program in Python: few programs, still more than
# one so the cross-program reductions are exercised.
INTERPRETER_PROGRAMS = 4


def traceable(kernel):
    """``kernel`` as a triton_op body must launch it: through torch.library.wrap_triton.

    In eager calls wrap_triton gives the kernel itself; while torch.compile
    traces the op (cskd_kernels._library) it records the launch into the graph.
    """
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    if wrap_triton is None:  # torch before 2.6: the ops are opaque custom ops
        return kernel
    if triton_interpreting():
        return _traceable_interpreted(kernel)
    return wrap_triton(kernel)


def _traceable_interpreted(kernel):
    """wrap_triton for an interpreted kernel, so torch.compile traces the same graph on the CPU as on a GPU.

    Under TRITON_INTERPRET=1 ``@triton.jit`` gives an InterpretedFunction,
    which torch's wrap_triton passes through untraced (its tracer needs a
    JITFunction): tracing would then run the kernel on fake tensors. An
    _InterpretedJIT gives the tracer its JITFunction and launches through the
    interpreter. Two things stay GPU-only: Inductor cannot generate code for
    Triton on the CPU (interpreted ops compile with backend="aot_eager"), and
    torch finds the tensors a kernel writes by compiling it for the GPU, so
    here it assumes every input is written and copies each back after the
    launch (same values, but autograd then refuses a backward through a
    saved input whose version moved).
    """
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
    from torch._library.triton import is_wrap_triton_enabled

    if not is_wrap_triton_enabled():
        return kernel
    return TraceableTritonKernelWrapper(_interpreted_jit(kernel), None, None)


class _InterpretedJIT(JITFunction):
    """A JITFunction of an interpreted kernel's source whose launches run the interpreter."""

    def __init__(self, interpreted):
        super().__init__(interpreted.fn)
        self.interpreted = interpreted

    def run(self, *args, grid, warmup, **kwargs):  # every launch, direct or through torch's Autotuner wrapper
        return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)

    # By identity: JITFunction hashes its source's dependencies, which under
    # the interpreter are InterpretedFunctions it refuses to hash.
    __hash__ = object.__hash__
    __eq__ = object.__eq__


@functools.lru_cache(maxsize=None)
def _interpreted_jit(kernel):
    return _InterpretedJIT(kernel)  # one per kernel: torch's kernel table keys on the object


@triton.jit
def load_cell(cells_ptr, cell):
    """(row start, column start, width, positions) of one cell of the table."""
    row0 = tl.load(cells_ptr + cell * 4)
    height = tl.load(cells_ptr + cell * 4 + 1)
    col0 = tl.load(cells_ptr + cell * 4 + 2)
    width = tl.load(cells_ptr + cell * 4 + 3)
    return row0, col0, width, height * width


@triton.jit
def cell_pixels(index, row0, col0, width, W):
    """Pixel offset (row * W + col) of position ``index`` of a cell."""
    return (row0 + index // width) * W + col0 + index % width


def dot_precision(dtype):
    """tl.dot's input precision for the compute-bound products (attention, projections) of ``dtype`` operands.

    float32 follows torch.get_float32_matmul_precision(), as PyTorch's own
    float32 matmuls do: "highest" (PyTorch's default) gives "tf32x3" (three
    TF32 products: float32 accuracy on the tensor cores; IEEE float32 dots
    run on the FMA units, measured 20-40x slower on an H100), "high" or
    "medium" gives "tf32" (one TF32 product, a third of the tensor-core work,
    about three fewer digits). 16-bit operands multiply as they are.
    The Gram and CKA kernels keep "tf32x3" always: they are memory-bound, and
    the CKA needs the digits.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def interpreted_launches():
    """Whether the launches go to Triton's interpreter, which pays per program and per loop step, not per element.

    Every launch size that differs between a GPU and the interpreter asks
    this (benchmarks/gpu_compile.py sets it False to plan a GPU's launches on
    the CPU).
    """
    return triton_interpreting()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device):
    """The SM count of a CUDA device."""
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def target_programs(device):
    """Programs that fill the device: a few per SM on a GPU, a handful under the interpreter."""
    if interpreted_launches():
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * multiprocessors(device)
