"""The scripts in examples/ run, at tiny sizes, on random data (nothing downloaded).

They need the ``examples`` extra (segmentation-models-pytorch, lightning), which CI installs.
"""

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

import train_support

EXAMPLES = os.path.join(train_support.REPO, "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_distilled(losses, steps):
    assert len(losses) == steps
    for row in losses:
        assert all(math.isfinite(value) for value in row.values()), row
        # Over 3 samples the CKA terms are not constant: a zero would mean the CSKD term did nothing.
        assert row["cam"] > 0 and row["pam"] > 0, row


def test_plain_pytorch_with_torchvision_models():
    pytest.importorskip("torchvision")
    losses = load("torchvision_deeplab").main(["--steps", "2", "--batch", "3", "--size", "96"])
    assert_distilled(losses, 2)


def test_segmentation_models_pytorch():
    pytest.importorskip("segmentation_models_pytorch")
    losses = load("smp_deeplabv3plus").main(["--steps", "2", "--batch", "3", "--size", "64"])
    assert_distilled(losses, 2)


def test_lightning_fast_dev_run_trains_the_loss_parameters():
    pytest.importorskip("lightning")
    module, trainer = load("lightning_module").main(["--fast-dev-run", "2", "--batch", "3", "--size", "96"])
    assert trainer.global_step == 2
    # The gammas start at 0: they moved, so the optimiser holds the loss module's parameters.
    assert module.distill.gamma_cam.item() != 0 and module.distill.gamma_pam.item() != 0
    assert not module.student.classifier[3]._forward_hooks  # teardown removed the captures


def test_lightning_ddp_synchronises_the_loss_parameters():
    pytest.importorskip("lightning")
    command = [sys.executable, os.path.join(EXAMPLES, "lightning_module.py"), "--steps", "2", "--batch", "3",
               "--size", "64", "--devices", "2", "--strategy", "ddp"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=train_support.subprocess_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    gammas = re.findall(r"rank (\d): gamma_cam (\S+) gamma_pam (\S+)", result.stdout + result.stderr)
    assert sorted(rank for rank, _, _ in gammas) == ["0", "1"], result.stdout[-2000:]
    (_, cam0, pam0), (_, cam1, pam1) = gammas
    assert (cam0, pam0) == (cam1, pam1) and float(cam0) != 0.0  # moved, and the same on both ranks


def test_torchdistill_yaml_hooks_and_registered_loss():
    pytest.importorskip("torchdistill")
    losses, cskd_term = load("torchdistill_cskd").main(["--steps", "2", "--batch", "3", "--size", "96"])
    assert_distilled(losses, 2)
    # The gammas live in the criterion; added to torchdistill's optimiser, they moved from 0.
    assert cskd_term.cskd.gamma_cam.item() != 0 and cskd_term.cskd.gamma_pam.item() != 0
