"""Dataset loaders on tiny fixture trees in the real on-disk layouts, the synthetic scenes, augmentation."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import train_support  # noqa: F401
from cskd_train import train
from cskd_train.datasets import IGNORE_INDEX, DatasetError, SyntheticShapes, build_dataset
from cskd_train.transforms import RELEASED_MEAN_BGR, SeededSampler, TrainTransform, Transformed, normalize
from train_support import TINY

HEIGHT, WIDTH = 24, 40


def write_image(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def write_label(path, values, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    label = np.resize(np.asarray(values, dtype=np.uint8), (HEIGHT, WIDTH))
    image = Image.fromarray(label)
    if palette:  # VOC labels are palette PNGs whose indices are the classes
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        assert image.mode == "P"
    image.save(path)
    return label


def cityscapes_tree(root, labels=(0, 7, 8, 26, 33, 1)):
    for split in ("train", "val"):
        for i, city in enumerate(("aachen", "bremen")):
            stem = f"{city}_00000{i}_000019"
            write_image(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", i)
            write_label(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", labels)
    return root


def camvid_tree(root, labels=(0, 3, 10, 11)):
    for split in ("train", "val"):
        for name in ("0001TP_006690.png", "Seq05VD_f00000.png"):
            write_image(f"{root}/{split}/{name}", 1)
            write_label(f"{root}/{split}annot/{name}", labels)
    return root


def voc_tree(root, labels=(0, 15, 20, 255), aug=False):
    ids = ["2007_000032", "2007_000039"]
    os.makedirs(f"{root}/ImageSets/Segmentation", exist_ok=True)
    for split in ("train", "val"):
        with open(f"{root}/ImageSets/Segmentation/{split}.txt", "w") as out:
            out.write("\n".join(ids) + "\n")
    for i in ids:
        write_image(f"{root}/JPEGImages/{i}.jpg", 2)
        write_label(f"{root}/{'SegmentationClassAug' if aug else 'SegmentationClass'}/{i}.png", labels, palette=True)
    return root


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    dataset = build_dataset("cityscapes", "train", root=cityscapes_tree(str(tmp_path)))
    assert len(dataset) == 2 and dataset.num_classes == 19
    image, label = dataset[0]
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32
    # labelIds 0 -> ignore, 7 road -> 0, 8 sidewalk -> 1, 26 car -> 13, 33 bicycle -> 18
    assert label[0, :6].tolist() == [IGNORE_INDEX, 0, 1, 13, 18, IGNORE_INDEX]


def test_cityscapes_list_file(tmp_path):
    root = cityscapes_tree(str(tmp_path))
    with open(f"{root}/val.lst", "w") as out:
        out.write("leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png "
                  "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png\n")
    assert len(build_dataset("cityscapes", "val", root=root)) == 1


def test_camvid_void_is_ignored(tmp_path):
    dataset = build_dataset("camvid", "train", root=camvid_tree(str(tmp_path)))
    assert dataset.num_classes == 11
    assert dataset[1][1][0, :4].tolist() == [0, 3, 10, IGNORE_INDEX]


@pytest.mark.parametrize("aug", [False, True])
def test_voc_palette_labels(tmp_path, aug):
    dataset = build_dataset("voc", "train", root=voc_tree(str(tmp_path), aug=aug))
    assert dataset.num_classes == 21
    assert dataset[0][1][0, :4].tolist() == [0, 15, 20, IGNORE_INDEX]


@pytest.mark.parametrize("name, tree", [("cityscapes", cityscapes_tree), ("camvid", camvid_tree), ("voc", voc_tree)])
def test_one_training_iteration_per_layout(name, tree, tmp_path):
    root = tree(str(tmp_path / "data"))
    rc = train.main(["--dataset", name, "--data-root", root, "--max-iterations", "1", "--crop-size", "40", "40",
                     "--batch-size", "2", "--threads", "1", "--no-progress", "--no-plot",
                     "--output-dir", str(tmp_path / "run")])
    assert rc == 0


def test_missing_directory_names_layout(tmp_path):
    root = cityscapes_tree(str(tmp_path))
    with pytest.raises(DatasetError) as info:
        build_dataset("cityscapes", "test", root=root)
    assert "leftImg8bit/test" in str(info.value) and "Expected layout" in str(info.value)
    assert "_gtFine_labelIds.png" in str(info.value)


def test_missing_file_is_named(tmp_path):
    root = camvid_tree(str(tmp_path))
    os.remove(f"{root}/trainannot/Seq05VD_f00000.png")
    with pytest.raises(DatasetError, match="missing file .*trainannot/Seq05VD_f00000.png"):
        build_dataset("camvid", "train", root=root)


def test_missing_voc_image_is_named(tmp_path):
    root = voc_tree(str(tmp_path))
    os.remove(f"{root}/JPEGImages/2007_000032.jpg")
    with pytest.raises(DatasetError, match="missing file .*JPEGImages/2007_000032.jpg"):
        build_dataset("voc", "train", root=root)


def test_missing_root_through_the_cli(tmp_path, capsys):
    rc = train.main(["--dataset", "voc", "--data-root", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "r"),
                     *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "ImageSets/Segmentation" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_label_out_of_range_names_the_file(tmp_path, capsys):
    root = camvid_tree(str(tmp_path / "data"), labels=(0, 1, 12))
    dataset = build_dataset("camvid", "train", root=root)
    with pytest.raises(DatasetError, match=r"0001TP_006690.png has values \[12\] outside the class range"):
        dataset[0]
    rc = train.main(["--dataset", "camvid", "--data-root", root, "--max-iterations", "1", "--crop-size", "40", "40",
                     "--batch-size", "2", "--no-progress", "--output-dir", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "outside the class range" in err and "Traceback" not in err


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticShapes("train", seed=3), SyntheticShapes("train", seed=3)
    assert torch.equal(a[5][0], b[5][0]) and torch.equal(a[5][1], b[5][1])
    assert not torch.equal(a[5][0], SyntheticShapes("train", seed=4)[5][0])
    assert not torch.equal(a[0][0], SyntheticShapes("val", seed=3)[0][0])
    labels = torch.stack([a[i][1] for i in range(40)])
    assert set(labels.unique().tolist()) == set(range(6))  # background and five shape classes


def test_synthetic_colour_does_not_give_the_class():
    """The same palette colour appears in several classes: a pixel alone is ambiguous."""
    dataset = SyntheticShapes("train", seed=0)
    classes_per_colour = {}
    for i in range(60):
        image, label = dataset[i]
        # Noise-free colour: the palette entry nearest to the pixel.
        from cskd_train.datasets import PALETTE
        distance = ((image.permute(1, 2, 0)[..., None, :] - torch.from_numpy(PALETTE)) ** 2).sum(-1)
        colour = distance.argmin(-1)
        for c, k in zip(colour.flatten().tolist(), label.flatten().tolist()):
            classes_per_colour.setdefault(c, set()).add(k)
    assert all(len(classes) >= 4 for classes in classes_per_colour.values())


def test_train_transform_crops_pads_and_replays():
    image = torch.rand(3, 20, 30) * 255
    label = torch.randint(0, 5, (20, 30))
    transform = TrainTransform((48, 48))
    out_image, out_label = transform(image, label, np.random.default_rng(7))
    assert out_image.shape == (3, 48, 48) and out_label.shape == (48, 48)
    assert (out_label == IGNORE_INDEX).any()  # 30 * 2.0 < 64: always padded with the ignore label
    again = transform(image, label, np.random.default_rng(7))
    assert torch.equal(out_image, again[0]) and torch.equal(out_label, again[1])


def test_released_normalization_is_bgr_minus_means():
    image = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)
    out = normalize(image, "released").flatten().tolist()
    assert out == pytest.approx([30 - RELEASED_MEAN_BGR[0], 20 - RELEASED_MEAN_BGR[1], 10 - RELEASED_MEAN_BGR[2]])


def test_sampler_resumes_mid_epoch():
    dataset = Transformed(SyntheticShapes("train", num_images=10, image_size=8), TrainTransform((8, 8)))
    full = SeededSampler(dataset, num_replicas=1, rank=0, seed=1)
    full.set_epoch(2)
    resumed = SeededSampler(dataset, num_replicas=1, rank=0, seed=1)
    resumed.set_epoch(2)
    resumed.set_start(4)
    assert list(resumed) == list(full)[4:]
