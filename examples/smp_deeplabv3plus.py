"""CSKD with segmentation_models_pytorch: a DeepLabV3+ ResNet-18 student from a DeepLabV3+ ResNet-34 teacher.

Both decoders give 256-channel maps at 1/4 of the image (``decoder``), taken
with ``capture_features``. ``encoder_weights=None``: nothing downloaded.
Random images and labels:

    python examples/smp_deeplabv3plus.py --steps 20
"""

import argparse

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from cskd_kernels import CSKDLoss, capture_features, cwd_loss


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image side (a multiple of 16)")
    parser.add_argument("--classes", type=int, default=6)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    teacher = smp.DeepLabV3Plus("resnet34", encoder_weights=None, classes=args.classes).eval()
    student = smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=args.classes)
    distill = CSKDLoss(256, 256, grid=(5, 5))
    optimizer = torch.optim.SGD(list(student.parameters()) + list(distill.parameters()), lr=0.01, momentum=0.9)
    losses = []
    with capture_features(student, "decoder") as feat_s, capture_features(teacher, "decoder") as feat_t:
        for step in range(args.steps):
            images = torch.randn(args.batch, 3, args.size, args.size)
            labels = torch.randint(0, args.classes, (args.batch, args.size, args.size))
            with torch.no_grad():
                logits_t = teacher(images)
            logits_s = student(images)
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
