"""Every build of the C++ kernels, on one machine.

The extension compiles each kernel body three times (AVX-512, AVX2 + FMA, the
baseline ISA) and picks one at run time, so a CPU with AVX-512 never runs the
other two. CSKD_MAX_ISA caps that choice: here the op tests of the C++ backend
run again, in a child process, under each cap.
"""

import functools
import os
import shutil
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
            "test_gemm.py", "test_nonfinite.py", "test_temperature.py", "test_uniform.py",
            "test_projected_position_attention.py"]


def _run(args, isa):
    env = dict(os.environ, CSKD_MAX_ISA=isa)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@functools.cache  # one child process per cap, however many tests ask
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


def _outlined_body_parts(library):
    """Functions of the library that are pieces of a kernel body compiled out of line."""
    symbols = subprocess.run([shutil.which("nm"), "-C", library], capture_output=True, text=True, check=True).stdout
    return [line for line in symbols.splitlines() if "_item_body<" in line or "_tiles_body<" in line]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_kernel_bodies_are_compiled_into_their_entry_points():
    """A body is compiled into each of its AVX-512, AVX2 and baseline entry points (always inline).

    GCC compiles a lambda it does not inline (or a template that takes one) as a function of its
    own, without the entry point's target attribute, i.e. as baseline x86-64 code: the cross-Gram
    kernels' Gram loops ran so, as SSE2 without FMA, until their lambdas were forced inline.
    """
    from cskd_kernels import _C

    assert _outlined_body_parts(_C.__file__) == []
