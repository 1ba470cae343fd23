"""benchmarks/memory.py's command line: peak memory of benchmark cases, measured repeatedly."""

import os
import re
import subprocess
import sys

import pytest

from conftest import requires_extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.memory", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@requires_extension
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_each_matching_case_is_measured_the_asked_number_of_times():
    run = _run("demo_6x6", "--repeats", "2", "--providers", "cpu")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cskd_loss-demo_6x6_grid5x5-full-N36-cpu-cpu: ")
    peaks = [float(value) for value in re.findall(r"(\d+\.\d+)", lines[0].split(": ", 1)[1])]
    assert len(peaks) == 2 and all(peak > 0.1 for peak in peaks)  # the loss allocates its maps: never nothing


@pytest.mark.parametrize("args,message", [
    (["no_such_case"], "no CPU case of benchmarks.test_bench_cskd_loss with providers cpu,released has 'no_such_case'"),
    (["demo_6x6", "--repeats", "0"], "--repeats must be at least 1, got 0"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    run = _run(*args)
    assert run.returncode == 2
    assert message in run.stderr.strip().splitlines()[-1]
    assert run.stdout == ""
