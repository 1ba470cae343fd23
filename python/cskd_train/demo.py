"""cskd-demo: teacher, baseline student and CSKD student on the synthetic scenes, then a table.

On 2 CPU cores it trains (defaults):
  1. the teacher, DeepLabV3-ResNet18, for --teacher-iterations;
  2. the baseline student, DeepLabV3-MobileNetV2, with CE (+ aux) only;
  3. the CSKD student, the same network and schedule, with the released
     objective (CE + 3 CWD(T=2) + CSKDLoss(T=2, 0.3, 0.8, grid 5x5));
then evaluates all three on the synthetic validation scenes and times one
step (forward + backward) of the CSKD loss with the fused kernels
(cskd_kernels.CSKDLoss) against the released formulation
(cskd_kernels.released.cskd_loss), at the demo's feature shapes and at the
released Cityscapes shapes, and the loss's share of one whole training step
(teacher forward + student forward and backward) at the demo's shapes.
Results go to OUTPUT_DIR/results.json and the table to stdout.

One thread by default: at these small shapes two intra-op threads gain little
on an idle machine and thrash as soon as anything else runs (measured on the
shared 2-core development machine: 100 teacher iterations took 25 s with one
thread, 305 s with two).
"""

import json
import os
import sys
import time

import torch
import torch.nn as nn

import cskd_kernels
import cskd_kernels.released as released
from cskd_train import train
from cskd_train.cli import OneLineParser
from cskd_train.datasets import NUM_CLASSES
from cskd_train.precision import PRECISIONS, autocast


TIMING_SHAPES = {
    # name: (spatial size of the feature maps, warm-up steps, timed steps); "demo" is the demo's own
    # maps, "cityscapes" the released configuration (512x1024 crops, output stride 8, 8 images per GPU,
    # 128/256 channels), where one step of either takes about 3 s of one core.
    "demo": (None, 2, 20),
    "cityscapes": ((64, 128), 1, 3),
}
# Both formulations run with the same non-zero gammas, so the attention branches feed the loss
# (with the initial gamma = 0 they would still be computed, but the comparison would hide nothing).
GAMMA = 0.1


def parse_args(argv):
    p = OneLineParser(prog="cskd-demo", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: more thrash on a busy machine at these small shapes)")
    p.add_argument("--timing-shapes", nargs="+", choices=sorted(TIMING_SHAPES), default=["demo", "cityscapes"],
                   help="feature-map shapes at which the CSKD loss is timed")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="auto", help="of the three trainings: auto (CUDA when available), cpu, cuda[:N]")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="of the three trainings (the loss timings stay float32)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def common_flags(args):
    return [
        "--dataset", "synthetic", "--seed", str(args.seed), "--batch-size", str(args.batch_size),
        "--crop-size", str(args.image_size), str(args.image_size), "--synthetic-size", str(args.image_size),
        "--synthetic-images", str(args.train_images), "--synthetic-val-images", str(args.val_images),
        "--val-batch-size", "16", "--lr", str(args.lr), "--log-every", "10", "--no-plot",
        "--device", args.device, "--precision", args.precision,
        # Scenes are already crop-sized: scaling them down would mostly train on padding.
        "--no-scale-aug",
        *(["--no-progress"] if args.no_progress else []),
    ]


def run_training(name, flags, output_dir):
    print(f"\n== {name} ==", flush=True)
    started = time.perf_counter()
    # Each demo run starts over: --overwrite replaces the previous demo's run in the same directory.
    rc = train.main([*flags, "--output-dir", output_dir, "--overwrite"])
    if rc != 0:
        raise SystemExit(f"cskd-demo: training the {name} failed (exit code {rc})")
    seconds = time.perf_counter() - started
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    final_miou = [r["miou"] for r in rows if "miou" in r][-1]
    return {"miou": final_miou, "seconds": seconds}


def median_seconds(steps, warmup, repeats):
    """Median wall seconds of each callable in `steps` (a dict), over `repeats` calls after `warmup`
    untimed ones; the callables take turns, so load from other jobs falls on all of them alike."""
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def loss_step(loss_fn, feat_s, feat_t, precision="fp32"):
    """One forward + backward of loss_fn(feat_s, feat_t) (a CSKDOutput or a tensor), as a callable; the forward
    under cskd_train.precision.autocast(precision) (bf16: give it the bfloat16 features autocast makes)."""
    def step():
        with autocast(precision, feat_s.device):
            out = loss_fn(feat_s.clone().requires_grad_(True), feat_t)
        (out.loss if hasattr(out, "loss") else out).backward()

    return step


class ReleasedCSKDLoss(nn.Module):
    """cskd_kernels.released.cskd_loss with its two gammas held as parameters, called like CSKDLoss."""

    def __init__(self):
        super().__init__()
        self.gamma_cam = nn.Parameter(torch.full((1,), GAMMA))
        self.gamma_pam = nn.Parameter(torch.full((1,), GAMMA))

    def forward(self, feat_s, feat_t):
        return released.cskd_loss(feat_s, feat_t, self.gamma_cam, self.gamma_pam)


