"""Data-parallel training (2 gloo processes) and the evaluation command."""

import re
import socket
import sys

import pytest
import torch

import train_support  # noqa: F401
from cskd_train import evaluate, train
from cskd_train.distributed import Context
from cskd_train.evaluate import iou_from_confusion, predict_sliding, predict_whole
from cskd_train.models import SegmentationOutput
from train_support import TINY, read_metrics, run_module


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_cskd_run_matches_single_process_eval(tmp_path):
    teacher = tmp_path / "teacher"
    assert train.main(["--max-iterations", "1", "--output-dir", str(teacher), *TINY]) == 0
    out = tmp_path / "ddp"
    args = [
        "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "cskd_train.train",
        "--distill", "cskd", "--teacher-model", "deeplabv3_resnet18", "--teacher-checkpoint", str(teacher / "last.pt"),
        "--model", "deeplabv3_resnet18", "--max-iterations", "3", "--log-every", "1",
        "--val-every", "3", "--output-dir", str(out), *TINY, "--synthetic-val-images", "3",
    ]
    result = run_module("torch.distributed.run", args, timeout=400)
    # The trainer checks at the end that both ranks hold identical student and loss-module parameters.
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all("cam" in r and "pam" in r for r in rows if "loss" in r)
    config = torch.load(out / "last.pt", weights_only=True)
    assert config["iteration"] == 3
    # Validation was sharded over the 2 ranks (3 images: 2 + 1) with the confusion matrices summed and
    # rank 0's BatchNorm statistics: it must equal one process evaluating all 3 images with the saved weights.
    ddp_miou = [r["miou"] for r in rows if "miou" in r][-1]
    evaluated = run_module("cskd_train.evaluate", [
        "--model", "deeplabv3_resnet18", "--checkpoint", str(out / "last.pt"), "--synthetic-size", "40",
        "--synthetic-images", "3"])
    assert evaluated.returncode == 0, evaluated.stderr
    single_miou = float(re.search(r"mIoU: ([0-9.]+)", evaluated.stdout).group(1))
    assert single_miou == pytest.approx(ddp_miou, abs=1e-4)


def test_sync_bn_on_the_cpu_is_refused_in_one_line(tmp_path, capsys):
    # Refused even in one process (where SyncBatchNorm would be a no-op), before anything is written.
    out = tmp_path / "run"
    assert train.main(["--sync-bn", "--max-iterations", "1", "--output-dir", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cskd-train: error: --sync-bn needs CUDA devices") and "\n" not in err
    assert "Traceback" not in err
    assert not out.exists()


def test_eval_prints_per_class_iou_and_the_logged_miou(tmp_path, capsys):
    out = tmp_path / "run"
    with_plot = [a for a in TINY if a != "--no-plot"]
    assert train.main(["--max-iterations", "2", "--val-every", "2", "--output-dir", str(out), *with_plot]) == 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = [r["miou"] for r in read_metrics(out) if "miou" in r][-1]
    rc = evaluate.main(["--model", "deeplabv3_resnet18", "--checkpoint", str(out / "best.pt"),
                        "--synthetic-size", "40", "--synthetic-images", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "background" in printed and "triangle" in printed
    assert float(re.search(r"mIoU: ([0-9.]+)", printed).group(1)) == pytest.approx(logged, abs=1e-4)
    rc = evaluate.main(["--model", "deeplabv3_resnet18", "--checkpoint", str(out / "best.pt"), "--mode", "slide",
                        "--crop-size", "24", "24", "--synthetic-size", "40", "--synthetic-images", "2"])
    assert rc == 0
    assert "mIoU:" in capsys.readouterr().out


def test_eval_of_a_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    result = run_module("cskd_train.evaluate", ["--model", "deeplabv3_resnet18", "--checkpoint", str(bad)])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


class PointwiseModel(torch.nn.Module):
    """A full-resolution 1x1 conv: every window sees the same per-pixel logits as the whole image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return SegmentationOutput(self.conv(x), None, x)


def test_sliding_window_stitches_overlapping_crops():
    model = PointwiseModel()
    images = torch.randn(2, 3, 29, 41)
    with torch.no_grad():
        whole = predict_whole(model, images)
        slide = predict_sliding(model, images, (12, 16))
        small = predict_sliding(model, images[:, :, :10, :10], (12, 16))  # padded up to the crop, then cut
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(small, whole[:, :, :10, :10])


def test_iou_ignores_the_ignore_label_and_absent_classes():
    from torchmetrics.classification import MulticlassConfusionMatrix

    metric = MulticlassConfusionMatrix(4, ignore_index=255)
    prediction = torch.tensor([0, 0, 1, 1, 2, 3])
    labels = torch.tensor([0, 255, 1, 0, 255, 255])
    metric.update(prediction, labels)
    iou, miou = iou_from_confusion(metric.compute())
    # class 0: tp 1, fp 0 (ignored pixel), fn 1 -> 1/2; class 1: tp 1, fp 1 -> 1/2; classes 2, 3 absent -> NaN
    assert iou[:2].tolist() == [0.5, 0.5] and torch.isnan(iou[2:]).all()
    assert miou == 0.5
