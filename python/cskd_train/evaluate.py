"""Evaluation: per-class IoU and mIoU with the ignore label respected, whole-image or sliding-window.

``cskd-eval --dataset D --model M --checkpoint best.pt`` prints a table of
per-class IoU and a final line "mIoU: X".
"""

import sys

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from cskd_train import distributed
from cskd_train.cli import OneLineParser
from cskd_train.checkpoint import CheckpointError
from cskd_train.convert import load_network_file
from cskd_train.datasets import DATASET_NAMES, IGNORE_INDEX, NUM_CLASSES, SYNTHETIC_CLASSES, DatasetError, build_dataset
from cskd_train.models import MODEL_NAMES, build_model
from cskd_train.precision import PRECISIONS, PrecisionError, autocast, check_precision, resolve_device
from cskd_train.predictions import FORMATS, PredictionError, PredictionWriter, check_prediction_dir
from cskd_train.transforms import NORMALIZATIONS, EvalTransform, Transformed


def predict_whole(model, images):
    logits = model(images).logits
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)


def window_starts(length, crop, stride):
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)  # the last window is flush with the border
    return starts


def predict_sliding(model, images, crop_size, stride=None):
    """Logits at full resolution from overlapping crops (stride 2/3 of the crop, as released), averaged."""
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride or (max(1, crop_h * 2 // 3), max(1, crop_w * 2 // 3))
    batch, _, height, width = images.shape
    # Images smaller than the crop are padded (with 0, the normalised mean) and the pad cut off again.
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h))
    full_h, full_w = padded.shape[-2:]
    total, count = None, torch.zeros(1, 1, full_h, full_w, device=images.device)
    for top in window_starts(full_h, crop_h, stride_h):
        for left in window_starts(full_w, crop_w, stride_w):
            window = padded[:, :, top : top + crop_h, left : left + crop_w]
            logits = predict_whole(model, window)
            if total is None:
                total = torch.zeros(batch, logits.shape[1], full_h, full_w, device=images.device)
            total[:, :, top : top + crop_h, left : left + crop_w] += logits
            count[:, :, top : top + crop_h, left : left + crop_w] += 1
    return (total / count)[:, :, :height, :width]


def iou_from_confusion(confusion):
    """Per-class IoU (NaN for classes absent from both prediction and labels) and their mean."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, float("nan")))
    return iou, float(iou.nanmean())


@torch.no_grad()
def evaluate(model, loader, num_classes, context, *, mode="whole", crop_size=None, on_predictions=None,
             precision="fp32"):
    """Returns (miou, per-class IoU list); the confusion matrix is summed over ranks.

    ``precision`` (fp32, bf16, fp16): the forwards under autocast of that dtype, as in training.
    ``on_predictions`` (optional) receives each batch's predicted train ids (B, H, W), in loader order.
    """
    was_training = model.training
    model.eval()
    metric = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, sync_on_compute=False)
    metric = metric.to(context.device)
    for images, labels in loader:
        images, labels = images.to(context.device), labels.to(context.device)
        with autocast(precision, context.device):
            if mode == "slide":
                logits = predict_sliding(model, images, crop_size)
            else:
                logits = predict_whole(model, images)
        predictions = logits.argmax(1)
        metric.update(predictions, labels)
        if on_predictions is not None:
            on_predictions(predictions)
    confusion = distributed.sum_across_ranks(metric.compute(), context)
    model.train(was_training)
    iou, miou = iou_from_confusion(confusion)
    return miou, iou.tolist()


class RankShard(torch.utils.data.Dataset):
    """Every world_size-th item from rank on: each item is evaluated exactly once across ranks."""

    def __init__(self, dataset, context):
        self.dataset = dataset
        self.indices = list(range(context.rank, len(dataset), context.world_size))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def eval_loader(dataset, normalization, context, batch_size=1, workers=0):
    shard = RankShard(Transformed(dataset, EvalTransform(normalization)), context)
    return torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)


def class_names(dataset_name, num_classes):
    if dataset_name == "synthetic":
        return list(SYNTHETIC_CLASSES)
    return [str(i) for i in range(num_classes)]


def format_report(miou, iou, names):
    lines = [f"{'class':>12}  IoU"]
    lines += [f"{name:>12}  {'n/a' if value != value else f'{value:.4f}'}" for name, value in zip(names, iou)]
    lines.append(f"mIoU: {miou:.4f}")
    return "\n".join(lines)


def parse_args(argv):
    parser = OneLineParser(prog="cskd-eval", description="Evaluate a segmentation checkpoint (mIoU).")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="synthetic")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", choices=MODEL_NAMES, required=True)
    parser.add_argument("--checkpoint", required=True, help="cskd-train last.pt/best.pt or a released state dict")
    parser.add_argument("--mode", choices=("whole", "slide"), default="whole")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), default=(512, 1024))
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="imagenet")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else the CPU), cpu, cuda[:N]")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16 / fp16: the forwards under torch.autocast of that dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--synthetic-size", type=int, default=64)
    parser.add_argument("--synthetic-images", type=int, default=None)
    parser.add_argument("--save-predictions", default=None, metavar="DIR",
                        help="write one PNG per image into DIR (new or empty), named after the image")
    parser.add_argument("--prediction-format", choices=FORMATS, default="train-ids",
                        help="train-ids; label-ids (Cityscapes: the official labelIds, for the evaluation server); "
                             "color (a palette PNG in the dataset's colours)")
    return parser.parse_args(argv)


def run(args):
    context = distributed.setup(resolve_device(args.device))
    try:
        dataset = build_dataset(
            args.dataset, args.split, root=args.data_root, seed=args.seed,
            synthetic_size=args.synthetic_size, synthetic_images=args.synthetic_images,
        )
        num_classes = NUM_CLASSES[args.dataset]
        model = build_model(args.model, num_classes)
        load_network_file(model, args.model, args.checkpoint, "--model")
        model.to(context.device)
        loader = eval_loader(dataset, args.normalization, context, args.batch_size, args.workers)
        writer = None
        if args.save_predictions:
            writer = PredictionWriter(args.save_predictions, args.prediction_format, args.dataset, dataset,
                                      loader.dataset.indices)
        miou, iou = evaluate(model, loader, num_classes, context, mode=args.mode, crop_size=args.crop_size,
                             on_predictions=writer, precision=args.precision)
        if context.is_main:
            print(format_report(miou, iou, class_names(args.dataset, num_classes)))
        return 0
    finally:
        distributed.teardown(context)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.save_predictions:
            check_prediction_dir(args.save_predictions)  # before any work
        check_precision(args.precision, resolve_device(args.device))
        return run(args)
    except (CheckpointError, DatasetError, PredictionError, PrecisionError, distributed.DeviceError) as error:
        print(f"cskd-eval: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
