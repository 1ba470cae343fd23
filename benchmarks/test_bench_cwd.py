"""cwd_loss: the fused backends against the released code, the reference and torch.compile.

Student and teacher logits (B, C, H, W) = (8, 19, H, W), Cityscapes' 19
classes, at 64x128 (the released configuration's output stride 8) and 128x256;
the student requires grad, the teacher does not (as in distillation).

The floor is memory traffic: read s and t once and write the student
gradient once (3 tensors). The fused forward does exactly that (it writes ds);
its backward reads ds and writes grad_out * ds (2 tensors); a full step can do
no better than the forward's 3.
"""

import functools

import pytest
import torch

import cskd_kernels
from benchmarks.harness import Workload, declare_cases
from cskd_kernels import reference, released

BATCH = 8
CLASSES = 19
TEMPERATURE = 2.0  # the released training scripts' CWD temperature
FLOAT32_BYTES = 4
SIZES = {64 * 128: (64, 128), 128 * 256: (128, 256)}  # N = H*W -> (H, W)

# Each size compiles its own graph: allow them all instead of falling back to eager.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.cwd_loss, dynamic=False)


def _loss_fn(provider):
    if provider == "released":
        return released.cwd_loss
    if provider == "reference":
        return reference.cwd_loss
    if provider == "compile":
        return _compiled_reference()
    if provider in ("cpu", "triton"):
        return functools.partial(cskd_kernels.cwd_loss, backend=provider)
    raise ValueError(f"unknown provider {provider!r}")


def build_logits(provider, n, device):
    h, w = SIZES[n]
    s = torch.randn(BATCH, CLASSES, h, w, device=device, requires_grad=True)
    t = torch.randn(BATCH, CLASSES, h, w, device=device)
    loss = _loss_fn(provider)
    return Workload(forward=lambda: loss(s, t, temperature=TEMPERATURE), grad_inputs=(s,))


def bytes_moved(n, mode):
    tensor = BATCH * CLASSES * n * FLOAT32_BYTES
    return {"forward": 3 * tensor, "backward": 2 * tensor, "full": 3 * tensor}[mode]


PROVIDERS = ("released", "reference", "compile", "cpu", "triton")

CASES = declare_cases(
    op="cwd", case="b8_c19", providers=PROVIDERS, modes=("full", "forward"), xs=tuple(SIZES),
    x_name="N", build=build_logits, bytes_moved=bytes_moved,
)


@pytest.mark.parametrize("case", CASES)
def test_bench_cwd(benchmark, bench, case):
    bench.run(benchmark, case)
