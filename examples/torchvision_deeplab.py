"""CSKD in a plain PyTorch loop with torchvision's segmentation models.

Teacher: DeepLabV3-ResNet50 (features at 1/8 of the image); student:
DeepLabV3-MobileNetV3-Large (features at 1/16). The distilled maps are the
outputs of each head's 3x3 conv block (``classifier.3``, 256 channels), taken
with ``capture_features``; ``resize="student"`` brings the student's map to
the teacher's size. Random images and labels, no weights downloaded:

    python examples/torchvision_deeplab.py --steps 20
"""

import argparse

import torch
import torch.nn.functional as F
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, deeplabv3_resnet50

from cskd_kernels import CSKDLoss, capture_features, cwd_loss


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--classes", type=int, default=6)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    teacher = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=args.classes).eval()
    student = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=args.classes)
    distill = CSKDLoss(256, 256, grid=(5, 5), resize="student")
    # The loss module's gammas train with the student (under DDP: wrap it with the student, or in one module).
    optimizer = torch.optim.SGD(list(student.parameters()) + list(distill.parameters()), lr=0.01, momentum=0.9)
    losses = []
    with capture_features(student, "classifier.3") as feat_s, capture_features(teacher, "classifier.3") as feat_t:
        for step in range(args.steps):
            images = torch.randn(args.batch, 3, args.size, args.size)
            labels = torch.randint(0, args.classes, (args.batch, args.size, args.size))
            with torch.no_grad():
                logits_t = teacher(images)["out"]
            logits_s = student(images)["out"]
            parts = distill(feat_s.output, feat_t.output)
            loss = (F.cross_entropy(logits_s, labels) + 3 * cwd_loss(logits_s, logits_t, temperature=2.0)
                    + parts.loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append({"loss": loss.item(), "cam": parts.cam.item(), "pam": parts.pam.item()})
            print(f"step {step + 1}: loss {loss.item():.4f} (CSKD cam {parts.cam.item():.4f}, "
                  f"pam {parts.pam.item():.4f})")
    return losses


if __name__ == "__main__":
    main()
