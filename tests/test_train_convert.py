"""Loading the released teachers (CIRKD code base names) and ImageNet backbones into our models.

released_state_dict() writes out, independently of our model code, the
parameter names and shapes of the released DeepLabV3/PSPNet-ResNet101 models
(resnetv1b "v1s" backbone under ``pretrained.``, heads under ``head.``, the
auxiliary FCN head under ``auxlayer.``), as read from the released model files.
"""

import pytest
import torch

import train_support  # noqa: F401
from cskd_train import train
from cskd_train.checkpoint import CheckpointError, load_state_dict_checked
from cskd_train.convert import backbone_state_dict, teacher_state_dict
from cskd_train.models import build_model
from train_support import TINY

NUM_CLASSES = 19


def conv(entries, name, out_c, in_c, k, bias=False):
    entries[f"{name}.weight"] = (out_c, in_c, k, k)
    if bias:
        entries[f"{name}.bias"] = (out_c,)


def bn(entries, name, c):
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        entries[f"{name}.{suffix}"] = (c,)
    entries[f"{name}.num_batches_tracked"] = ()


def released_resnet101_v1s(entries, prefix):
    conv(entries, f"{prefix}conv1", 64, 3, 3)
    bn(entries, f"{prefix}bn1", 64)
    conv(entries, f"{prefix}conv2", 64, 64, 3)
    bn(entries, f"{prefix}bn2", 64)
    conv(entries, f"{prefix}conv3", 128, 64, 3)
    bn(entries, f"{prefix}bn3", 128)
    inplanes = 128
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 23), (512, 3)], 1):
        for block in range(blocks):
            name = f"{prefix}layer{layer}.{block}"
            conv(entries, f"{name}.conv1", planes, inplanes, 1)
            bn(entries, f"{name}.bn1", planes)
            conv(entries, f"{name}.conv2", planes, planes, 3)
            bn(entries, f"{name}.bn2", planes)
            conv(entries, f"{name}.conv3", planes * 4, planes, 1)
            bn(entries, f"{name}.bn3", planes * 4)
            if block == 0:
                conv(entries, f"{name}.downsample.0", planes * 4, inplanes, 1)
                bn(entries, f"{name}.downsample.1", planes * 4)
            inplanes = planes * 4


def released_aux(entries):
    conv(entries, "auxlayer.block.0", 256, 1024, 3)
    bn(entries, "auxlayer.block.1", 256)
    conv(entries, "auxlayer.block.4", NUM_CLASSES, 256, 1, bias=True)


def released_deeplabv3_resnet101():
    entries = {}
    released_resnet101_v1s(entries, "pretrained.")
    width = 256
    conv(entries, "head.aspp.b0.0", width, 2048, 1)
    bn(entries, "head.aspp.b0.1", width)
    for branch in ("b1", "b2", "b3"):
        conv(entries, f"head.aspp.{branch}.block.0", width, 2048, 3)
        bn(entries, f"head.aspp.{branch}.block.1", width)
    conv(entries, "head.aspp.b4.gap.1", width, 2048, 1)
    bn(entries, "head.aspp.b4.gap.2", width)
    conv(entries, "head.aspp.project.0", width, 5 * width, 1)
    bn(entries, "head.aspp.project.1", width)
    conv(entries, "head.block.0", width, width, 3)
    bn(entries, "head.block.1", width)
    conv(entries, "head.block.4", NUM_CLASSES, width, 1, bias=True)
    released_aux(entries)
    return entries


def released_pspnet_resnet101():
    entries = {}
    released_resnet101_v1s(entries, "pretrained.")
    for i in range(1, 5):
        conv(entries, f"head.psp.conv{i}.0", 512, 2048, 1)
        bn(entries, f"head.psp.conv{i}.1", 512)
    conv(entries, "head.block.0", 512, 4096, 3)
    bn(entries, "head.block.1", 512)
    conv(entries, "head.classifier", NUM_CLASSES, 512, 1, bias=True)
    released_aux(entries)
    return entries


def materialise(shapes):
    """Distinct values per tensor so that a swapped mapping would be caught."""
    state = {}
    for i, (name, shape) in enumerate(shapes.items()):
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(i, dtype=torch.long)
        else:
            state[name] = torch.full(shape, float(i))
    return state


