"""cskd-ablate: the paper's ablation on the built-in synthetic scenes, over several seeds.

One teacher (DeepLabV3-ResNet18), then for each seed a DeepLabV3-MobileNetV2
student per objective, each from that same teacher:

    CE          cross-entropy only (the baseline)
    CWD         + 3 CWD(T=2) on the logits
    CSKD        + CSKDLoss (CAM and 5x5-grid PAM, CKA): the released objective
    CAM only    + CSKDLoss with lambda_pam = 0
    PAM only    + CSKDLoss with lambda_cam = 0
    CSKD MSE    + CSKDLoss(similarity="mse"), the released MSE variant

Prints each objective's validation mIoU (mean +- standard deviation over the
seeds) and its paired difference against CWD (same seed, same data) with a
95% Student-t interval; writes results.json and ablation.png into
--output-dir. Scenes are 120 x 120 by default, so that the students' 15 x 15
feature maps give the 5 x 5 grid cells of 3 x 3 positions (at 48 x 48, as in
cskd-demo, the maps are 6 x 6 and most cells hold one or two positions).
"""

import json
import math
import os
import sys
import time

import torch

from cskd_train.cli import OneLineParser
from cskd_train.demo import common_flags, run_training
from cskd_train.precision import PRECISIONS

OBJECTIVES = {
    "CE": ["--distill", "none"],
    "CWD": ["--distill", "cwd"],
    "CSKD": ["--distill", "cskd"],
    "CAM only": ["--distill", "cskd", "--lambda-pam", "0"],
    "PAM only": ["--distill", "cskd", "--lambda-cam", "0"],
    "CSKD MSE": ["--distill", "cskd", "--similarity", "mse"],
}
REFERENCE = "CWD"  # every objective is compared with the logit distillation alone, seed by seed

# Two-sided 95% quantiles of Student's t, by degrees of freedom (1 to 30); 1.96 beyond.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def parse_args(argv=None):
    p = OneLineParser(prog="cskd-ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="students per objective (seeds 0, 1, ...)")
    p.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    p.add_argument("--output-dir", default="runs/ablation")
    p.add_argument("--teacher-model", default="deeplabv3_resnet18")
    p.add_argument("--student-model", default="deeplabv3_mobilenetv2")
    p.add_argument("--teacher-iterations", type=int, default=300)
    p.add_argument("--student-iterations", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=120, help="synthetic image side = crop side")
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--val-images", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error(f"--seeds must be at least 2 for a standard deviation and an interval, got {args.seeds}")
    if REFERENCE not in args.objectives:
        p.error(f"--objectives must include {REFERENCE}, the objective every other is compared with")
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_interval(values, reference):
    """Mean of the paired differences values - reference and its 95% Student-t interval (low, high)."""
    differences = [v - r for v, r in zip(values, reference)]
    mean, std = mean_std(differences)
    df = len(differences) - 1
    half = (T_975[df - 1] if df <= len(T_975) else 1.96) * std / math.sqrt(len(differences))
    return mean, (mean - half, mean + half)


def summarise(mious):
    """{objective: {"mean", "std", "diff", "interval"}} from {objective: [mIoU per seed]}."""
    rows = {}
    for name, values in mious.items():
        mean, std = mean_std(values)
        row = {"mean": mean, "std": std}
        if name != REFERENCE:
            row["diff"], row["interval"] = paired_interval(values, mious[REFERENCE])
        rows[name] = row
    return rows


def format_table(rows, seeds):
    lines = [f"validation mIoU over {seeds} seeds; paired difference against {REFERENCE} (same seed), 95% interval",
             f"{'objective':<10} {'mIoU mean +- std':>18}  {'vs ' + REFERENCE:>10}  {'95% interval':>20}"]
    for name, row in rows.items():
        diff = "" if "diff" not in row else f"{row['diff']:+10.4f}  [{row['interval'][0]:+.4f}, {row['interval'][1]:+.4f}]"
        lines.append(f"{name:<10} {row['mean']:>9.4f} +- {row['std']:.4f}  {diff}")
    return "\n".join(lines)


def plot(mious, rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(mious)
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar(range(len(names)), [rows[n]["mean"] for n in names], yerr=[rows[n]["std"] for n in names],
             color="#9ecae1", capsize=4)
    for i, name in enumerate(names):
        axes.scatter([i] * len(mious[name]), mious[name], color="black", s=12, zorder=3)
    axes.set_xticks(range(len(names)), names)
    axes.set_ylabel("validation mIoU")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = args.output_dir
    teacher_dir = os.path.join(out, "teacher")
    args.seed = 0
    run_training("teacher", [*common_flags(args), "--model", args.teacher_model, "--max-iterations",
                             str(args.teacher_iterations), "--val-every", str(args.teacher_iterations)], teacher_dir)
    teacher = ["--teacher-model", args.teacher_model, "--teacher-checkpoint", os.path.join(teacher_dir, "last.pt")]
    mious = {name: [] for name in args.objectives}
    for seed in range(args.seeds):
        args.seed = seed
        student = [*common_flags(args), "--model", args.student_model, "--max-iterations",
                   str(args.student_iterations), "--val-every", str(args.student_iterations)]
        for name in args.objectives:
            flags = OBJECTIVES[name] + (teacher if name != "CE" else [])
            slug = name.lower().replace(" ", "_")
            result = run_training(f"{name}, seed {seed}", [*student, *flags], os.path.join(out, f"{slug}_seed{seed}"))
            mious[name].append(result["miou"])
    rows = summarise(mious)
    seconds = time.perf_counter() - started
    table = format_table(rows, args.seeds)
    print("\n" + table)
    print(f"\ntotal: {seconds:.0f} s wall on {torch.get_num_threads()} thread(s)")
    plot(mious, rows, os.path.join(out, "ablation.png"),
         f"{args.student_model} from {args.teacher_model}, {args.image_size}x{args.image_size} scenes, "
         f"{args.seeds} seeds")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"mious": mious, "summary": rows, "seconds": seconds, "args": vars(args)}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
