"""cskd-eval --save-predictions: one PNG per image, as train ids, dataset label ids, or a colour map.

What the released test and visualisation scripts write: label ids are what
the Cityscapes evaluation server takes (the 19 train ids mapped back to the
official labelIds), a colour map is for looking at (the dataset's usual
palette as a palette PNG, whose pixel values are still the train ids).
"""

import os

import numpy as np
from PIL import Image

from cskd_train.datasets import CITYSCAPES_TRAIN_IDS, FilePairs

FORMATS = ("train-ids", "label-ids", "color")


class PredictionError(ValueError):
    """A prediction directory that cannot be written (one-line message)."""

CITYSCAPES_COLORS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]
CAMVID_COLORS = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]


def voc_colors(count=256):
    """The Pascal VOC palette: the bits of the class index spread over the high bits of R, G and B."""
    colors = []
    for index in range(count):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors.append((r, g, b))
    return colors


def palette(dataset_name):
    colors = {"cityscapes": CITYSCAPES_COLORS, "camvid": CAMVID_COLORS}.get(dataset_name, voc_colors())
    flat = [channel for color in colors for channel in color]
    return flat + [0] * (768 - len(flat))


def cityscapes_label_ids():
    """Train id -> labelId lookup (the inverse of the official table)."""
    table = np.zeros(256, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[train_id] = label_id
    return table


def image_name(dataset, index):
    """The file name of a prediction: the image's own stem (Cityscapes: without _leftImg8bit), or its index."""
    if isinstance(dataset, FilePairs):
        stem = os.path.splitext(os.path.basename(dataset.pairs[index][0]))[0]
        return stem.removesuffix("_leftImg8bit")
    return f"{index:05d}"


def check_prediction_dir(path):
    """An empty or new directory; one that holds files is refused (predictions never overwrite a user's files)."""
    if os.path.isdir(path) and os.listdir(path):
        raise PredictionError(f"--save-predictions {path} is not empty: choose a new directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise PredictionError(f"--save-predictions {path} is a file, not a directory")


class PredictionWriter:
    """Writes the predictions of an evaluation loader, in its order, under the images' names."""

    def __init__(self, directory, fmt, dataset_name, dataset, indices):
        if fmt not in FORMATS:
            raise ValueError(f"unknown prediction format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if fmt == "label-ids" and dataset_name != "cityscapes":
            fmt = "train-ids"  # CamVid, VOC and the synthetic scenes store their train ids as label values
        self.directory, self.fmt, self.dataset_name = directory, fmt, dataset_name
        self.dataset, self.indices, self.position = dataset, indices, 0
        os.makedirs(directory, exist_ok=True)

    def __call__(self, predictions):
        """predictions: (B, H, W) integer train ids of the next B images of the loader."""
        for prediction in predictions.to("cpu").numpy().astype(np.uint8):
            index = self.indices[self.position]
            self.position += 1
            self.save(prediction, os.path.join(self.directory, image_name(self.dataset, index) + ".png"))

    def save(self, prediction, path):
        if self.fmt == "label-ids":
            prediction = cityscapes_label_ids()[prediction]
        image = Image.fromarray(prediction)
        if self.fmt == "color":
            image = image.convert("P")
            image.putpalette(palette(self.dataset_name))
        image.save(path)
