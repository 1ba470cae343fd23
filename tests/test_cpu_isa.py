"""Every build of the C++ kernels, on one machine.

The extension compiles each kernel body three times (AVX-512, AVX2 + FMA, the
baseline ISA) and picks one at run time, so a CPU with AVX-512 never runs the
other two. CSKD_MAX_ISA caps that choice: here the op tests of the C++ backend
run again, in a child process, under each cap.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["baseline", "avx2", "avx512"]
# The tests of the ops with C++ kernels (the Triton cases are deselected: they do not depend on the cap).
OP_TESTS = ["test_cka.py", "test_cross_gram.py", "test_channel_attention.py", "test_channel_gram.py",
            "test_position_attention.py", "test_cell_projection.py", "test_cwd.py", "test_cskd_loss.py",
            "test_gemm.py"]


def _run(args, isa):
    env = dict(os.environ, CSKD_MAX_ISA=isa)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _kernel_isa(isa):
    result = _run(["-c", "from cskd_kernels import _C; print(_C.kernel_isa())"], isa)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_cap_lowers_the_instruction_set_and_never_raises_it():
    native = _kernel_isa("avx512")
    for isa in ORDER:
        expected = ORDER[min(ORDER.index(isa), ORDER.index(native))]
        assert _kernel_isa(isa) == expected, isa


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_op_tests_pass_under_the_cap(isa):
    if ORDER.index(_kernel_isa("avx512")) < ORDER.index(isa):
        pytest.skip(f"this CPU lacks {isa}")
    assert _kernel_isa(isa) == isa
    tests = [str(Path("tests") / name) for name in OP_TESTS]
    result = _run(["-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-k", "not triton"], isa)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_an_unknown_cap_is_refused_by_name():
    result = _run(["-c", "from cskd_kernels import _C; _C.kernel_isa()"], "avx1024")
    assert result.returncode != 0
    assert "CSKD_MAX_ISA must be baseline, avx2 or avx512, got 'avx1024'" in result.stderr
