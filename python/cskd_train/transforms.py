"""Normalisation, the released training augmentation, and a resumable sampler.

Augmentation randomness comes from a per-sample seed handed out by the
sampler (never from global RNG state), so a resumed run sees exactly the
crops and flips an uninterrupted run would, whatever the number of loader
workers.
"""

import numpy as np
import torch
import torch.nn.functional as F

from cskd_train.datasets import IGNORE_INDEX

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The released code: BGR channel order, the Caffe means subtracted, no scaling.
RELEASED_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

NORMALIZATIONS = ("imagenet", "released")


def normalize(image, mode):
    """image: (3, H, W) RGB 0..255 -> the network input of the given normalisation."""
    if mode == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (image - mean) / std
    if mode == "released":
        return image.flip(0) - torch.tensor(RELEASED_MEAN_BGR).view(3, 1, 1)
    raise ValueError(f"unknown normalization {mode!r}; choose one of {NORMALIZATIONS}")


def random_scale(image, label, rng):
    """The released scales: 0.5 + randint(0, 15) / 10, i.e. 0.5 to 2.0 in steps of 0.1."""
    scale = 0.5 + rng.integers(0, 16) / 10.0
    height, width = label.shape
    size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def pad_to(image, label, crop_h, crop_w):
    """Pad bottom/right to at least the crop: image with 0 (the mean), label with the ignore index."""
    pad_h, pad_w = max(crop_h - label.shape[0], 0), max(crop_w - label.shape[1], 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return image, label


class TrainTransform:
    """Random scale, normalise, pad with the ignore label, random crop, horizontal flip (released order)."""

    def __init__(self, crop_size, normalization="imagenet", scale=True, flip=True):
        self.crop_h, self.crop_w = crop_size
        self.normalization = normalization
        self.scale = scale
        self.flip = flip

    def __call__(self, image, label, rng):
        if self.scale:
            image, label = random_scale(image, label, rng)
        image, label = pad_to(normalize(image, self.normalization), label, self.crop_h, self.crop_w)
        top = int(rng.integers(0, label.shape[0] - self.crop_h + 1))
        left = int(rng.integers(0, label.shape[1] - self.crop_w + 1))
        image = image[:, top : top + self.crop_h, left : left + self.crop_w]
        label = label[top : top + self.crop_h, left : left + self.crop_w]
        if self.flip and rng.integers(0, 2):
            image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()


class EvalTransform:
    def __init__(self, normalization="imagenet"):
        self.normalization = normalization

    def __call__(self, image, label, rng=None):
        return normalize(image, self.normalization), label


class Transformed(torch.utils.data.Dataset):
    """A dataset seen through a transform; indexed by (index, sample_seed) from SeededSampler, or by index."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_seed = key if isinstance(key, tuple) else (key, 0)
        image, label = self.dataset[index]
        return self.transform(image, label, np.random.default_rng(sample_seed))


class SeededSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (index, sample_seed) pairs and can start mid-epoch.

    The shuffle of epoch e is DistributedSampler's (seed + e); the sample seed
    is a pure function of (seed, epoch, position), so any iteration can be
    replayed exactly after a resume.
    """

    def __init__(self, dataset, *, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start):
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        for position in range(self.start, len(indices)):
            yield indices[position], [self.seed, self.epoch, self.rank, position]

    def __len__(self):
        return self.num_samples - self.start
