"""The whole CSKD loss, forward + backward, at the released configuration.

Student DeepLabV3-R18 features (8, 128, 64, 128) requiring grad, teacher R101
features (8, 256, 64, 128), temperature 2, lambdas 0.3 / 0.8, projection
"resample" (fresh projections per call, per side and per cell, as released).
Providers: the released formulation (per-cell Python loop, new Conv2d layers
per cell, the four-Gram CKA), torch.compile of the reference composition
(cskd_kernels.reference.cskd_loss, SPEC section 5 cell by cell, with the same
per-cell projections drawn fresh every call), CSKDLoss on the reference ops,
CSKDLoss on the C++ and Triton kernels, and (GPU only) "triton-graphs":
CSKDLoss on the Triton kernels under torch.compile(mode="reduce-overhead"),
which replays the whole loss as CUDA graphs (the eager loss is bound by the
host's launches on a GPU; this measures what graphs recover). Global mode
(grid=None) runs only on the fused backends: the released formulation and
the reference need an 8192 x 8192 map per image. The floor is FLOPs (counted below) / float32 matmul rate.
"""

import pytest
import torch

from benchmarks.harness import Workload, declare_cases
from cskd_train.objective import compile_loss_module
from cskd_kernels import CSKDLoss, reference, released
from cskd_kernels.modules.cskd_loss import draw_projections

B, CS, CT, H, W = 8, 128, 256, 64, 128


def _features(device):
    feat_s = torch.randn(B, CS, H, W, device=device, requires_grad=True)
    feat_t = torch.randn(B, CT, H, W, device=device)
    return feat_s, feat_t


def _compiled_reference(grid):
    def loss(feat_s, feat_t, gamma_cam, gamma_pam, weights_s, weights_t):
        return reference.cskd_loss(feat_s, feat_t, gamma_cam, gamma_pam, lambda i: tuple(w[i] for w in weights_s),
                                   lambda i: tuple(w[i] for w in weights_t), grid=grid)[0]
    return torch.compile(loss, dynamic=False)


def _workload(provider, grid, device):
    feat_s, feat_t = _features(device)
    if provider == "compile":
        gammas = torch.full((2,), 0.1, device=device, requires_grad=True)
        compiled, cells = _compiled_reference(grid), 25 if grid else 1
        def forward():
            # "resample": fresh projections every call, per side and per cell, drawn outside the graph.
            weights_s = draw_projections(CS, 8, cells, device=device)
            weights_t = draw_projections(CT, 8, cells, device=device)
            return compiled(feat_s, feat_t, gammas[:1], gammas[1:], weights_s, weights_t)
        return Workload(forward=forward, grad_inputs=(feat_s, gammas))
    if provider == "released":
        gammas = torch.full((2,), 0.1, device=device, requires_grad=True)
        def forward():
            return released.cskd_loss(feat_s, feat_t, gammas[:1], gammas[1:], grid=grid)
        return Workload(forward=forward, grad_inputs=(feat_s, gammas))
    loss = CSKDLoss(CS, CT, grid=grid, backend=provider.removesuffix("-graphs")).to(device)
    with torch.no_grad():
        loss.gamma_cam.fill_(0.1)
        loss.gamma_pam.fill_(0.1)
    graphs = provider.endswith("-graphs")
    if graphs:
        compile_loss_module(loss, device)  # cskd-train's policy: CUDA graphs on a GPU

    def forward():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # one training step per call, as cskd-train marks them
        return loss(feat_s, feat_t).loss
    return Workload(forward=forward, grad_inputs=(feat_s, loss.gamma_cam, loss.gamma_pam))


def build_grid(provider, x, device):
    return _workload(provider, (5, 5), device)


def build_global(provider, x, device):
    return _workload(provider, None, device)


def _attention_flops(cells, positions, d, cv, with_backward):
    # Forward 2 N^2 (d + Cv); forward + backward with recomputation 2 N^2 (4d + 3Cv), per image and cell.
    per_cell = 2 * positions**2 * ((4 * d + 3 * cv) if with_backward else (d + cv))
    return B * cells * per_cell


def flops_for(grid):
    n = H * W
    cells, positions = (25, (H // 5 + 1) * (W // 5 + 1)) if grid else (1, n)

    def flops(x, mode):
        # Channel attention: forward E and A X; backward of the student three products, the teacher one.
        cam_forward = 4 * n * (CS**2 + CT**2) * B
        cam_backward = 2 * n * (3 * CS**2 + CT**2) * B
        # 1x1 projections C -> C/8, C/8, C; the student's input gradient costs the same again.
        projection_forward = 2 * n * B * 1.25 * (CS**2 + CT**2)
        projection_backward = 2 * n * B * 1.25 * CS**2
        attention_forward = _attention_flops(cells, positions, CS // 8, CS, False) + _attention_flops(
            cells, positions, CT // 8, CT, False)
        attention_full = _attention_flops(cells, positions, CS // 8, CS, True) + _attention_flops(
            cells, positions, CT // 8, CT, False)
        forward = cam_forward + projection_forward + attention_forward
        return {"forward": forward,
                "full": cam_forward + cam_backward + projection_forward + projection_backward + attention_full}[mode]

    return flops


CASES = declare_cases(
    op="cskd_loss", case="released_config_grid5x5",
    providers=("released", "reference", "compile", "cpu", "triton", "triton-graphs"),
    modes=("full",), xs=(H * W,), x_name="N", build=build_grid, flops=flops_for((5, 5)),
) + declare_cases(
    op="cskd_loss", case="released_config_global", providers=("cpu", "triton", "triton-graphs"),
    modes=("full",), xs=(H * W,), x_name="N", build=build_global, flops=flops_for(None),
)


@pytest.mark.parametrize("case", CASES)
def test_bench_cskd_loss(benchmark, bench, case):
    bench.run(benchmark, case)