@pytest.mark.parametrize(
    "model_name, released", [("deeplabv3_resnet101", released_deeplabv3_resnet101),
                             ("pspnet_resnet101", released_pspnet_resnet101)]
)
def test_released_teacher_loads_into_our_model(model_name, released):
    state = materialise(released())
    model = build_model(model_name, NUM_CLASSES)
    converted = teacher_state_dict(state, "released.pth")
    load_state_dict_checked(model, converted, "released.pth")  # strict: every name and shape must fit
    ours = model.state_dict()
    # The deep stem's separate modules land in timm's Sequential stem, bn3 in the stem's final norm.
    assert torch.equal(ours["backbone.conv1.0.weight"], state["pretrained.conv1.weight"])
    assert torch.equal(ours["backbone.conv1.4.running_var"], state["pretrained.bn2.running_var"])
    assert torch.equal(ours["backbone.conv1.6.weight"], state["pretrained.conv3.weight"])
    assert torch.equal(ours["backbone.bn1.bias"], state["pretrained.bn3.bias"])
    assert torch.equal(ours["backbone.layer3.22.conv2.weight"], state["pretrained.layer3.22.conv2.weight"])
    assert torch.equal(ours["aux_head.block.4.bias"], state["auxlayer.block.4.bias"])
    assert len(ours) == len(state)


def test_released_teacher_saved_from_ddp_loads():
    state = {f"module.{k}": v for k, v in materialise(released_pspnet_resnet101()).items()}
    model = build_model("pspnet_resnet101", NUM_CLASSES)
    load_state_dict_checked(model, teacher_state_dict(state, "ddp.pth"), "ddp.pth")


def test_wrong_architecture_is_one_line_error():
    state = materialise(released_pspnet_resnet101())
    model = build_model("deeplabv3_resnet101", NUM_CLASSES)
    with pytest.raises(CheckpointError, match="does not fit the model") as info:
        load_state_dict_checked(model, teacher_state_dict(state, "psp.pth"), "psp.pth")
    assert "\n" not in str(info.value)


def test_wrong_class_count_names_the_shape():
    state = materialise(released_deeplabv3_resnet101())
    model = build_model("deeplabv3_resnet101", 21)
    with pytest.raises(CheckpointError, match=r"head.block.4.weight has shape \(19, 256, 1, 1\)"):
        load_state_dict_checked(model, teacher_state_dict(state, "x.pth"), "x.pth")


def test_released_teacher_through_the_cli(tmp_path):
    """A released-format file (a plain state dict) works as --teacher-checkpoint of a real run."""
    teacher = build_model("deeplabv3_resnet18", 6)
    released = {}
    for key, value in teacher.state_dict().items():  # rename ours to the released names
        key = key.replace("aux_head.", "auxlayer.")
        for ours, theirs in (("backbone.conv1.0.", "pretrained.conv1."), ("backbone.conv1.1.", "pretrained.bn1."),
                             ("backbone.conv1.3.", "pretrained.conv2."), ("backbone.conv1.4.", "pretrained.bn2."),
                             ("backbone.conv1.6.", "pretrained.conv3."), ("backbone.bn1.", "pretrained.bn3."),
                             ("backbone.", "pretrained.")):
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        released[key] = value
    path = tmp_path / "deeplabv3_resnet18_released.pth"
    torch.save(released, path)
    rc = train.main(["--distill", "cwd", "--teacher-model", "deeplabv3_resnet18", "--teacher-checkpoint", str(path),
                     "--model", "deeplabv3_resnet18", "--max-iterations", "1", "--output-dir", str(tmp_path / "run"),
                     *TINY])
    assert rc == 0


def test_backbone_weights_in_released_and_timm_names(tmp_path):
    shapes = {}
    released_resnet101_v1s(shapes, "")
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048), (1000,)  # an ImageNet classifier, dropped
    released = materialise(shapes)
    model = build_model("deeplabv3_resnet101", 5)
    keys = set(model.backbone.state_dict())
    load_state_dict_checked(model.backbone, backbone_state_dict(released, keys, "r101.pth"), "r101.pth")
    assert torch.equal(model.backbone.bn1.weight, released["bn3.weight"])
    timm_names = dict(model.backbone.state_dict())
    other = build_model("deeplabv3_resnet101", 5)
    load_state_dict_checked(other.backbone, backbone_state_dict(timm_names, keys, "timm.pth"), "timm.pth")
    assert torch.equal(other.backbone.layer4[2].conv3.weight, model.backbone.layer4[2].conv3.weight)


def test_backbone_weights_flag(tmp_path):
    backbone = build_model("deeplabv3_resnet18", 6).backbone
    path = tmp_path / "resnet18.pth"
    torch.save(backbone.state_dict(), path)
    rc = train.main(["--backbone-weights", str(path), "--max-iterations", "1",
                     "--output-dir", str(tmp_path / "run"), *TINY])
    assert rc == 0
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    rc = train.main(["--backbone-weights", str(path), "--max-iterations", "1",
                     "--output-dir", str(tmp_path / "run2"), *TINY])
    assert rc == 2
