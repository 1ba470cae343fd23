"""benchmarks.profile_loss: the profile table, the --median-of timing, and one line for bad input."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.profile_loss", "--device", "cpu", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_median_of_prints_one_timing_line():
    done = run("--shape", "4,8,16,6,6", "--grid", "2x2", "--median-of", "3")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.endswith("thread(s)") and "median of 3 CSKDLoss forward + backward steps" in line
    assert float(line.split(" ms:")[0]) > 0


def test_profile_table_by_default():
    done = run("--shape", "4,8,16,6,6", "--grid", "2x2", "--rows", "5")
    assert done.returncode == 0, done.stderr
    assert "1 step(s):" in done.stdout and "Self CPU" in done.stdout


@pytest.mark.parametrize("option", ["--median-of", "--steps"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_count_that_is_not_positive_is_refused_in_one_line(option, value):
    done = run(option, value)
    assert done.returncode == 2
    assert f"{value!r} is not a positive integer" in done.stderr.strip().splitlines()[-1]


X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
NEEDS_FLUSH = pytest.mark.skipif(not X86, reason="torch.set_flush_denormal works on x86 only")


@pytest.mark.parametrize("extra", [["--released"], pytest.param(["--released", "--flush-denormal"], marks=NEEDS_FLUSH),
                                   pytest.param(["--flush-denormal"], marks=NEEDS_FLUSH)])
def test_the_released_formulation_and_flushed_denormals_are_timed(extra):
    done = run("--shape", "4,8,16,6,6", "--grid", "2x2", "--median-of", "2", *extra)
    assert done.returncode == 0, done.stderr
    name = "released formulation" if "--released" in extra else "CSKDLoss"
    assert f"median of 2 {name} forward + backward steps" in done.stdout