def with_timing_gammas(loss):
    """``loss`` (a CSKDLoss) with both gammas set to GAMMA in place, so both attention branches count."""
    with torch.no_grad():
        loss.gamma_cam.fill_(GAMMA)
        loss.gamma_pam.fill_(GAMMA)
    return loss


def fused_cskd_loss(student_channels, teacher_channels):
    return with_timing_gammas(cskd_kernels.CSKDLoss(student_channels, teacher_channels))


def distillation_timing(args, student_channels, teacher_channels):
    """Per-step time of the CSKD loss: fused kernels (cskd_kernels.CSKDLoss) vs the released formulation."""
    rows = []
    for name in args.timing_shapes:
        size, warmup, repeats = TIMING_SHAPES[name]
        if size is None:
            size = (args.image_size // 8, args.image_size // 8)
        channels = (student_channels, teacher_channels) if name == "demo" else (128, 256)
        generator = torch.Generator().manual_seed(args.seed)
        feat_s = torch.randn(args.batch_size, channels[0], *size, generator=generator)
        feat_t = torch.randn(args.batch_size, channels[1], *size, generator=generator)
        row = {"name": name, "shape_student": list(feat_s.shape), "shape_teacher": list(feat_t.shape),
               "steps": repeats}
        medians = median_seconds({"fused": loss_step(fused_cskd_loss(*channels), feat_s, feat_t),
                                  "released": loss_step(ReleasedCSKDLoss(), feat_s, feat_t)}, warmup, repeats)
        row.update({f"{kind}_ms": 1000 * seconds for kind, seconds in medians.items()})
        rows.append(row)
    return rows


def step_without_cskd_seconds(args, num_classes, warmup=2, repeats=10):
    """Median seconds of one demo training step minus the CSKD term: teacher forward, student forward
    with CE + aux CE + CWD, backward and SGD step, at the demo's image shape and batch."""
    from cskd_train.models import build_model, feature_channels
    from cskd_train.objective import Objective, ObjectiveConfig

    torch.manual_seed(args.seed)
    student = build_model(args.student_model, num_classes).train()
    teacher = build_model(args.teacher_model, num_classes).eval()
    objective = Objective(ObjectiveConfig(distill="cwd"), feature_channels(student))
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, num_classes, (args.batch_size, args.image_size, args.image_size))

    step = training_step(student, teacher, objective, optimizer, images, labels)
    return median_seconds({"step": step}, warmup, repeats)["step"]


def training_step(student, teacher, objective, optimizer, images, labels, precision="fp32"):
    """One whole training step as a callable: teacher forward (no grad), student forward, loss, backward, SGD;
    the forwards and the loss under cskd_train.precision.autocast(precision), as cskd-train --precision runs them."""
    def step():
        with autocast(precision, images.device):
            with torch.no_grad():
                teacher_out = teacher(images)
            loss = objective(student(images), labels, teacher_out)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_shares(timing, rest_seconds):
    """The CSKD loss's share of one whole training step at the demo's shapes, fused and released:
    loss / (rest of the step + loss), with the loss timed alone on the demo's feature shapes."""
    demo = next((row for row in timing if row["name"] == "demo"), None)
    if demo is None:
        return None
    rest_ms = 1000 * rest_seconds
    return {"rest_of_step_ms": rest_ms,
            **{f"{kind}_share": demo[f"{kind}_ms"] / (rest_ms + demo[f"{kind}_ms"]) for kind in ("fused", "released")}}


def format_table(results, timing, shares=None):
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
        lines.append(f"  {row['name']:<10} {shapes}: {row['fused_ms']:9.2f} ms fused, "
                     f"{row['released_ms']:9.2f} ms released ({row['released_ms'] / row['fused_ms']:.1f}x)")
    if shares is not None:
        lines.append(f"Share of the CSKD loss in one training step at the demo's shapes (rest of the step: "
                     f"{shares['rest_of_step_ms']:.1f} ms): fused {100 * shares['fused_share']:.1f}%, "
                     f"released {100 * shares['released_share']:.1f}%")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
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
    print("\n== timing the CSKD loss, fused vs released ==", flush=True)
    timing = distillation_timing(args, model_feature_width(args.student_model), model_feature_width(args.teacher_model))
    shares = step_shares(timing, step_without_cskd_seconds(args, NUM_CLASSES["synthetic"]))
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(format_table(results, timing, shares))
    # CPU seconds as well: on a busy machine the wall time says more about the other jobs than about the demo.
    print(f"\ntotal demo time: {total:.0f} s wall, {cpu:.0f} s CPU, on {torch.get_num_threads()} thread(s)")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"results": results, "loss_timing": timing, "step_shares": shares, "total_seconds": total,
                   "cpu_seconds": cpu, "args": vars(args)}, handle, indent=2)
    return 0


def model_feature_width(model_name):
    from cskd_train.models import build_model, feature_channels

    return feature_channels(build_model(model_name, 2))


if __name__ == "__main__":
    sys.exit(main())
