"""centered_cross_grams, the per-cell Grams of CSKDLoss's CKAs: the in-place kernels against the stacked path.

The three calls of one CSKDLoss step at the released configuration (B = 8,
64 x 128 maps, two maps a call: the attention output and the features):
the student's position branch (128 channels, grid 5x5, with gradients), the
teacher's (256 channels, grid 5x5) and the teacher's channel branch (256
channels, one global cell). "reference" is the stacked path (channel blocks
cut into padded cells, then the CKA Gram kernel), "cpu" / "triton" read the
maps in place. The floor is memory traffic: the forward reads both maps once,
the backward reads them again and writes their gradients; or the Gram's
FLOPs (16 rows: 16 x 17 / 2 dot products per feature), whichever is larger.
"""

import pytest
import torch

from benchmarks.harness import Workload, declare_cases
from cskd_kernels.ops.cross_gram import centered_cross_grams

BATCH, MAPS, HEIGHT, WIDTH = 8, 2, 64, 128
FLOAT32_BYTES = 4
ROWS = BATCH * MAPS


def _workload(provider, channels, device, *, grid, with_grad):
    parts = [torch.randn(BATCH, channels, HEIGHT, WIDTH, device=device, requires_grad=with_grad)
             for _ in range(MAPS)]
    weights = torch.randn(1, ROWS, ROWS, dtype=torch.float64, device=device)

    def forward():
        # A scalar of the Grams, as the CKA makes of them (the backward gets a dense gradient).
        return (centered_cross_grams(*parts, grid=grid, backend=provider) * weights).sum()

    return Workload(forward=forward, grad_inputs=tuple(parts) if with_grad else ())


CASES_BY_NAME = {
    # name: (channels, grid, with gradients)
    "student_pam_grid5x5": (128, (5, 5), True),
    "teacher_pam_grid5x5": (256, (5, 5), False),
    "teacher_cam_global": (256, None, False),
}


def _build(name):
    channels, grid, with_grad = CASES_BY_NAME[name]
    return lambda provider, features, device: _workload(provider, channels, device, grid=grid, with_grad=with_grad)


def _floors(name):
    channels = CASES_BY_NAME[name][0]

    def bytes_moved(features, mode):
        maps = MAPS * BATCH * channels * features * FLOAT32_BYTES
        return {"forward": maps, "backward": 2 * maps, "full": 3 * maps}[mode]

    def flops(features, mode):
        forward = 2 * ROWS * (ROWS + 1) // 2 * channels * features
        backward = 2 * ROWS * (ROWS - 1) * channels * features
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]

    return {"bytes_moved": bytes_moved, "flops": flops}


PROVIDERS = ("reference", "cpu", "triton")


def _cases(name):
    modes = ("full", "forward") if CASES_BY_NAME[name][2] else ("forward",)
    return declare_cases(op="cross_gram", case=name, providers=PROVIDERS, modes=modes, xs=(HEIGHT * WIDTH,),
                         x_name="N", build=_build(name), **_floors(name))


CASES = [case for name in CASES_BY_NAME for case in _cases(name)]


@pytest.mark.parametrize("case", CASES)
def test_bench_cross_gram(benchmark, bench, case):
    bench.run(benchmark, case)
