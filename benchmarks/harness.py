"""Declaring benchmark cases and turning them into timed callables.

An op's benchmark file declares its cases with ``declare_cases``: one
``build(provider, x, device)`` function that creates the inputs on ``device``
and returns a ``Workload`` (the forward callable and the tensors that take
gradients). The harness derives the three modes from it:

- "forward":  the forward alone, with autograd recording (as in training);
- "backward": the backward alone, of one forward run during setup;
- "full":     forward + backward.

Providers and where they run:
- "cpu": the C++ extension, CPU tensors only (skipped when it is not built);
- "triton": CUDA tensors only (never timed under the Triton interpreter);
- every other provider ("released", "reference", "compile", "sdpa", ...) runs on
  each benchmark device (the CPU, and the GPU when there is one).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import torch

from benchmarks.machine import synchronize

MODES = ("forward", "backward", "full")

# Providers bound to one device; the others run on every benchmark device.
PROVIDER_DEVICES = {"cpu": ("cpu",), "triton": ("cuda",), "triton-graphs": ("cuda",)}

_REGISTRY = {}


@dataclasses.dataclass
class Workload:
    """What a case times: ``forward()`` returns the output (a scalar loss or a tensor).

    ``grad_inputs``: the tensors whose gradients the backward computes (their
    .grad is cleared before every backward, so no accumulation is timed).
    ``grad_output``: the output gradient for non-scalar outputs (None for a loss).
    """

    forward: Callable[[], Any]
    grad_inputs: Sequence[torch.Tensor] = ()
    grad_output: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class BenchCase:
    op: str
    case: str
    provider: str
    mode: str
    x: float
    device: str
    build: Callable[[str, Any, torch.device], Workload] = dataclasses.field(compare=False, repr=False)
    x_name: str = "x"
    # Floors: bytes that must move and FLOPs that must be done, as functions of (x, mode); None: no floor.
    bytes_moved: Optional[Callable[[Any, str], float]] = dataclasses.field(default=None, compare=False, repr=False)
    flops: Optional[Callable[[Any, str], float]] = dataclasses.field(default=None, compare=False, repr=False)
    module: str = ""

    @property
    def id(self):
        return f"{self.op}-{self.case}-{self.mode}-{self.x_name}{self.x}-{self.provider}-{self.device}"

    @property
    def key(self):
        return (self.op, self.case, self.provider, self.mode, self.x)

    def floor_seconds(self, rates):
        if self.bytes_moved is None and self.flops is None:
            return None
        bytes_moved = self.bytes_moved(self.x, self.mode) if self.bytes_moved else 0.0
        flops = self.flops(self.x, self.mode) if self.flops else 0.0
        return rates.floor_seconds(bytes_moved, flops)


def bench_devices():
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def declare_cases(*, op, case, providers, modes, xs, build, x_name="x", bytes_moved=None, flops=None):
    """All (provider, device, mode, x) cases of one op and case name, registered for the memory worker.

    Returns a list of pytest params (ids like ``cka-released_config-full-p65536-cpu-cpu``).
    """
    import pytest

    params = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        for x in xs:
            for provider in providers:
                for device in PROVIDER_DEVICES.get(provider, bench_devices()):
                    bench_case = BenchCase(
                        op=op, case=case, provider=provider, mode=mode, x=x, device=device, build=build,
                        x_name=x_name, bytes_moved=bytes_moved, flops=flops, module=build.__module__,
                    )
                    _REGISTRY[bench_case.id] = bench_case
                    params.append(pytest.param(bench_case, id=bench_case.id))
    return params


def registered_case(case_id):
    return _REGISTRY[case_id]


def skip_reason(case):
    """Why a case cannot run here (None when it can)."""
    from cskd_kernels.backend import extension, extension_error, triton_available, triton_interpreting

    if case.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    if case.provider == "cpu" and extension() is None:
        return f"the C++ extension is not built ({extension_error()})"
    if case.provider == "triton":
        if not triton_available():
            return "triton is not installed"
        if triton_interpreting():
            return "TRITON_INTERPRET=1: the interpreter is for correctness, not timing"
    return None


def clear_grads(workload):
    """Drop the gradients of the workload's inputs (a training step starts without them)."""
    for tensor in workload.grad_inputs:
        tensor.grad = None


def mode_callable(workload, mode):
    """The callable one round of ``mode`` runs (setup work, like the forward of "backward", done here)."""
    if mode == "forward":
        return workload.forward
    if mode == "full":

        def full():
            clear_grads(workload)
            workload.forward().backward(workload.grad_output)

        return full
    if mode == "backward":
        if not workload.grad_inputs:
            raise ValueError("mode 'backward' needs a workload with grad_inputs")
        output = workload.forward()

        def backward():
            clear_grads(workload)
            output.backward(workload.grad_output, retain_graph=True)

        return backward
    raise ValueError(f"mode {mode!r} is not one of {MODES}")


def synchronized(fn, device):
    """fn followed by a device synchronization, so the time covers the kernels and not just their launch."""
    if torch.device(device).type != "cuda":
        return fn

    @functools.wraps(fn)
    def run():
        out = fn()
        synchronize(device)
        return out

    return run


def build_callable(case):
    """(callable for the case's mode, the workload) on the case's device."""
    device = torch.device(case.device)
    workload = case.build(case.provider, case.x, device)
    return synchronized(mode_callable(workload, case.mode), device), workload
