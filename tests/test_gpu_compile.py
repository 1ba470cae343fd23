"""The GPU path's Triton kernels compile for an H100 (sm_90) and an A100 (sm_80), checked without a GPU.

The interpreter runs code the compiler rejects and has no registers or
shared memory to run out of; Triton's compiler and ptxas run on any machine.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cskd_kernels
from cskd_kernels.backend import triton_interpreting
from test_compile import _cskd_run

ROOT = Path(__file__).resolve().parents[1]
# Every kernel one CSKDLoss forward + backward launches (grid mode, float32).
CSKD_LOSS_KERNELS = {
    "channel_attention:_nt_product_kernel", "channel_attention:_softmax_rows_kernel",
    "channel_attention:_attend_residual_kernel", "channel_attention:_softmax_backward_rows_kernel",
    "channel_attention:_input_grad_kernel", "cell_projection:_forward_kernel", "cell_projection:_input_grad_kernel",
    "position_attention:_forward_kernel", "position_attention:_dv_kernel", "position_attention:_dkdq_kernel",
    "cell_cross_gram:_forward_kernel", "cell_cross_gram:_backward_kernel",
    "cka:_centered_gram_few_samples_kernel", "cka:_centered_gram_backward_few_samples_kernel",
}


def _has_nvidia_compiler():
    return importlib.util.find_spec("triton") is not None and \
        importlib.util.find_spec("triton.backends.nvidia.compiler") is not None


needs_compiler = pytest.mark.skipif(not _has_nvidia_compiler(), reason="needs Triton with its NVIDIA backend (ptxas)")


def _compiled_env():
    """The child compiles kernels: Triton must not be in interpreter mode there (conftest sets it here)."""
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_compiled_env(), capture_output=True, text=True,
                          timeout=1200)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_compile") / "launches.json"
    done = _run("-m", "benchmarks.gpu_compile", "--out", str(out))
    return done, json.loads(out.read_text()) if out.exists() else None


@needs_compiler
def test_every_launch_compiles_for_sm90_without_spills_and_fits_sm90_and_sm80(compiled):
    done, results = compiled
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    assert results and all("error" not in r and r["registers"] <= 255 for r in results)
    assert {r["arch"] for r in results} == {90, 80}
    assert all(r["spilled_bytes"] == 0 for r in results if r["arch"] == 90)
    shared_limit = {90: 232448, 80: 166912}
    assert all(max(r["shared_bytes"], r["inductor_shared_bytes"]) <= shared_limit[r["arch"]] for r in results)


@needs_compiler
def test_the_plan_covers_every_kernel_of_the_loss_and_every_workload(compiled):
    _, results = compiled
    results = [r for r in results if r["arch"] == 90]
    released = {r["kernel"].split(".")[-1] for r in results if "cskd grid float32" in r["workloads"]}
    assert released == CSKD_LOSS_KERNELS
    workloads = {w for r in results for w in r["workloads"]}
    assert {"cskd grid bfloat16", "cskd global float32", "cwd 512x1024 float32", "cka 64 samples float32",
            "pam d=128 float32", "cross-Grams of 128 rows"} <= workloads
    # GPU launch sizes, not the interpreter's: the position attention's forward runs 8 warps on a GPU.
    forward = [r for r in results if r["kernel"].endswith("position_attention:_forward_kernel")]
    assert forward and all(r["constexprs"].get("num_warps") == 8 for r in forward)


@needs_compiler
def test_a_launch_that_does_not_fit_sm90_is_reported(compiled, tmp_path):
    """The position attention's dK/dQ kernel with the forward's tiles and Triton's 3 stages (the old default)."""
    _, results = compiled
    launch = next(r for r in results if r["kernel"].endswith("_dkdq_kernel") and "cskd grid float32" in r["workloads"]
                  and r["arch"] == 90)
    launch["kwargs"] = {**{k: v for k, v in launch["kwargs"].items() if not k.startswith("num_")},
                        "BLOCK_M": {"value": 64}, "BLOCK_N": {"value": 64}, "BLOCK_CV": {"value": 128}}
    path = tmp_path / "launch.json"
    path.write_text(json.dumps([launch]))
    done = _run("-c", "import json, sys; from benchmarks import gpu_compile as g; "
                      "print(json.dumps(g.compile_all(json.load(open(sys.argv[1])), 90)))", str(path))
    assert done.returncode == 0, done.stderr[-4000:]
    (result,) = json.loads(done.stdout.splitlines()[-1])
    assert "bytes of shared memory, sm_90 has 232448" in result["error"] and result["spilled_bytes"] > 0


@pytest.mark.skipif(not triton_interpreting(), reason="runs the GPU launch sizes through Triton's interpreter")
@pytest.mark.parametrize("grid", [(5, 5), None], ids=["grid", "global"])
def test_gpu_launch_sizes_give_the_interpreter_sizes_results(monkeypatch, grid):
    """The GPU's tiles, warps and splits (the dK/dQ kernel's own tiles included) compute the same loss and gradients.

    CI runs the kernels with the interpreter's launch sizes; these are what a GPU runs.
    """
    from benchmarks.gpu_compile import use_gpu_launch_sizes

    loss = cskd_kernels.CSKDLoss(16, 32, grid=grid, projection="fixed", backend="triton")
    with torch.no_grad():
        loss.gamma_cam.fill_(0.3)
        loss.gamma_pam.fill_(0.7)
    feat_s, feat_t = torch.randn(3, 16, 9, 14), torch.randn(3, 32, 9, 14)
    want_outputs, want_grads = _cskd_run(loss, feat_s, feat_t)
    use_gpu_launch_sizes(4, monkeypatch.setattr)
    got_outputs, got_grads = _cskd_run(loss, feat_s, feat_t)
    for g, w in zip([*got_outputs, *got_grads], [*want_outputs, *want_grads]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_blocks_per_sm_is_limited_by_registers_shared_memory_and_warps():
    from benchmarks.gpu_compile import blocks_per_sm

    assert blocks_per_sm(255, 4, 24 * 1024, 90) == 2  # 256 registers x 128 threads: half the register file
    assert blocks_per_sm(241, 8, 68 * 1024, 90) == 1  # 248 x 256 threads
    assert blocks_per_sm(29, 4, 0, 90) == 16  # 64 warps an SM
    assert blocks_per_sm(64, 4, 100 * 1024, 90) == 2 and blocks_per_sm(64, 4, 100 * 1024, 80) == 1  # shared memory
