"""benchmarks/step_fraction.py, the training-step share of the loss (issue 6), at tiny shapes.

It is meant for a GPU at 512x1024; these runs keep it working between GPU sessions.
"""

import json

import pytest

from benchmarks import step_fraction
from conftest import requires_cuda

TINY = ["--batch", "2", "--height", "64", "--width", "64", "--warmup", "0", "--repeats", "1"]


def _run(tmp_path, *args):
    out = tmp_path / "fraction.json"
    step_fraction.main([*TINY, *args, "--out", str(out)])
    return json.loads(out.read_text())


def test_cpu_run_writes_every_timing(tmp_path):
    result = _run(tmp_path, "--device", "cpu")
    assert set(result["ms"]) == {"loss_fused", "loss_released", "step_cwd", "step_cskd"}
    assert all(ms > 0 for ms in result["ms"].values())
    assert result["loss_share_of_step"] == result["ms"]["loss_fused"] / result["ms"]["step_cskd"]


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
