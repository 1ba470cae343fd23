"""Helpers shared by the training-application tests (tests/test_train_*.py)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_DIR = os.path.join(REPO, "python")
if APP_DIR not in sys.path:  # cskd_train without an install (pip install -e . puts it on the path too)
    sys.path.insert(0, APP_DIR)

# Tiny, fast runs: 40x40 crops give 5x5 feature maps, enough for the 5x5 CSKD grid; batch 3, the
# smallest whose linear CKA is not constant (CSKDLoss refuses fewer samples), 3 batches per epoch.
TINY = [
    "--crop-size", "40", "40", "--synthetic-size", "40", "--synthetic-images", "9",
    "--synthetic-val-images", "2", "--batch-size", "3", "--threads", "1", "--no-progress", "--no-plot",
]


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([APP_DIR, REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_module(module, args, timeout=240, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=subprocess_env(), capture_output=True, text=True,
        timeout=timeout, **kwargs,
    )


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


# The wall-clock fields of a logged row (step time, images/s, the CSKD loss's share): they differ run to run.
TIMING_KEYS = ("seconds", "images_per_s", "images_per_s_total", "cskd_share", "cskd_ms", "step_ms")


def loss_rows(rows):
    """Logged training rows without the wall-clock fields, for exact comparison."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def distill_flags(tmp_path):
    """A CSKD run needs a teacher: a one-iteration ResNet18 run is enough."""
    from cskd_train import train

    teacher_dir = tmp_path / "teacher"
    if not (teacher_dir / "last.pt").exists():
        assert train.main(["--max-iterations", "1", "--output-dir", str(teacher_dir), *TINY]) == 0
    return ["--distill", "cskd", "--teacher-model", "deeplabv3_resnet18",
            "--teacher-checkpoint", str(teacher_dir / "last.pt"), "--model", "deeplabv3_mobilenetv2"]
