"""Datasets: the built-in synthetic scenes and the Cityscapes, CamVid and VOC layouts on disk.

Every dataset yields ``(image, label)``: ``image`` a float32 (3, H, W) RGB
tensor with values 0..255, ``label`` an int64 (H, W) tensor of train ids with
IGNORE_INDEX for unlabelled pixels. Normalisation and augmentation happen
afterwards (cskd_train.transforms), so that every dataset gets the same ones.
"""

import glob
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A dataset directory that does not have the expected layout, or a label out of range."""


# --------------------------------------------------------------------------
# Label maps: a 256-entry lookup table from stored values to train ids;
# INVALID marks values that must not occur in a label file.
# --------------------------------------------------------------------------

INVALID = -1


def label_table(mapping, ignore_values=()):
    table = np.full(256, INVALID, dtype=np.int64)
    for stored, train_id in mapping.items():
        table[stored] = train_id
    for stored in ignore_values:
        table[stored] = IGNORE_INDEX
    return table


# Cityscapes labelIds -> the 19 train ids (the official table); every other id is ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_TABLE = label_table(
    CITYSCAPES_TRAIN_IDS, ignore_values=[i for i in range(34) if i not in CITYSCAPES_TRAIN_IDS]
)
# CamVid (SegNet layout): 11 classes 0..10, 11 = void.
CAMVID_TABLE = label_table({i: i for i in range(11)}, ignore_values=[11])
# Pascal VOC: 21 classes 0..20, 255 = boundary/void.
VOC_TABLE = label_table({i: i for i in range(21)}, ignore_values=[255])


def read_label(path, table):
    stored = np.asarray(Image.open(path))
    if stored.ndim != 2:
        raise DatasetError(f"label file {path} is not a single-channel image (shape {stored.shape})")
    label = table[stored]
    if (label == INVALID).any():
        bad = sorted(set(np.unique(stored[label == INVALID]).tolist()))
        raise DatasetError(f"label file {path} has values {bad[:8]} outside the class range")
    return torch.from_numpy(label)


def read_image(path):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy())


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    layout: str


class FilePairs(torch.utils.data.Dataset):
    """Image/label file pairs, label values mapped through a lookup table."""

    def __init__(self, pairs, table, info):
        if not pairs:
            raise DatasetError(f"{info.name}: no images found. Expected layout:\n{info.layout}")
        for image_path, label_path in pairs:
            for path in (image_path, label_path):
                if not os.path.isfile(path):
                    raise DatasetError(f"{info.name}: missing file {path}. Expected layout:\n{info.layout}")
        self.pairs = pairs
        self.table = table
        self.info = info
        self.num_classes = info.num_classes

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), read_label(label_path, self.table)
        if image.shape[1:] != label.shape:
            raise DatasetError(f"image {image_path} is {tuple(image.shape[1:])} but its label is {tuple(label.shape)}")
        return image, label


def require_dir(path, info):
    if not os.path.isdir(path):
        raise DatasetError(f"{info.name}: missing directory {path}. Expected layout:\n{info.layout}")


def read_pair_list(root, list_path):
    """A list file of 'image label' lines, paths relative to root (the released code's .lst files)."""
    pairs = []
    with open(list_path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetError(f"{list_path}:{number}: expected 'image_path label_path', got {line.strip()!r}")
            pairs.append((os.path.join(root, fields[0]), os.path.join(root, fields[1])))
    return pairs


CITYSCAPES = DatasetInfo("cityscapes", 19, """\
  ROOT/leftImg8bit/SPLIT/CITY/NAME_leftImg8bit.png
  ROOT/gtFine/SPLIT/CITY/NAME_gtFine_labelIds.png
  (or a list file ROOT/SPLIT.lst of 'image_path label_path' lines relative to ROOT)""")

CAMVID = DatasetInfo("camvid", 11, """\
  ROOT/SPLIT/NAME.png and ROOT/SPLITannot/NAME.png (SegNet layout, labels 0..10, 11 = void)
  (or a list file ROOT/SPLIT.lst of 'image_path label_path' lines relative to ROOT)""")

VOC = DatasetInfo("voc", 21, """\
  ROOT/ImageSets/Segmentation/SPLIT.txt (one image id per line)
  ROOT/JPEGImages/ID.jpg
  ROOT/SegmentationClassAug/ID.png or ROOT/SegmentationClass/ID.png (labels 0..20, 255 = void)""")


def cityscapes(root, split):
    list_path = os.path.join(root, f"{split}.lst")
    if os.path.isfile(list_path):
        return FilePairs(read_pair_list(root, list_path), CITYSCAPES_TABLE, CITYSCAPES)
    image_dir = os.path.join(root, "leftImg8bit", split)
    require_dir(image_dir, CITYSCAPES)
    require_dir(os.path.join(root, "gtFine", split), CITYSCAPES)
    pairs = []
    for image_path in sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png"))):
        city = os.path.basename(os.path.dirname(image_path))
        stem = os.path.basename(image_path)[: -len("_leftImg8bit.png")]
        pairs.append((image_path, os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")))
    return FilePairs(pairs, CITYSCAPES_TABLE, CITYSCAPES)


def camvid(root, split):
    list_path = os.path.join(root, f"{split}.lst")
    if os.path.isfile(list_path):
        return FilePairs(read_pair_list(root, list_path), CAMVID_TABLE, CAMVID)
    image_dir, label_dir = os.path.join(root, split), os.path.join(root, f"{split}annot")
    require_dir(image_dir, CAMVID)
    require_dir(label_dir, CAMVID)
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(image_dir, "*.png")))
    return FilePairs([(os.path.join(image_dir, n), os.path.join(label_dir, n)) for n in names], CAMVID_TABLE, CAMVID)


def voc(root, split):
    ids_path = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(ids_path):
        raise DatasetError(f"voc: missing file {ids_path}. Expected layout:\n{VOC.layout}")
    require_dir(os.path.join(root, "JPEGImages"), VOC)
    label_dir = os.path.join(root, "SegmentationClassAug")
    if not os.path.isdir(label_dir):
        label_dir = os.path.join(root, "SegmentationClass")
    require_dir(label_dir, VOC)
    with open(ids_path, encoding="utf-8") as lines:
        ids = [line.strip() for line in lines if line.strip()]
    pairs = [(os.path.join(root, "JPEGImages", f"{i}.jpg"), os.path.join(label_dir, f"{i}.png")) for i in ids]
    return FilePairs(pairs, VOC_TABLE, VOC)


# --------------------------------------------------------------------------
# Synthetic scenes
# --------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("background", "disk", "square", "triangle", "ring", "cross")
# Object and background regions draw their colours from the same palette, so a
# pixel's colour says nothing about its class: only the shape around it does.
PALETTE = np.array(
    [[200, 60, 60], [60, 170, 80], [70, 90, 210], [220, 200, 70], [150, 80, 180], [90, 190, 200], [120, 120, 120]],
    dtype=np.float32,
)


NOISE_STD = 8.0  # per-pixel texture noise, shared by all classes
RADIUS_RANGE = (0.2, 0.35)  # object radius as a fraction of the image side
OBJECTS_RANGE = (3, 6)  # objects per scene: from, to (exclusive)


def shape_mask(kind, u, v, radius):
    """Pixels inside a shape, in coordinates (u, v) centred on it and rotated."""
    distance = np.sqrt(u**2 + v**2)
    if kind == 1:  # disk
        return distance <= radius
    if kind == 2:  # square
        return (np.abs(u) <= 0.8 * radius) & (np.abs(v) <= 0.8 * radius)
    if kind == 3:  # triangle pointing up in (u, v)
        return (v <= 0.5 * radius) & (v >= -radius + 1.73 * np.abs(u))
    if kind == 4:  # ring: the hole shows the background
        return (distance <= radius) & (distance >= 0.55 * radius)
    if kind == 5:  # cross
        arm = 0.3 * radius
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    raise ValueError(kind)


def synthetic_scene(seed, size):
    """One (image, label) scene, a pure function of (seed, size)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    # Background: two palette colours split by a wavy boundary, so the background has edges too.
    colours = rng.choice(len(PALETTE), size=2, replace=False)
    phase, slope, wave = rng.uniform(0, 2 * np.pi), rng.uniform(-1, 1), rng.uniform(2, 6)
    split = (y - size / 2 - slope * (x - size / 2) + wave * np.sin(x / size * 6 + phase)) > 0
    image = np.where(split[..., None], PALETTE[colours[0]], PALETTE[colours[1]])
    label = np.zeros((size, size), dtype=np.int64)
    # Objects take colours the background does not use (and each its own), so every object is visible.
    object_colours = rng.permutation([c for c in range(len(PALETTE)) if c not in colours])
    for colour in object_colours[: rng.integers(*OBJECTS_RANGE)]:
        kind = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        radius = rng.uniform(*RADIUS_RANGE) * size
        cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        inside = shape_mask(kind, u, v, radius)
        image[inside] = PALETTE[colour]
        label[inside] = kind
    image = image + rng.normal(0, NOISE_STD, size=image.shape)
    image = np.clip(image, 0, 255).astype(np.float32)
    return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(label)


class SyntheticShapes(torch.utils.data.Dataset):
    """Scenes of textured shapes whose class depends on their shape only (see synthetic_scene).

    Deterministic: scene i of split s is generated from (seed, s, i); train and
    val draw from disjoint seed streams. No files needed.
    """

    SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, split="train", *, seed=0, num_images=None, image_size=64):
        if split not in self.SPLIT_OFFSETS:
            raise DatasetError(f"synthetic: unknown split {split!r}; choose one of {sorted(self.SPLIT_OFFSETS)}")
        self.split_offset = self.SPLIT_OFFSETS[split]
        self.seed = seed
        self.num_images = num_images if num_images is not None else (512 if split == "train" else 64)
        self.image_size = image_size
        self.num_classes = len(SYNTHETIC_CLASSES)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        return synthetic_scene([self.seed, self.split_offset, index], self.image_size)


DATASET_NAMES = ("synthetic", "cityscapes", "camvid", "voc")
NUM_CLASSES = {"synthetic": len(SYNTHETIC_CLASSES), "cityscapes": 19, "camvid": 11, "voc": 21}


def build_dataset(name, split, *, root=None, seed=0, synthetic_size=64, synthetic_images=None):
    if name == "synthetic":
        return SyntheticShapes(split, seed=seed, num_images=synthetic_images, image_size=synthetic_size)
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if not root:
        raise DatasetError(f"--data-root is required for the {name} dataset")
    if not os.path.isdir(root):
        info = {"cityscapes": CITYSCAPES, "camvid": CAMVID, "voc": VOC}[name]
        raise DatasetError(f"{name}: data root {root} is not a directory. Expected layout:\n{info.layout}")
    return {"cityscapes": cityscapes, "camvid": camvid, "voc": voc}[name](root, split)
