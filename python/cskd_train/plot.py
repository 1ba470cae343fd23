"""The training curves (loss parts and validation mIoU) from metrics.jsonl, as a PNG."""

import json

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEYS = ("loss", "ce", "aux", "cwd", "cam", "pam")


def read_metrics(path):
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def plot_curves(metrics_path, png_path, title=None):
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "miou" in r]
    figure, (loss_axes, miou_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for key in LOSS_KEYS:
        points = [(r["iteration"], r[key]) for r in train if key in r]
        if points:
            loss_axes.plot(*zip(*points), label=key)
    loss_axes.set_xlabel("iteration")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    if val:
        miou_axes.plot([r["iteration"] for r in val], [r["miou"] for r in val], marker="o")
    miou_axes.set_xlabel("iteration")
    miou_axes.set_ylabel("validation mIoU")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
