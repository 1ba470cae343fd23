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
