"""Segmentation networks of the released CSKD/CIRKD code, on timm backbones.

Every model returns ``(logits, aux_logits, features)`` like the released code:
``features`` is the map after the head's 3x3 conv block (before the
classifier), ``aux_logits`` comes from an FCN head on layer3 (``None`` for the
MobileNetV2 model, which has no auxiliary head in the released code). All
outputs are at output stride 8; callers upsample the logits to the label size.

The ResNets are the released "v1s" variant: a deep stem 3->64->64->128 with
plain (not average-pooled) 1x1 downsampling, dilation 2 in layer3 and 4 in
layer4 with the first block of each stage at the previous dilation. timm's
``ResNet(stem_type="deep", stem_width=64, output_stride=8)`` is exactly that
network, with different parameter names (see ``cskd_train.convert``).
Backbones are never downloaded: ``pretrained=False`` always, and ImageNet
weights load from a local file.
"""

from typing import NamedTuple, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, ResNet


class SegmentationOutput(NamedTuple):
    logits: torch.Tensor
    aux_logits: Optional[torch.Tensor]
    features: torch.Tensor


def conv_bn_relu(in_channels, out_channels, kernel_size=1, dilation=1):
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FCNHead(nn.Module):
    """The auxiliary head on layer3 (released ``_FCNHead``: ``block.0/1/4``)."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        inter_channels = in_channels // 4
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter_channels, num_classes, 1),
        )

    def forward(self, x):
        return self.block(x)


class ASPPConv(nn.Module):
    def __init__(self, in_channels, out_channels, rate):
        super().__init__()
        self.block = conv_bn_relu(in_channels, out_channels, 3, dilation=rate)

    def forward(self, x):
        return self.block(x)


class ASPPPooling(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels))

    def forward(self, x):
        return F.interpolate(self.gap(x), x.shape[2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    def __init__(self, in_channels, out_channels, rates=(12, 24, 36)):
        super().__init__()
        self.b0 = conv_bn_relu(in_channels, out_channels)
        self.b1 = ASPPConv(in_channels, out_channels, rates[0])
        self.b2 = ASPPConv(in_channels, out_channels, rates[1])
        self.b3 = ASPPConv(in_channels, out_channels, rates[2])
        self.b4 = ASPPPooling(in_channels, out_channels)
        self.project = nn.Sequential(*conv_bn_relu(5 * out_channels, out_channels), nn.Dropout(0.5))

    def forward(self, x):
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))


class DeepLabHead(nn.Module):
    """ASPP, then ``block`` = 3x3 conv-BN-ReLU-dropout (features) and the 1x1 classifier (``block.4``)."""

    def __init__(self, in_channels, num_classes, channels):
        super().__init__()
        self.aspp = ASPP(in_channels, channels)
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, x):
        features = self.block[0:4](self.aspp(x))
        return self.block[4](features), features


class PyramidPooling(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        out_channels = in_channels // 4
        self.bins = (1, 2, 3, 6)
        self.conv1 = conv_bn_relu(in_channels, out_channels)
        self.conv2 = conv_bn_relu(in_channels, out_channels)
        self.conv3 = conv_bn_relu(in_channels, out_channels)
        self.conv4 = conv_bn_relu(in_channels, out_channels)

    def forward(self, x):
        size = x.shape[2:]
        pooled = [
            F.interpolate(conv(F.adaptive_avg_pool2d(x, bins)), size, mode="bilinear", align_corners=True)
            for conv, bins in zip((self.conv1, self.conv2, self.conv3, self.conv4), self.bins)
        ]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Module):
    def __init__(self, in_channels, num_classes, channels):
        super().__init__()
        self.psp = PyramidPooling(in_channels)
        self.block = nn.Sequential(
            nn.Conv2d(in_channels * 2, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        features = self.block(self.psp(x))
        return self.classifier(features), features


def resnet_v1s(depth):
    """The released dilated deep-stem ResNet (output stride 8), without the classifier."""
    block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 101: (Bottleneck, [3, 4, 23, 3])}[depth]
    return ResNet(
        block, layers, stem_type="deep", stem_width=64, output_stride=8, num_classes=0, global_pool=""
    )


class ResNetSegmentation(nn.Module):
    """DeepLabV3 or PSPNet on a dilated ResNet, with the auxiliary FCN head on layer3."""

    def __init__(self, head, depth, num_classes):
        super().__init__()
        self.backbone = resnet_v1s(depth)
        c3, c4 = (256, 512) if depth == 18 else (1024, 2048)
        width = HEAD_WIDTHS[(head, depth)]
        self.head = DeepLabHead(c4, num_classes, width) if head == "deeplabv3" else PSPHead(c4, num_classes, width)
        self.aux_head = FCNHead(c3, num_classes)
        self.feature_channels = width

    def forward(self, x):
        b = self.backbone
        x = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        c3 = b.layer3(b.layer2(b.layer1(x)))
        logits, features = self.head(b.layer4(c3))
        return SegmentationOutput(logits, self.aux_head(c3), features)


class MobileNetV2Segmentation(nn.Module):
    """DeepLabV3 (ASPP width 128) or PSPNet (width 128) on a dilated MobileNetV2 (320 channels at stride 8).

    No aux head, as in the released ``deeplab_mobile`` and ``psp_mobile``. timm's
    ``mobilenetv2_100`` at output stride 8 is the released dilated MobileNetV2
    layer for layer (ReLU6; the first block of a dilated stage keeps the
    previous dilation), with other names (cskd_train.convert).
    """

    def __init__(self, head, num_classes):
        super().__init__()
        self.backbone = timm.create_model(
            "mobilenetv2_100", pretrained=False, features_only=True, output_stride=8, out_indices=(4,)
        )
        channels = self.backbone.feature_info.channels()[-1]
        self.head = DeepLabHead(channels, num_classes, 128) if head == "deeplabv3" else PSPHead(channels, num_classes, 128)
        self.feature_channels = 128

    def forward(self, x):
        logits, features = self.head(self.backbone(x)[-1])
        return SegmentationOutput(logits, None, features)


# Feature widths of the released heads (SPEC.md section 7).
HEAD_WIDTHS = {("deeplabv3", 18): 128, ("deeplabv3", 101): 256, ("pspnet", 18): 128, ("pspnet", 101): 512}

MODEL_NAMES = (
    "deeplabv3_resnet18",
    "deeplabv3_resnet101",
    "pspnet_resnet18",
    "pspnet_resnet101",
    "deeplabv3_mobilenetv2",
    "pspnet_mobilenetv2",
)


def build_model(name, num_classes, *, sync_bn=False):
    """A model by name (one of MODEL_NAMES), randomly initialised; nothing is downloaded."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    head, backbone = name.split("_")
    if backbone == "mobilenetv2":
        model = MobileNetV2Segmentation(head, num_classes)
    else:
        model = ResNetSegmentation(head, int(backbone.removeprefix("resnet")), num_classes)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def feature_channels(model):
    return getattr(model, "module", model).feature_channels
