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


def test_graphs_need_cuda(capsys):
    with pytest.raises(SystemExit):
        step_fraction.main([*TINY, "--device", "cpu", "--graphs"])
    assert "--graphs replays CUDA graphs: it needs --device cuda" in capsys.readouterr().err


@requires_cuda
def test_graphs_on_cuda(tmp_path):
    result = _run(tmp_path, "--device", "cuda", "--graphs")
    assert {"loss_fused_graphs", "step_cskd_graphs"} <= set(result["ms"])
    assert 0 < result["loss_share_of_step_graphs"] < 1
