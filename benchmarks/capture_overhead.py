"""What feature capture costs: a CSKD training step with the maps captured by forward hooks
(cskd_kernels.capture_features) against the same step with the model returning its map itself.

    python -m benchmarks.capture_overhead [--batch 4] [--size 256] [--repeats 15]

DeepLabV3-ResNet18 student and teacher (python/cskd_train), CE + CWD + CSKDLoss, SGD. The two variants
run in alternation (so load from other jobs falls on both alike), medians after a warm-up. The map
captured is the head's 3x3 conv block output ("head.block.3"), the one the model returns as features.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from cskd_kernels import CSKDLoss, capture_features, cwd_loss  # noqa: E402
from cskd_train.models import build_model  # noqa: E402

FEATURES = "head.block.3"


def make_step(student, teacher, distill, optimizer, images, labels, captures=None):
    def step():
        with torch.no_grad():
            out_t = teacher(images)
        out_s = student(images)
        feat_s, feat_t = (out_s.features, out_t.features) if captures is None else (c.output for c in captures)
        logits = F.interpolate(out_s.logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
        loss = (F.cross_entropy(logits, labels) + 3 * cwd_loss(out_s.logits, out_t.logits, temperature=2.0)
                + distill(feat_s, feat_t).loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    student, teacher = build_model("deeplabv3_resnet18", 19), build_model("deeplabv3_resnet18", 19).eval()
    distill = CSKDLoss(128, 128)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(distill.parameters()), lr=1e-4, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 19, (args.batch, args.size, args.size))
    returned = make_step(student, teacher, distill, optimizer, images, labels)
    captures = (capture_features(student, FEATURES), capture_features(teacher, FEATURES))
    captured = make_step(student, teacher, distill, optimizer, images, labels, captures)
    times = {"returned": [], "captured": []}
    for i in range(args.warmup + args.repeats):
        for name, step in (("returned", returned), ("captured", captured)):
            started = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - started)
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    ratio = median["captured"] / median["returned"]
    print(f"batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, medians of {args.repeats}: "
          f"model returns its map {1000 * median['returned']:.1f} ms, captured by hooks "
          f"{1000 * median['captured']:.1f} ms, ratio {ratio:.4f}")
    return median


if __name__ == "__main__":
    main()
