"""channel_attention (CAM): the fused backends against the released code and the reference.

The released configuration: B = 8 images of 64 x 128 features (N = 8192),
C in {128, 256, 512} (student R18, teacher R101, PSPNet teacher), T = 2,
gamma = 0.7 (nonzero, so every term of the backward is live).

The work is five C x C x N products (Gram and A X forward; dOut X^T,
A^T dOut and (dE + dE^T) X backward); the floor is the larger of their
arithmetic and the C x N traffic (forward reads x, writes out; backward reads
dOut and x, writes dx).

Provider "products" times the forward's two BLAS products alone,
bmm(X, X^T) and bmm(A, X) with a fixed A: the time the issue compares the
fused forward with (on a GPU, cuBLAS; the fused target is within 1.2x of it).
"""

import functools

import pytest
import torch

import cskd_kernels
from benchmarks.harness import Workload, declare_cases
from cskd_kernels import reference, released

BATCH = 8
HEIGHT, WIDTH = 64, 128
N = HEIGHT * WIDTH
TEMPERATURE = 2.0
GAMMA = 0.7
FLOAT32_BYTES = 4
CHANNELS = (128, 256, 512)


def _attention_fn(provider):
    if provider == "released":
        return functools.partial(released.channel_attention, temperature=TEMPERATURE)
    if provider == "reference":
        return functools.partial(reference.channel_attention, temperature=TEMPERATURE)
    if provider in ("cpu", "triton"):
        return functools.partial(cskd_kernels.channel_attention, temperature=TEMPERATURE, backend=provider)
    raise ValueError(f"unknown provider {provider!r}")


def _features(channels, device):
    # Energies of order one (scale N^-1/4): a softmax neither one-hot nor flat, as with trained features.
    return torch.randn(BATCH, channels, HEIGHT, WIDTH, device=device) * N**-0.25


def build(provider, channels, device):
    channels = int(channels)
    x = _features(channels, device).requires_grad_(True)
    if provider == "products":
        features = x.detach().reshape(BATCH, channels, N)
        attention = torch.softmax(torch.randn(BATCH, channels, channels, device=device), dim=-1)

        def products():
            torch.bmm(features, features.transpose(1, 2))
            return torch.bmm(attention, features)

        return Workload(forward=products)
    gamma = torch.tensor([GAMMA], device=device, requires_grad=True)
    fn = _attention_fn(provider)
    return Workload(forward=lambda: fn(x, gamma), grad_inputs=(x, gamma), grad_output=torch.randn_like(x))


def flops(channels, mode):
    product = 2 * BATCH * channels * channels * N
    return {"forward": 2 * product, "backward": 3 * product, "full": 5 * product}[mode]


def bytes_moved(channels, mode):
    tensor = BATCH * channels * N * FLOAT32_BYTES
    return {"forward": 2 * tensor, "backward": 3 * tensor, "full": 5 * tensor}[mode]


FLOORS = {"bytes_moved": bytes_moved, "flops": flops}
PROVIDERS = ("released", "reference", "cpu", "triton")

CASES = declare_cases(
    op="channel_attention", case="released_config", providers=PROVIDERS, modes=("full", "forward", "backward"),
    xs=CHANNELS, x_name="C", build=build, **FLOORS,
) + declare_cases(
    op="channel_attention", case="released_config", providers=("products",), modes=("forward",),
    xs=CHANNELS, x_name="C", build=build, **FLOORS,
)


@pytest.mark.parametrize("case", CASES)
def test_bench_channel_attention(benchmark, bench, case):
    bench.run(benchmark, case)
