"""benchmarks/gpu_check.sh: its plans, as DRY_RUN=1 prints them (nothing is run), and its syntax."""

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
QUICK_LIMIT_S = 480  # 8 minutes on an H100, install included, in one short call


def _plan(**env):
    result = subprocess.run(["bash", str(SCRIPT), "/nonexistent/out"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DRY_RUN": "1", **env})
    assert result.returncode == 0, result.stderr
    steps = [re.match(r"step (\d+) (\S+) +(\d+) s", line) for line in result.stdout.splitlines()
             if line.startswith("step ")]
    assert all(steps), result.stdout
    total = int(re.search(r"^total (\d+) s$", result.stdout, re.M).group(1))
    return [(m.group(2), int(m.group(3))) for m in steps], total, result.stdout


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_the_default_plan_is_quick_and_fits_eight_minutes():
    steps, total, out = _plan()
    assert "plan quick" in out
    assert [name for name, _ in steps] == [
        "device", "install", "loss_tests", "loss_bench", "fraction_fp32", "fraction_bf16"]
    assert all(seconds > 0 for _, seconds in steps)
    assert total == sum(seconds for _, seconds in steps) <= QUICK_LIMIT_S
    assert "CSKD_SKIP_EXTENSION=1" in out  # the quick install builds no C++
    assert not Path("/nonexistent/out").exists()  # a dry run writes nothing


def test_full_lists_the_long_plan():
    steps, total, out = _plan(PLAN="full")
    assert [name for name, _ in steps] == ["device", "install", "tests", "profile", "fraction", "bench", "tune"]
    assert total > QUICK_LIMIT_S


@pytest.mark.parametrize("env, expected", [
    ({"PLAN": "bench"}, ["device", "install", "bench"]),
    ({"STEPS": "fraction tune", "SKIP_INSTALL": "1"}, ["device", "install", "fraction", "tune"]),
    ({"STEPS": "loss_bench"}, ["device", "install", "loss_bench"]),
])
def test_plans_by_name_and_steps(env, expected):
    steps, _, _ = _plan(**env)
    assert [name for name, _ in steps] == expected
    if env.get("SKIP_INSTALL") == "1":
        assert dict(steps)["install"] == 0


def test_budgets_follow_their_variables():
    steps, total, _ = _plan(LOSS_TESTS_TIMEOUT="30")
    assert dict(steps)["loss_tests"] == 30 and total == 480 - 120 + 30


def test_an_unknown_step_is_refused():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DRY_RUN": "1", "PLAN": "bogus"})
    assert result.returncode == 2 and "unknown step 'bogus'" in result.stderr
