"""Every released network and backbone file loads, and a wrong file is refused in the file's own names.

The released state-dict layouts (every key, shape and dtype of the six
networks of the released CSKD code and of its three ImageNet backbone files,
tests/released_models/, see its README) give the files built here, with
random values. The released dilated
MobileNetV2 is also written out below from its description, independently of
our model code (timm's), to check that the converted weights compute the same
thing.
"""

import pytest
import torch
from torch import nn

import train_support  # noqa: F401
from cskd_train import evaluate, train
from cskd_train.checkpoint import CheckpointError
from cskd_train.convert import load_backbone_file, load_network_file
from cskd_train.models import MODEL_NAMES, build_model
from released_support import layout, released_network_file, released_state, save
from train_support import TINY

NETWORKS = ("deeplabv3_resnet18", "deeplabv3_resnet101", "pspnet_resnet18", "pspnet_resnet101",
            "deeplabv3_mobilenetv2", "pspnet_mobilenetv2")
BACKBONES = {"mobilenetv2": "deeplabv3_mobilenetv2", "resnet18_v1s": "deeplabv3_resnet18",
             "resnet101_v1s": "pspnet_resnet101"}


# ---- every network, every backbone file -----------------------------------


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "ddp"])
@pytest.mark.parametrize("name", NETWORKS)
def test_every_released_network_loads_with_every_value_in_place(tmp_path, name, prefix):
    assert name in MODEL_NAMES
    state = released_state(name, prefix)
    model = build_model(name, 19)
    load_network_file(model, name, save(tmp_path, state), "--model")
    ours = model.state_dict()
    assert len(ours) == len(state)
    # Every value of the file is in the model exactly once, and nothing of the model is left unloaded.
    file_values = sorted(float(v.double().sum()) + 1e-3 * v.numel() for v in state.values())
    model_values = sorted(float(v.double().sum()) + 1e-3 * v.numel() for v in ours.values())
    assert model_values == pytest.approx(file_values, rel=1e-6)


@pytest.mark.parametrize("name", NETWORKS)
def test_output_shapes_are_the_released_ones(name):
    model = build_model(name, 19).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    released = [out.logits, out.aux_logits, out.features] if out.aux_logits is not None else [out.logits, out.features]
    assert [list(t.shape) for t in released] == layout(name)["outputs_for_1x3x64x64"]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_released_backbone_file_loads(tmp_path, backbone):
    state = released_state(f"backbone_{backbone}_imagenet")
    model = build_model(BACKBONES[backbone], 19)
    load_backbone_file(model.backbone, save(tmp_path, state, "imagenet.pth"))
    file_sums = sorted(float(v.double().sum()) for v in state.values())
    assert sorted(float(v.double().sum()) for v in model.backbone.state_dict().values()) == pytest.approx(file_sums)


# ---- the released MobileNetV2 computes what ours computes ------------------


class ReleasedInvertedResidual(nn.Module):
    """The released block: ``conv`` = [1x1 expand, BN, ReLU6,] 3x3 depthwise, BN, ReLU6, 1x1, BN."""

    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        hidden = cin * expansion
        layers = [] if expansion == 1 else [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def released_mobilenetv2_features():
    """The released dilated MobileNetV2 at output stride 8 (``features``, without the 1280-wide last block).

    Features 7-13 run at dilation 2 and 14-17 at dilation 4; the strided 3x3
    convolution that starts each of those stages loses its stride and takes
    half the stage's dilation.
    """
    stages = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1)]
    layers = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())]
    cin = 32
    for expansion, cout, blocks, stride in stages:
        for block in range(blocks):
            layers.append(ReleasedInvertedResidual(cin, cout, stride if block == 0 else 1, expansion))
            cin = cout
    features = nn.Sequential(*layers)
    for index in range(7, len(features)):
        stage_dilation = 2 if index < 14 else 4
        for conv in features[index].modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                dilation = stage_dilation // 2 if conv.stride == (2, 2) else stage_dilation
                conv.stride, conv.dilation, conv.padding = (1, 1), (dilation, dilation), (dilation, dilation)
    return features


