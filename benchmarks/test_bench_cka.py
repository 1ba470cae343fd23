"""cka_loss: the fused backends against the released code, the reference and torch.compile.

Student x (n, p) requires grad, teacher y (n, q) does not (as in distillation).
The floor is memory traffic: the forward reads x and y once, the backward reads
x and writes dx once.
"""

import functools

import pytest
import torch

import cskd_kernels
from benchmarks.harness import Workload, declare_cases
from cskd_kernels import reference, released

N = 8  # samples per CKA in the released configuration (batch 16 over 2 GPUs)
FLOAT32_BYTES = 4

# Every p below compiles its own specialized graph: allow them all instead of falling back to eager.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.cka_loss, dynamic=False)


def _loss_fn(provider):
    if provider == "released":
        return released.cka_loss
    if provider == "reference":
        return reference.cka_loss
    if provider == "compile":
        return _compiled_reference()
    if provider in ("cpu", "triton"):
        return functools.partial(cskd_kernels.cka_loss, backend=provider)
    raise ValueError(f"unknown provider {provider!r}")


def _workload(provider, x_shape, y_shape, device):
    x = torch.randn(x_shape, device=device, requires_grad=True)
    y = torch.randn(y_shape, device=device)
    loss = _loss_fn(provider)
    return Workload(forward=lambda: loss(x, y), grad_inputs=(x,))


def build_released_config(provider, p, device):
    # Student DeepLabV3-R18 (128 channels), teacher R101 (256), 64 x 128 features, n = 8.
    return _workload(provider, (N, 128, 64, 128), (N, 256, 64, 128), device)


def build_sweep(provider, p, device):
    return _workload(provider, (N, p), (N, 2 * p), device)


def bytes_moved(p, mode):
    x, y = N * p * FLOAT32_BYTES, N * 2 * p * FLOAT32_BYTES
    return {"forward": x + y, "backward": x + x, "full": x + y + x + x}[mode]


def flops(p, mode):
    forward, backward = 2 * N * N * (p + 2 * p), 2 * N * N * p
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


PROVIDERS = ("released", "reference", "compile", "cpu", "triton")
FLOORS = {"bytes_moved": bytes_moved, "flops": flops}

CASES = declare_cases(
    op="cka", case="released_config", providers=PROVIDERS, modes=("full", "forward"), xs=(128 * 64 * 128,),
    x_name="p", build=build_released_config, **FLOORS,
) + declare_cases(
    op="cka", case="p_sweep", providers=PROVIDERS, modes=("full",), xs=(2**14, 2**16, 2**18, 2**20, 2**21),
    x_name="p", build=build_sweep, **FLOORS,
)


@pytest.mark.parametrize("case", CASES)
def test_bench_cka(benchmark, bench, case):
    bench.run(benchmark, case)
