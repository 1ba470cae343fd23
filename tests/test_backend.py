"""Backend dispatch (SPEC section 6): names, CSKD_BACKEND, the auto rules, clear errors."""

import warnings

import pytest
import torch

import cskd_kernels
from cskd_kernels import backend as backend_module
from cskd_kernels.backend import BackendError, resolve_backend
from conftest import HAS_EXTENSION, requires_extension


def test_unknown_backend_is_an_error():
    with pytest.raises(BackendError, match="'fastest' is not one of"):
        resolve_backend("fastest", torch.randn(3))


def test_environment_variable_sets_the_default(monkeypatch):
    x = torch.randn(4, 5)
    monkeypatch.setenv("CSKD_BACKEND", "reference")
    assert resolve_backend(None, x) == "reference"
    monkeypatch.setenv("CSKD_BACKEND", "warp-speed")
    with pytest.raises(BackendError, match="CSKD_BACKEND='warp-speed'"):
        resolve_backend(None, x)


def test_explicit_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("CSKD_BACKEND", "cpu")
    assert resolve_backend("reference", torch.randn(4, 5)) == "reference"


@requires_extension
def test_auto_picks_cpu_for_cpu_tensors_when_built():
    assert resolve_backend("auto", torch.randn(4, 5)) == "cpu"
    assert resolve_backend("auto", torch.randn(4, 5, dtype=torch.float64)) == "cpu"


def test_auto_runs_unsupported_cpu_dtypes_on_the_reference():
    assert resolve_backend("auto", torch.randn(4, 5, dtype=torch.float16)) == "reference"


def test_auto_without_extension_warns_once_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(backend_module, "extension", lambda: None)
    monkeypatch.setattr(backend_module, "extension_error", lambda: ImportError("not built"))
    monkeypatch.setattr(backend_module, "_warned_no_extension", False)
    x, y = torch.randn(6, 10), torch.randn(6, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cskd_kernels.linear_cka(x, y, backend="auto")
        second = cskd_kernels.linear_cka(x, y, backend="auto")
    messages = [str(w.message) for w in caught if "extension is not built" in str(w.message)]
    assert len(messages) == 1, messages
    torch.testing.assert_close(first, cskd_kernels.reference.linear_cka(x, y))
    torch.testing.assert_close(first, second)
    with pytest.raises(BackendError, match="needs the C\\+\\+ extension"):
        resolve_backend("cpu", x)


def test_cpu_backend_rejects_unsupported_dtypes():
    if not HAS_EXTENSION:
        pytest.skip("the C++ extension is not built")
    with pytest.raises(BackendError, match="backend='cpu' does not support dtype torch.float16"):
        resolve_backend("cpu", torch.randn(3, dtype=torch.float16))


def test_cpu_backend_rejects_other_devices():
    with pytest.raises(BackendError, match="CPU tensors only"):
        resolve_backend("cpu", torch.randn(3, device="meta"))


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    if not backend_module.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.randn(3))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.randn(3)) == "triton"


def test_triton_rejects_float64():
    if not backend_module.triton_available():
        pytest.skip("triton is not installed")
    with pytest.raises(BackendError, match="does not support dtype torch.float64"):
        resolve_backend("triton", torch.randn(3, dtype=torch.float64))


def test_reference_runs_anything():
    assert resolve_backend("reference", torch.randn(3, dtype=torch.float16)) == "reference"
    assert resolve_backend("reference", torch.randn(3, device="meta")) == "reference"


def test_package_imports_without_triton_or_extension_loaded():
    """Importing the package must not import triton (it is loaded on first use only)."""
    import subprocess
    import sys

    code = "import sys, cskd_kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_finds_each_ops_functions_by_name():
    """kernels(op, backend).<name>: the extension's <op>_<name>, the Triton module's <op>_<name> or <name>."""
    if HAS_EXTENSION:
        assert backend_module.kernels("cwd", "cpu").forward.__wrapped__ is backend_module.extension().cwd_forward
    if backend_module.triton_available():
        cka_triton = backend_module.triton_kernels("cka")
        assert backend_module.kernels("cka", "triton").centered_gram.__wrapped__ is cka_triton.centered_gram
        cwd_triton = backend_module.triton_kernels("cwd")
        assert backend_module.kernels("cwd", "triton").forward.__wrapped__ is cwd_triton.cwd_forward


def test_kernels_reject_unknown_names_and_backends():
    with pytest.raises(BackendError, match="no kernels for backend='reference'"):
        backend_module.kernels("cwd", "reference")
    if HAS_EXTENSION:
        with pytest.raises(AttributeError, match="no kernel 'sideways' for op 'cwd'"):
            backend_module.kernels("cwd", "cpu").sideways


@requires_extension
def test_kernels_run_with_autocast_off():
    """Under autocast the C++ CAM kernel got bfloat16 from its own at::bmm and raised; now it runs in float32."""
    x, gamma = torch.randn(2, 5, 7), torch.tensor([0.5])
    expected, _ = backend_module.kernels("channel_attention", "cpu").forward(x, gamma, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attention = backend_module.kernels("channel_attention", "cpu").forward(x, gamma, 1.0)
    assert out.dtype == attention.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.skipif(not backend_module.triton_available(), reason="needs triton")
def test_triton_float32_dot_precision_follows_torch():
    from cskd_kernels.triton.common import dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "tf32x3"
        for setting in ("high", "medium"):
            torch.set_float32_matmul_precision(setting)
            assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == "tf32"  # 16-bit operands ignore it
    finally:
        torch.set_float32_matmul_precision(before)
