"""cskd-demo: the three-model table, and the CSKD loss timed against the real released formulation."""

import argparse
import json
import math
import re

import pytest
import torch

import train_support  # noqa: F401
from cskd_kernels import released
from cskd_train import demo


@pytest.fixture
def restore_threads():
    # demo.main sets the process-wide thread count; later tests in this process must not inherit it.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_released_timing_runs_the_released_cskd_loss(monkeypatch):
    calls = []
    original = released.cskd_loss

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(released, "cskd_loss", spy)
    args = argparse.Namespace(timing_shapes=["demo"], image_size=40, batch_size=3, seed=0)
    (row,) = demo.distillation_timing(args, 128, 128)
    _, warmup, repeats = demo.TIMING_SHAPES["demo"]
    # Every warm-up and timed released step went through cskd_kernels.released.cskd_loss.
    assert calls == [(3, 128, 5, 5)] * (warmup + repeats)
    for key in ("fused_ms", "released_ms"):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0


def test_released_wrapper_is_the_released_loss_with_its_gammas():
    feat_s, feat_t = torch.randn(4, 16, 10, 10), torch.randn(4, 24, 10, 10)
    wrapper = demo.ReleasedCSKDLoss()
    # The projections are drawn afresh on every call (as released): same seed, same draws.
    torch.manual_seed(3)
    ours = wrapper(feat_s, feat_t)
    torch.manual_seed(3)
    direct = released.cskd_loss(feat_s, feat_t, torch.tensor([demo.GAMMA]), torch.tensor([demo.GAMMA]))
    torch.testing.assert_close(ours, direct)
    ours.backward()
    assert wrapper.gamma_cam.grad is not None and wrapper.gamma_pam.grad is not None


def test_step_shares():
    timing = [{"name": "demo", "fused_ms": 10.0, "released_ms": 30.0}]
    shares = demo.step_shares(timing, 0.090)
    assert shares["rest_of_step_ms"] == pytest.approx(90.0)
    assert shares["fused_share"] == pytest.approx(0.1)
    assert shares["released_share"] == pytest.approx(0.25)
    assert demo.step_shares([{"name": "cityscapes", "fused_ms": 1.0, "released_ms": 2.0}], 0.1) is None


def test_demo_prints_three_mious_and_fused_vs_released(tmp_path, capsys, restore_threads):
    out = tmp_path / "demo"
    assert demo.main([
        "--output-dir", str(out), "--teacher-iterations", "2", "--student-iterations", "1",
        "--batch-size", "3", "--image-size", "40", "--train-images", "6", "--val-images", "2",
        "--timing-shapes", "demo", "--no-progress",
    ]) == 0
    printed = capsys.readouterr().out
    for label in ("teacher deeplabv3_resnet18", "baseline student (CE) deeplabv3_mobilenetv2",
                  "CSKD student deeplabv3_mobilenetv2"):
        assert re.search(re.escape(label) + r" +[01]\.\d{4} ", printed), label
    assert re.search(r"ms fused, +[0-9.]+ ms released \([0-9.]+x\)", printed)
    assert re.search(r"fused [0-9.]+%, released [0-9.]+%", printed)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"teacher", "baseline", "cskd"}
    (row,) = saved["loss_timing"]
    assert row["released_ms"] > 0 and row["fused_ms"] > 0
    assert 0 < saved["step_shares"]["fused_share"] < 1 and 0 < saved["step_shares"]["released_share"] < 1
    # The CSKD student really distilled: its log has the CSKD terms, the baseline's has none.
    cskd_rows = [json.loads(line) for line in (out / "cskd" / "metrics.jsonl").read_text().splitlines()]
    baseline_rows = [json.loads(line) for line in (out / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert any("cam" in r and "pam" in r for r in cskd_rows)
    assert not any("cam" in r or "cwd" in r for r in baseline_rows)


def test_bad_thread_count_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--threads", "0"])
    assert exit_info.value.code == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_readme_first_command_is_the_demo_and_second_is_what_ci_runs():
    root = train_support.REPO
    with open(f"{root}/README.md", encoding="utf-8") as handle:
        commands = re.findall(r"```bash\n(.*?)\n```", handle.read(), flags=re.S)
    with open(f"{root}/.ci/run", encoding="utf-8") as handle:
        ci = [line for line in handle.read().splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands[0].endswith("&& cskd-demo")
    assert commands[1] == ci[-1]
