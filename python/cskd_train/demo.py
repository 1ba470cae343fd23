"""cskd-demo: teacher, baseline student and CSKD student on the synthetic scenes, then a table.

On 2 CPU cores it trains (defaults):
  1. the teacher, DeepLabV3-ResNet18, for --teacher-iterations;
  2. the baseline student, DeepLabV3-MobileNetV2, with CE (+ aux) only;
  3. the CSKD student, the same network and schedule, with the released
     objective (CE + 3 CWD(T=2) + CSKDLoss(T=2, 0.3, 0.8, grid 5x5));
then evaluates all three on the synthetic validation scenes and times one
step (forward + backward) of the CSKD loss at the demo's feature shapes with
the fused kernels against the released formulation (cskd_kernels.released).
Results go to OUTPUT_DIR/results.json and the table to stdout.
"""

import argparse
import json
import os
import sys
import time

import torch

from cskd_train import train


TIMING_SHAPES = {
    # name: (spatial size of the feature maps, repeats); "demo" is the demo's own maps,
    # "cityscapes" the released configuration (512x1024 crops, output stride 8, 8 images per GPU).
    "demo": (None, 20),
    "cityscapes": ((64, 128), 3),
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="cskd-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--teacher-model", default="deeplabv3_resnet18")
    p.add_argument("--student-model", default="deeplabv3_mobilenetv2")
    p.add_argument("--teacher-iterations", type=int, default=1000)
    p.add_argument("--student-iterations", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=48, help="synthetic image side = crop side")
    p.add_argument("--train-images", type=int, default=512)
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--timing-shapes", nargs="+", choices=sorted(TIMING_SHAPES), default=["demo", "cityscapes"],
                   help="feature-map shapes at which the CSKD loss is timed")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def common_flags(args):
    return [
        "--dataset", "synthetic", "--seed", str(args.seed), "--batch-size", str(args.batch_size),
        "--crop-size", str(args.image_size), str(args.image_size), "--synthetic-size", str(args.image_size),
        "--synthetic-images", str(args.train_images), "--synthetic-val-images", str(args.val_images),
        "--val-batch-size", "16", "--lr", str(args.lr), "--log-every", "10", "--no-plot",
        # Scenes are already crop-sized: scaling them down would mostly train on padding.
        "--no-scale-aug",
        *(["--no-progress"] if args.no_progress else []),
    ]


def run_training(name, flags, output_dir):
    print(f"\n== {name} ==", flush=True)
    started = time.perf_counter()
    rc = train.main([*flags, "--output-dir", output_dir])
    if rc != 0:
        raise SystemExit(f"cskd-demo: training the {name} failed (exit code {rc})")
    seconds = time.perf_counter() - started
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    final_miou = [r["miou"] for r in rows if "miou" in r][-1]
    return {"miou": final_miou, "seconds": seconds}


def time_loss_step(loss_fn, feat_s, feat_t, repeats):
    """Median seconds of one forward + backward of loss_fn(feat_s, feat_t)."""
    times = []
    for i in range(repeats + 2):
        student = feat_s.clone().requires_grad_(True)
        started = time.perf_counter()
        out = loss_fn(student, feat_t)
        (out.loss if hasattr(out, "loss") else out).backward()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


def distillation_timing(args, student_channels, teacher_channels):
    """Per-step time of the CSKD loss: fused kernels (cskd_kernels.CSKDLoss) vs the released formulation."""
    import cskd_kernels
    import cskd_kernels.released as released

    released_loss = getattr(released, "CSKDLoss", None)
    rows = []
    for name in args.timing_shapes:
        size, repeats = TIMING_SHAPES[name]
        if size is None:
            size = (args.image_size // 8, args.image_size // 8)
        channels = (student_channels, teacher_channels) if name == "demo" else (128, 256)
        generator = torch.Generator().manual_seed(args.seed)
        feat_s = torch.randn(args.batch_size, channels[0], *size, generator=generator)
        feat_t = torch.randn(args.batch_size, channels[1], *size, generator=generator)
        row = {"name": name, "shape_student": list(feat_s.shape), "shape_teacher": list(feat_t.shape)}
        fused = cskd_kernels.CSKDLoss(*channels)
        row["fused_ms"] = 1000 * time_loss_step(fused, feat_s, feat_t, repeats)
        row["released_ms"] = None
        if released_loss is not None:
            row["released_ms"] = 1000 * time_loss_step(released_loss(*channels), feat_s, feat_t, repeats)
        rows.append(row)
    return rows


def format_table(results, timing):
    lines = [
        "",
        f"{'model':<46} {'val mIoU':>9} {'train time':>11}",
        f"{'-' * 46} {'-' * 9} {'-' * 11}",
    ]
    for label, key in (("teacher", "teacher"), ("baseline student (CE)", "baseline"), ("CSKD student", "cskd")):
        entry = results[key]
        lines.append(f"{label + ' ' + entry['model']:<46} {entry['miou']:>9.4f} {entry['seconds']:>10.0f}s")
    lines.append("")
    lines.append("CSKD loss, one forward + backward step (median), fused kernels vs released formulation:")
    for row in timing:
        shapes = f"student {tuple(row['shape_student'])}, teacher {tuple(row['shape_teacher'])}"
        released = "not in cskd_kernels.released" if row["released_ms"] is None else (
            f"{row['released_ms']:9.2f} ms released ({row['released_ms'] / row['fused_ms']:.1f}x)")
        lines.append(f"  {row['name']:<10} {shapes}: {row['fused_ms']:9.2f} ms fused, {released}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    common = common_flags(args)
    out = args.output_dir
    teacher_dir = os.path.join(out, "teacher")
    results = {
        "teacher": run_training(
            "teacher", [*common, "--model", args.teacher_model, "--max-iterations", str(args.teacher_iterations),
                        "--val-every", str(args.teacher_iterations)], teacher_dir),
    }
    student = [*common, "--model", args.student_model, "--max-iterations", str(args.student_iterations),
               "--val-every", str(args.student_iterations)]
    results["baseline"] = run_training("baseline student", [*student, "--distill", "none"],
                                       os.path.join(out, "baseline"))
    results["cskd"] = run_training(
        "CSKD student",
        [*student, "--distill", "cskd", "--teacher-model", args.teacher_model,
         "--teacher-checkpoint", os.path.join(teacher_dir, "last.pt")],
        os.path.join(out, "cskd"),
    )
    results["teacher"]["model"] = args.teacher_model
    results["baseline"]["model"] = results["cskd"]["model"] = args.student_model
    timing = distillation_timing(args, model_feature_width(args.student_model), model_feature_width(args.teacher_model))
    total = time.perf_counter() - started
    print(format_table(results, timing))
    print(f"\ntotal demo time: {total:.0f} s on {torch.get_num_threads()} thread(s)")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"results": results, "loss_timing": timing, "total_seconds": total, "args": vars(args)}, handle,
                  indent=2)
    return 0


def model_feature_width(model_name):
    from cskd_train.models import build_model, feature_channels

    return feature_channels(build_model(model_name, 2))


if __name__ == "__main__":
    sys.exit(main())
