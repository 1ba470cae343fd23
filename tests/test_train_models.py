"""The five segmentation models: output contract, widths, stride, and a short training run each."""

import pytest
import torch

import train_support  # noqa: F401  (puts cskd_train on the path)
from cskd_train import train
from cskd_train.models import MODEL_NAMES, build_model
from train_support import TINY, read_metrics

FEATURE_WIDTHS = {
    "deeplabv3_resnet18": 128,
    "deeplabv3_resnet101": 256,
    "pspnet_resnet18": 128,
    "pspnet_resnet101": 512,
    "deeplabv3_mobilenetv2": 128,
    "pspnet_mobilenetv2": 128,
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_outputs_at_stride_8_with_released_widths(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 56))
    assert out.logits.shape == (2, 7, 6, 7)
    assert out.features.shape == (2, FEATURE_WIDTHS[name], 6, 7)
    if name.endswith("mobilenetv2"):
        assert out.aux_logits is None  # the released MobileNetV2 models have no auxiliary head
    else:
        assert out.aux_logits.shape == (2, 7, 6, 7)


def test_resnet_has_the_released_deep_stem_and_dilations():
    backbone = build_model("deeplabv3_resnet101", 3).backbone
    stem = [m for m in backbone.conv1 if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in stem] == [(3, 64, 2), (64, 64, 1), (64, 128, 1)]
    assert backbone.layer3[0].conv2.dilation == (1, 1) and backbone.layer3[1].conv2.dilation == (2, 2)
    assert backbone.layer4[0].conv2.dilation == (2, 2) and backbone.layer4[1].conv2.dilation == (4, 4)
    # Plain 1x1 downsampling (released v1s), not timm's average-pool "d" variant.
    assert isinstance(backbone.layer2[0].downsample[0], torch.nn.Conv2d)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("deeplabv3_resnet50", 3)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_short_training_run(name, tmp_path):
    out = tmp_path / "run"
    rc = train.main(["--model", name, "--max-iterations", "2", "--log-every", "1", "--val-every", "2",
                     "--output-dir", str(out), *TINY])
    assert rc == 0
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert 0.0 <= rows[-1]["miou"] <= 1.0
    assert (out / "last.pt").exists() and (out / "best.pt").exists() and (out / "config.json").exists()
