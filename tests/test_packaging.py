"""Packaging habits: the commands without the train extra, a bad CSKD_BACKEND at import, the licence."""

import os
import subprocess
import sys

import train_support

HIDE_TORCHMETRICS = (
    "import sys, importlib.abc\n"
    "class Hide(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name == 'torchmetrics' or name.startswith('torchmetrics.'):\n"
    "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
    "sys.meta_path.insert(0, Hide())\n"
    "from cskd_train import commands\n"
    "sys.argv = ['cskd-train', '--help']\n"
    "sys.exit(commands.train())\n"
)


def test_commands_without_the_train_extra_say_which_extra_in_one_line():
    result = subprocess.run([sys.executable, "-c", HIDE_TORCHMETRICS], capture_output=True, text=True,
                            env=train_support.subprocess_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("cskd-train: error: needs the train extra (pip install 'cskd-kernels[train]'): "
                                     "no module named 'torchmetrics'")


def test_commands_run_through_the_lazy_launcher():
    code = "import sys; from cskd_train import commands; sys.argv = ['cskd-eval', '--help']; commands.evaluate()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=train_support.subprocess_env(), timeout=120)
    assert result.returncode == 0 and "--checkpoint" in result.stdout and "(default:" in result.stdout


def test_bad_backend_variable_is_refused_at_import():
    env = dict(train_support.subprocess_env(), CSKD_BACKEND="gpu")
    result = subprocess.run([sys.executable, "-c", "import cskd_kernels"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "cskd_kernels.backend.BackendError: CSKD_BACKEND='gpu' is not one of ('auto', 'triton', 'cpu', 'reference')")


def test_licence_file_is_the_declared_one():
    with open(os.path.join(train_support.REPO, "LICENSE"), encoding="utf-8") as handle:
        assert handle.readline().strip() == "MIT License"
    with open(os.path.join(train_support.REPO, "setup.py"), encoding="utf-8") as handle:
        assert 'license="MIT"' in handle.read()


def test_an_extension_built_against_another_torch_is_named_in_the_warning(monkeypatch, tmp_path):
    import sys
    import types

    import pytest

    from cskd_kernels import backend

    monkeypatch.setitem(sys.modules, "cskd_kernels._build_info", types.SimpleNamespace(TORCH_VERSION="1.13.0"))
    backend._load_extension.cache_clear()
    monkeypatch.setattr(backend, "_warned_no_extension", False)
    try:
        assert backend.extension() is None
        with pytest.warns(RuntimeWarning, match=r"built against torch 1\.13\.0, but torch .* is installed.*"
                                                r"pip install --no-build-isolation -e \."):
            assert backend.resolve_backend(None, __import__("torch").zeros(1)) == "reference"
    finally:
        monkeypatch.undo()
        backend._load_extension.cache_clear()
    assert backend.extension() is not None or os.environ.get("CSKD_SKIP_EXTENSION") == "1"


def test_the_requirement_names_the_torch_the_extension_was_built_against():
    import importlib.metadata

    import pytest
    import torch

    from cskd_kernels import backend

    if backend.extension() is None:
        pytest.skip("the C++ extension is not built (CSKD_SKIP_EXTENSION=1): the requirement is torch>=2.4")
    built = torch.__version__.split("+")[0]
    major, minor = built.split(".")[:2]
    requirement = next(r for r in importlib.metadata.requires("cskd-kernels") if r.startswith("torch") and ";" not in r)
    assert sorted(requirement.removeprefix("torch").split(",")) == sorted([f">={built}", f"<{major}.{int(minor) + 1}"])


def test_the_extension_is_lean():
    """Built without debug information: under 2 MB (it was 50 MB with it)."""
    import pytest

    from cskd_kernels import backend

    if backend.extension() is None:
        pytest.skip("the C++ extension is not built (CSKD_SKIP_EXTENSION=1)")
    assert os.path.getsize(backend.extension().__file__) < 2 * 2**20