@pytest.mark.parametrize("name", ["deeplabv3_mobilenetv2", "pspnet_mobilenetv2"])
def test_released_mobilenetv2_network_gives_the_released_outputs(tmp_path, name):
    state = released_state(name)
    features = released_mobilenetv2_features()
    prefix = "pretrained.net."
    features_state = {key[len(prefix + "features."):]: value for key, value in state.items() if key.startswith(prefix)}
    features.load_state_dict(features_state)  # strict: the layout above is the released one, key for key
    ours = build_model(name, 19)
    load_network_file(ours, name, save(tmp_path, state), "--model")
    released_head = build_model(name, 19).head
    released_head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    features.eval(), ours.eval(), released_head.eval()
    images = torch.randn(2, 3, 67, 45)  # odd sizes: padding and dilation must agree everywhere
    with torch.no_grad():
        logits, feats = released_head(features(images))
        out = ours(images)
    torch.testing.assert_close(out.features, feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    assert out.aux_logits is None


# ---- through the commands --------------------------------------------------


def released_file_for(tmp_path, name, num_classes):
    return released_network_file(str(tmp_path), name, num_classes)


def test_released_mobilenetv2_student_initial_weights_and_eval(tmp_path, capsys):
    model, path = released_file_for(tmp_path, "deeplabv3_mobilenetv2", 6)
    out = tmp_path / "run"
    assert train.main(["--model", "deeplabv3_mobilenetv2", "--init-checkpoint", path, "--lr", "1e-12",
                       "--max-iterations", "1", "--output-dir", str(out), *TINY]) == 0
    trained = torch.load(out / "last.pt", weights_only=True)["model"]
    key = "backbone.blocks.3.2.conv_dw.weight"
    torch.testing.assert_close(trained[key], model.state_dict()[key])  # started from the file (lr ~ 0)
    assert evaluate.main(["--model", "deeplabv3_mobilenetv2", "--checkpoint", path, "--dataset", "synthetic",
                          "--synthetic-size", "40", "--synthetic-images", "2"]) == 0
    assert "mIoU" in capsys.readouterr().out


def test_released_pspnet_mobilenetv2_as_teacher(tmp_path):
    _, path = released_file_for(tmp_path, "pspnet_mobilenetv2", 6)
    assert train.main(["--distill", "cwd", "--teacher-model", "pspnet_mobilenetv2", "--teacher-checkpoint", path,
                       "--max-iterations", "1", "--output-dir", str(tmp_path / "run"), *TINY]) == 0


def test_init_checkpoint_and_backbone_weights_exclude_each_other(tmp_path, capsys):
    assert train.main(["--init-checkpoint", "a.pth", "--backbone-weights", "b.pth", *TINY]) == 2
    assert "cannot be combined" in capsys.readouterr().err


# ---- wrong files -----------------------------------------------------------


def test_another_network_is_named(tmp_path):
    path = save(tmp_path, released_state("deeplabv3_mobilenetv2"))
    with pytest.raises(CheckpointError) as info:
        load_network_file(build_model("pspnet_mobilenetv2", 19), "pspnet_mobilenetv2", path, "--model")
    message = str(info.value)
    assert "\n" not in message and "does not fit a pspnet_mobilenetv2" in message
    assert "(first: head.aspp." in message  # a key as the file names it
    assert "it holds a deeplabv3_mobilenetv2 with 19 classes" in message


def test_another_backbone_names_the_files_key(tmp_path):
    path = save(tmp_path, released_state("deeplabv3_resnet18"))
    with pytest.raises(CheckpointError, match=r"first: pretrained\.(conv1|bn1|layer)") as info:
        load_network_file(build_model("deeplabv3_mobilenetv2", 19), "deeplabv3_mobilenetv2", path, "--model")
    assert "it holds a deeplabv3_resnet18 with 19 classes" in str(info.value)


def test_another_class_count_names_the_shape(tmp_path):
    path = save(tmp_path, released_state("pspnet_mobilenetv2"))
    with pytest.raises(CheckpointError, match=r"its head\.classifier\.weight has shape \(19, 128, 1, 1\), "
                                              r"the model expects \(6, 128, 1, 1\)"):
        load_network_file(build_model("pspnet_mobilenetv2", 6), "pspnet_mobilenetv2", path, "--model")


def test_wrong_teacher_file_through_the_cli_is_one_line(tmp_path, capsys):
    path = save(tmp_path, released_state("pspnet_resnet18"))
    out = tmp_path / "run"
    rc = train.main(["--distill", "cwd", "--teacher-model", "deeplabv3_resnet18", "--teacher-checkpoint", path,
                     "--max-iterations", "1", "--output-dir", str(out), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "(first: head.psp." in err and "it holds a pspnet_resnet18 with 19 classes" in err
    assert not out.exists() or not any(out.iterdir())


def test_truncated_released_file_is_one_line(tmp_path):
    path = save(tmp_path, released_state("deeplabv3_mobilenetv2"))
    with open(path, "rb") as handle:
        head = handle.read(4000)
    with open(path, "wb") as handle:
        handle.write(head)
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as info:
        load_network_file(build_model("deeplabv3_mobilenetv2", 19), "deeplabv3_mobilenetv2", path, "--model")
    assert "\n" not in str(info.value)
