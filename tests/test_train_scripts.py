"""Every row of python/README.md's table of the released scripts runs, as written there, for 2 iterations.

The commands are read from the README (so the table cannot rot) and run in
this process with small overrides appended (argparse keeps the last value):
2 iterations, 40x40 crops, batch 3, one thread. $DATA is a tree of a few
small images in the dataset's own layout, $TEACHER, $BACKBONE and $STUDENT
files in the released code's formats (tests/released_models/).
"""

import os
import re
import shlex

import numpy as np
import pytest
from PIL import Image

import train_support
from cskd_train import evaluate, train
from cskd_train.datasets import NUM_CLASSES
from released_support import released_state, released_network_file, save

README = os.path.join(train_support.REPO, "python", "README.md")
TRAIN_OVERRIDES = ["--max-iterations", "2", "--crop-size", "40", "40", "--batch-size", "3", "--val-every", "2",
                   "--threads", "1", "--no-progress", "--no-plot"]
BACKBONE_LAYOUTS = {"resnet18": "backbone_resnet18_v1s_imagenet", "mobilenetv2": "backbone_mobilenetv2_imagenet"}


def script_rows():
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    return re.findall(r"^\| `([^`]+\.sh)` \| `([^`]+)` \|$", text, flags=re.M)


ROWS = script_rows()


def test_the_table_has_every_released_script():
    assert len(ROWS) == 15 and len({script for script, _ in ROWS}) == 15


def image_and_label(path_image, path_label, seed, label_values, palette=False):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path_image), exist_ok=True)
    os.makedirs(os.path.dirname(path_label), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(path_image)
    label = Image.fromarray(rng.choice(np.asarray(label_values, dtype=np.uint8), size=(48, 64)))
    if palette:
        label = label.convert("P")
    label.save(path_label)


def dataset_tree(root, name):
    """Three images per split in the dataset's on-disk layout."""
    if name == "cityscapes":
        for split in ("train", "val", "test"):
            for i in range(3):
                stem = f"{root}/%s/{split}/aachen/aachen_00000{i}_000019"
                image_and_label(stem % "leftImg8bit" + "_leftImg8bit.png", stem % "gtFine" + "_gtFine_labelIds.png",
                                i, (0, 7, 8, 26, 33))
    elif name == "camvid":
        for split in ("train", "val", "test"):
            for i in range(3):
                image_and_label(f"{root}/{split}/0001TP_00{i}.png", f"{root}/{split}annot/0001TP_00{i}.png", i,
                                (0, 3, 10, 11))
    else:
        ids = [f"2007_00003{i}" for i in range(3)]
        os.makedirs(f"{root}/ImageSets/Segmentation", exist_ok=True)
        for split in ("train", "val"):
            with open(f"{root}/ImageSets/Segmentation/{split}.txt", "w") as out:
                out.write("\n".join(ids) + "\n")
        for i, name_id in enumerate(ids):
            image_and_label(f"{root}/JPEGImages/{name_id}.jpg", f"{root}/SegmentationClassAug/{name_id}.png", i,
                            (0, 15, 20, 255), palette=True)
    return root


def flag(args, name):
    return args[args.index(name) + 1]


def files_for(args, tmp_path):
    """$DATA, $TEACHER, $BACKBONE and $STUDENT for one command."""
    directory = str(tmp_path)
    dataset = flag(args, "--dataset")
    files = {"DATA": dataset_tree(f"{directory}/data", dataset)}
    classes = NUM_CLASSES[dataset]
    if "--teacher-model" in args:
        files["TEACHER"] = released_network_file(directory, flag(args, "--teacher-model"), classes)[1]
    if "--backbone-weights" in args:
        backbone = flag(args, "--model").split("_")[1]
        files["BACKBONE"] = save(directory, released_state(BACKBONE_LAYOUTS[backbone]), "imagenet.pth")
    if "--checkpoint" in args:
        files["STUDENT"] = released_network_file(directory, flag(args, "--model"), classes)[1]
    return files


def command_args(command):
    """The arguments of cskd-train / cskd-eval in a command (after torchrun's own and -m MODULE)."""
    words = shlex.split(command)
    if words[0] == "torchrun":
        module_at = words.index("-m")
        return words[module_at + 1], words[module_at + 2:]
    return {"cskd-train": "cskd_train.train", "cskd-eval": "cskd_train.evaluate"}[words[0]], words[1:]


@pytest.mark.parametrize("script, command", ROWS, ids=[script for script, _ in ROWS])
def test_released_script_row_runs(tmp_path, script, command, capsys):
    module, args = command_args(command)
    files = files_for(args, tmp_path)
    args = [files.get(word[1:], word) if word.startswith("$") else word for word in args]
    assert not [word for word in args if word.startswith("$")], args
    if module == "cskd_train.train":
        rc = train.main([*args, *TRAIN_OVERRIDES, "--output-dir", str(tmp_path / "run")])
        assert rc == 0, capsys.readouterr().err
        assert (tmp_path / "run" / "last.pt").exists()
    else:
        assert module == "cskd_train.evaluate"
        extra = ["--save-predictions", str(tmp_path / "predictions")] if "--save-predictions" in args else []
        rc = evaluate.main([*args, *extra])
        assert rc == 0, capsys.readouterr().err
        assert "mIoU" in capsys.readouterr().out
        if extra:
            written = sorted(os.listdir(tmp_path / "predictions"))
            assert len(written) == 3 and all(name.endswith(".png") for name in written)


# ---- cskd-eval --save-predictions ------------------------------------------


def test_prediction_formats(tmp_path):
    import torch

    from cskd_train.datasets import build_dataset
    from cskd_train.predictions import PredictionWriter

    dataset = build_dataset("cityscapes", "val", root=dataset_tree(str(tmp_path / "data"), "cityscapes"))
    predictions = torch.tensor([[[0, 1], [13, 18]]])
    written = {}
    for fmt in ("train-ids", "label-ids", "color"):
        writer = PredictionWriter(str(tmp_path / fmt), fmt, "cityscapes", dataset, indices=[2])
        writer(predictions)
        image = Image.open(tmp_path / fmt / "aachen_000002_000019.png")  # the image's stem, no _leftImg8bit
        written[fmt] = (image.mode, np.asarray(image).tolist())
    assert written["train-ids"] == ("L", [[0, 1], [13, 18]])
    assert written["label-ids"] == ("L", [[7, 8], [26, 33]])  # road, sidewalk, car, bicycle
    assert written["color"][0] == "P" and written["color"][1] == [[0, 1], [13, 18]]
    palette = Image.open(tmp_path / "color" / "aachen_000002_000019.png").getpalette()
    assert palette[:3] == [128, 64, 128]  # road's colour


def test_save_predictions_refuses_a_directory_with_files(tmp_path, capsys):
    _, student = released_network_file(str(tmp_path), "deeplabv3_resnet18", 6)
    used = tmp_path / "predictions"
    used.mkdir()
    (used / "mine.png").write_bytes(b"a user's file")
    rc = evaluate.main(["--model", "deeplabv3_resnet18", "--checkpoint", student, "--synthetic-size", "40",
                        "--synthetic-images", "2", "--save-predictions", str(used)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is not empty" in err
    assert os.listdir(used) == ["mine.png"]
