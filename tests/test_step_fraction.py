"""benchmarks/step_fraction.py, the training-step share of the loss (issue 6), at tiny shapes.

It is meant for a GPU at 512x1024; these runs keep it working between GPU sessions.
"""

import json

import pytest
import torch

from benchmarks import step_fraction
from conftest import requires_cuda

# Batch 3: the CSKD loss's CKAs need at least 3 images (CSKDLoss refuses fewer).
TINY = ["--batch", "3", "--height", "64", "--width", "64", "--warmup", "0", "--repeats", "1"]


def _run(tmp_path, *args):
    out = tmp_path / "fraction.json"
    step_fraction.main([*TINY, *args, "--out", str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_run_writes_every_timing(tmp_path, precision):
    result = _run(tmp_path, "--device", "cpu", "--precision", precision, "--warmup", "1")
    assert result["precision"] == precision
    assert set(result["ms"]) == {"loss_fused", "loss_released", "step_cwd", "step_cskd"}
    assert all(ms > 0 for ms in result["ms"].values())
    assert result["loss_share_of_step"] == result["ms"]["loss_fused"] / result["ms"]["step_cskd"]
    assert 0 < result["loss_share_in_step"] < 1  # the loss timed inside the step, as cskd-train logs it


def test_bf16_runs_the_step_and_the_loss_under_autocast(tmp_path, monkeypatch):
    """--precision bf16: the CSKD loss gets bfloat16 features in the step and alone, as in cskd-train."""
    import cskd_kernels

    seen = []
    original = cskd_kernels.CSKDLoss.forward

    def spy(self, feat_s, feat_t):
        seen.append((feat_s.dtype, feat_t.dtype, torch.is_autocast_enabled("cpu")))
        return original(self, feat_s, feat_t)

    monkeypatch.setattr(cskd_kernels.CSKDLoss, "forward", spy)
    _run(tmp_path, "--device", "cpu", "--precision", "bf16")
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, True)}


@pytest.mark.compile
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_graphs(tmp_path, device):
    """--graphs: the loss compiled (CUDA graphs on CUDA), alone and in the step, next to the eager numbers."""
    result = _run(tmp_path, "--device", device, "--graphs")
    assert "graphs_error" not in result
    assert {"loss_fused_graphs", "step_cskd_graphs"} <= set(result["ms"])
    assert result["loss_share_of_step_graphs"] == result["ms"]["loss_fused_graphs"] / result["ms"]["step_cskd_graphs"]


def test_a_compile_failure_keeps_the_eager_numbers(tmp_path, monkeypatch):
    from cskd_train.objective import Objective

    def fail(self, device):
        raise RuntimeError("inductor says no")

    monkeypatch.setattr(Objective, "compile_cskd", fail)
    out = tmp_path / "fraction.json"
    assert step_fraction.main([*TINY, "--device", "cpu", "--graphs", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["graphs_error"] == "RuntimeError: inductor says no"
    assert {"loss_fused", "loss_released", "step_cwd", "step_cskd"} <= set(result["ms"])
    assert "loss_share_of_step_graphs" not in result


def test_a_run_stopped_midway_keeps_what_it_measured(tmp_path, monkeypatch):
    """Each timing is written to --out as it comes (gpu_check.sh's time budgets may stop a run)."""
    def stop(distill, args, device, graphs=False):
        if distill == "cskd":
            raise KeyboardInterrupt  # as a timeout's signal would stop it
        return original(distill, args, device, graphs)

    original = step_fraction.step_ms_and_share
    monkeypatch.setattr(step_fraction, "step_ms_and_share", stop)
    out = tmp_path / "fraction.json"
    with pytest.raises(KeyboardInterrupt):
        step_fraction.main([*TINY, "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["partial"] is True
    assert set(result["ms"]) == {"loss_fused", "loss_released", "step_cwd"}
