"""cskd-train: train a segmentation student, alone or distilled from a teacher (CWD, CSKD).

Run ``cskd-train --help`` for the flags. Data parallel with
``torchrun --nproc_per_node=N -m cskd_train.train ...``.

The output directory holds last.pt (everything a resume needs), best.pt (the
best validation mIoU), metrics.jsonl (one JSON object per logged step and per
validation), config.json and curves.png.
"""

import argparse
import contextlib
import errno
import json
import math
import os
import signal
import sys
import time
import warnings

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from cskd_train import distributed
from cskd_train.cli import OneLineParser
from cskd_train.checkpoint import (
    FORMAT,
    CheckpointError,
    check_resume_entries,
    load_optimizer_state,
    load_scaler_state,
    load_scheduler_state,
    load_state_dict_checked,
    load_training_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
    write_atomic,
)
from cskd_train.convert import load_backbone_file, load_network_file
from cskd_train.datasets import DATASET_NAMES, NUM_CLASSES, DatasetError, build_dataset
from cskd_train.evaluate import eval_loader, evaluate
from cskd_train.models import MODEL_NAMES, build_model, feature_channels
from cskd_train.objective import DISTILL_MODES, MIN_SAMPLES, Objective, ObjectiveConfig
from cskd_train.precision import PRECISIONS, PrecisionError, autocast, check_precision, grad_scaler, resolve_device
from cskd_train.throughput import StepTiming, with_totals
from cskd_train.output_dir import TENSORBOARD_DIR, OutputDirError, claim_output_dir, reason, remove_run_files, warn
from cskd_train.transforms import NORMALIZATIONS, SeededSampler, TrainTransform, Transformed


class TrainingError(RuntimeError):
    """A run that cannot go on (bad flags, too many non-finite losses); reported in one line."""


class OtherRankFailed(TrainingError):
    """Raised on the ranks that did not fail themselves, so that every rank stops together."""

    def __init__(self):
        super().__init__("another rank failed (rank 0 says why)")


def raise_together(error, context):
    """Raise error (or OtherRankFailed) on every rank if any rank has one: a rank that stopped alone would
    leave the others waiting in their next collective."""
    if distributed.any_across_ranks(error is not None, context):
        raise error if error is not None else OtherRankFailed()


class StopRequested(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# --------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------


def build_parser():
    p = OneLineParser(prog="cskd-train", description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_NAMES, default="synthetic")
    data.add_argument("--data-root", default=None, help="dataset directory (not needed for synthetic)")
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default="val")
    data.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), default=(64, 64))
    data.add_argument("--no-scale-aug", action="store_true", help="turn off the random scale 0.5..2.0")
    data.add_argument("--normalization", choices=NORMALIZATIONS, default="imagenet",
                      help="'released': BGR minus the Caffe means, as the released teachers were trained")
    data.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    data.add_argument("--synthetic-size", type=int, default=64, help="synthetic image side")
    data.add_argument("--synthetic-images", type=int, default=None, help="synthetic training images (512)")
    data.add_argument("--synthetic-val-images", type=int, default=None, help="synthetic validation images (64)")

    model = p.add_argument_group("models")
    model.add_argument("--model", choices=MODEL_NAMES, default="deeplabv3_resnet18")
    model.add_argument("--backbone-weights", default=None, help="local ImageNet backbone state dict")
    model.add_argument("--init-checkpoint", default=None,
                       help="the student's initial weights: our last.pt/best.pt or a released (CIRKD code base) "
                            "state dict of the --model network (instead of --backbone-weights)")
    model.add_argument("--teacher-model", choices=MODEL_NAMES, default=None)
    model.add_argument("--teacher-checkpoint", default=None,
                       help="our last.pt/best.pt, or a released (CIRKD code base) state dict")
    model.add_argument("--sync-bn", action="store_true",
                       help="SyncBatchNorm in the student (DDP on CUDA devices; refused on the CPU)")

    loss = p.add_argument_group("objective")
    loss.add_argument("--distill", choices=DISTILL_MODES, default="none")
    loss.add_argument("--aux-weight", type=float, default=0.4)
    loss.add_argument("--cwd-weight", type=float, default=3.0)
    loss.add_argument("--cwd-temperature", type=float, default=2.0)
    loss.add_argument("--cskd-weight", type=float, default=1.0)
    loss.add_argument("--cskd-temperature", type=float, default=2.0)
    loss.add_argument("--lambda-cam", type=float, default=0.3)
    loss.add_argument("--lambda-pam", type=float, default=0.8)
    loss.add_argument("--grid", type=int, nargs=2, metavar=("GH", "GW"), default=(5, 5))
    loss.add_argument("--global-pam", action="store_true", help="one PAM over the whole map instead of a grid")
    loss.add_argument("--projection", choices=("resample", "fixed", "learned"), default="resample")
    loss.add_argument("--similarity", choices=("cka", "mse"), default="cka",
                      help="how the CSKD term compares the attention maps: the CKA, or the released *_MSE modes' "
                           "mean squared error after a bias-free 1x1 conv from the student's width to the teacher's")
    loss.add_argument("--adapter", choices=("resample", "fixed", "learned"), default=argparse.SUPPRESS,
                      help="--similarity mse only: that 1x1 conv drawn afresh every step as released (default: "
                           "resample), drawn once (fixed) or trained with the student (learned)")
    loss.add_argument("--lambda-kd", type=float, default=0.0,
                      help="weight of the released Hinton KD term on the logits (needs a teacher): T^2 / (B*H*W) "
                           "* sum over pixels of KL(softmax(teacher/T) || softmax(student/T)), T = --kd-temperature")
    loss.add_argument("--kd-temperature", type=float, default=1.0, help="T of the --lambda-kd term (as released)")
    loss.add_argument("--cka-global-batch", action="store_true",
                      help="under torchrun, the CSKD loss's CKAs over the batch of all processes (exact: as one "
                           "process with the whole batch; each process gathers every feature map)")
    loss.add_argument("--compile-loss", action="store_true",
                      help="run the CSKD loss under torch.compile (on CUDA replayed as CUDA graphs); "
                           "checkpoints are the same as without")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-iterations", type=int, default=40000)
    opt.add_argument("--batch-size", type=int, default=8, help="per process")
    opt.add_argument("--lr", type=float, default=0.02)
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--power", type=float, default=0.9, help="poly learning-rate power")
    opt.add_argument("--max-nonfinite", type=int, default=10,
                     help="stop after this many non-finite losses in a row")

    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto",
                     help="auto (CUDA when available: the local rank's GPU under torchrun; else the CPU), cpu, cuda[:N]")
    run.add_argument("--precision", choices=PRECISIONS, default="fp32",
                     help="bf16 / fp16: the forwards under torch.autocast of that dtype (fp16 with a gradient scaler)")
    run.add_argument("--ddp-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="under torchrun: stop with an error naming the rank that stopped answering after this "
                          "long without a reply")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output-dir", default="runs/cskd")
    run.add_argument("--resume", default=None, help="a last.pt to continue from")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in an --output-dir that holds one (its files are deleted)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--val-every", type=int, default=1000, help="validate every K iterations (and at the end)")
    run.add_argument("--val-batch-size", type=int, default=1)
    run.add_argument("--val-mode", choices=("whole", "slide"), default="whole")
    run.add_argument("--checkpoint-every", type=int, default=None, help="default: --val-every")
    run.add_argument("--stop-after", type=int, default=None,
                     help="save and exit after this many iterations of this invocation (time-sliced jobs)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    run.add_argument("--no-plot", action="store_true", help="no curves.png at the end")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write metrics.jsonl's scalars as TensorBoard event files (OUTPUT/tensorboard/; "
                          "needs the tensorboard package)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.distill != "none" and (args.teacher_model is None or args.teacher_checkpoint is None):
        raise TrainingError(f"--distill {args.distill} needs --teacher-model and --teacher-checkpoint")
    if args.init_checkpoint and args.backbone_weights:
        raise TrainingError("--init-checkpoint holds the whole student: it cannot be combined with --backbone-weights")
    if args.compile_loss and args.distill != "cskd":
        raise TrainingError(f"--compile-loss compiles the CSKD loss: it needs --distill cskd, got --distill {args.distill}")
    for name in ("max_iterations", "batch_size", "log_every", "val_every", "max_nonfinite"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if not args.ddp_timeout > 0:
        raise TrainingError(f"--ddp-timeout must be > 0 seconds, got {args.ddp_timeout}")
    if args.checkpoint_every is None:
        args.checkpoint_every = args.val_every
    check_loss_variant(args)
    check_cka_samples(args, int(os.environ.get("WORLD_SIZE", "1")))
    return args


def check_loss_variant(args):
    """--similarity, --adapter and --lambda-kd: refused where they do not apply; args.adapter set (None with cka)."""
    adapter = getattr(args, "adapter", None)
    if args.similarity == "mse" and args.distill != "cskd":
        raise TrainingError(f"--similarity is an option of the CSKD loss: it needs --distill cskd, got --distill {args.distill}")
    if adapter is not None and args.similarity != "mse":
        raise TrainingError(f"--adapter {adapter} applies only to --similarity mse (the CKA compares the maps "
                            "at their own widths, with no adapter)")
    args.adapter = (adapter or "resample") if args.similarity == "mse" else None
    if args.similarity == "mse" and args.cka_global_batch:
        raise TrainingError("--cka-global-batch applies only to --similarity cka: the MSE is a mean over elements, "
                            "which DDP's gradient averaging already takes over the whole batch")
    if not math.isfinite(args.lambda_kd):
        raise TrainingError(f"--lambda-kd must be finite, got {args.lambda_kd}")
    if args.lambda_kd and args.distill == "none":
        raise TrainingError("--lambda-kd needs a teacher: use --distill cwd or cskd (with --teacher-model and "
                            "--teacher-checkpoint)")
    if not (math.isfinite(args.kd_temperature) and args.kd_temperature > 0):
        raise TrainingError(f"--kd-temperature must be > 0, got {args.kd_temperature}")


def check_cka_samples(args, world_size):
    """The CSKD term's CKAs need MIN_SAMPLES images: refused at start-up, not at the first step."""
    if args.distill == "cskd" and args.similarity == "mse":
        return  # no CKA: any batch
    if args.distill != "cskd":
        if args.cka_global_batch:
            raise TrainingError("--cka-global-batch is an option of the CSKD loss: it needs --distill cskd")
        return
    samples = args.batch_size * (world_size if args.cka_global_batch else 1)
    if samples >= MIN_SAMPLES:
        return
    if args.cka_global_batch:
        raise TrainingError(f"--distill cskd needs a global batch of at least {MIN_SAMPLES} images for its CKAs, "
                            f"got {world_size} process(es) x --batch-size {args.batch_size}")
    hint = (" or add --cka-global-batch (CKAs over the batch of all processes)" if world_size > 1
            else ", or under torchrun add --cka-global-batch")
    raise TrainingError(
        f"--distill cskd needs at least {MIN_SAMPLES} images per CKA, got --batch-size {args.batch_size}: linear CKA "
        f"over 2 samples is always 1, the CSKD term would be a constant with zero gradients; raise --batch-size{hint}"
    )


def objective_config(args):
    return ObjectiveConfig(
        distill=args.distill,
        aux_weight=args.aux_weight,
        cwd_weight=args.cwd_weight,
        cwd_temperature=args.cwd_temperature,
        cskd_weight=args.cskd_weight,
        cskd_temperature=args.cskd_temperature,
        lambda_cam=args.lambda_cam,
        lambda_pam=args.lambda_pam,
        grid=None if args.global_pam else tuple(args.grid),
        projection=args.projection,
        global_batch=args.cka_global_batch,
        similarity=args.similarity,
        adapter=args.adapter,
        kd_weight=args.lambda_kd,
        kd_temperature=args.kd_temperature,
    )


# --------------------------------------------------------------------------
# Pieces of a run
# --------------------------------------------------------------------------


def load_teacher(args, num_classes, device):
    model = build_model(args.teacher_model, num_classes)
    load_network_file(model, args.teacher_model, args.teacher_checkpoint, "--teacher-model")
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class StudentStep(nn.Module):
    """Student and loss module in one Module, so DDP also averages the loss module's gradients."""

    def __init__(self, student, objective):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, images, labels, teacher_out=None):
        return self.objective(self.student(images), labels, teacher_out)


def train_batches(loader, sampler, start_iteration, batches_per_epoch):
    """Batches from iteration start_iteration on, epoch after epoch (the order a fresh run would see)."""
    epoch, offset = divmod(start_iteration, batches_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(offset * loader.batch_size)
        yield from loader
        epoch, offset = epoch + 1, 0


def parse_metrics_row(raw):
    """A metrics.jsonl line as a dict with an integer iteration, or None if it is not one."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
        return None
    return row


def read_metrics_lines(path, keep_through):
    """The lines of metrics.jsonl up to iteration keep_through (for a resume), as bytes.

    A bad last line is a record whose write was cut short (disk full, kill -9): it is dropped with a
    warning. A bad line anywhere else is an error naming it: dropping it would silently lose a record.
    """
    try:
        with open(path, "rb") as handle:
            lines = handle.read().split(b"\n")
    except FileNotFoundError:
        return []
    except OSError as error:
        raise TrainingError(f"cannot read {path}: {reason(error)}") from None
    if lines[-1] == b"":
        lines.pop()  # what follows the last newline
    kept = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        row = parse_metrics_row(raw)
        if row is None:
            if number == len(lines):
                warn(f"dropped the torn last line {number} of {path} ({len(raw)} bytes; a write cut short)")
                continue
            raise TrainingError(f"{path} line {number} is not a metrics record (a JSON object with an "
                                f"integer iteration); repair or delete that line to resume")
        if row["iteration"] <= keep_through:
            kept.append(raw + b"\n")
    return kept


class MetricsLog:
    """metrics.jsonl, written by rank 0; on resume the rows after the checkpoint's iteration are dropped.

    The file is read when the log is made (before the run writes anything) and written from open(): cut
    back atomically on resume, then appended to one whole record per write call.
    """

    def __init__(self, path, enabled, resume_iteration=None):
        self.path = path
        self.enabled = enabled
        self.kept = None
        if enabled and resume_iteration is not None:
            self.kept = read_metrics_lines(path, resume_iteration)
        self.handle = None

    def open(self):
        if not self.enabled:
            return
        if self.kept is not None and os.path.exists(self.path):
            # temporary file + rename: a crash while cutting back loses no row of the file
            kept = b"".join(self.kept)
            write_atomic(self.path, lambda handle: handle.write(kept))
        # Unbuffered: each record goes out in one write() of its whole line (a full disk tears at most
        # the last line, which the next resume drops).
        self.handle = open(self.path, "ab" if self.kept is not None else "wb", buffering=0)

    def write(self, row):
        if self.handle is None:
            return
        line = (json.dumps(row) + "\n").encode("utf-8")
        if self.handle.write(line) != len(line):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def ignore_interrupts(worker_id):
    """Loader workers ignore Ctrl-C (sent to the whole process group): the main process saves and stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SignalFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


class Trainer:
    def __init__(self, args, context):
        self.args = args
        self.context = context
        self.num_classes = NUM_CLASSES[args.dataset]
        self.output_dir = args.output_dir
        self.last_path = os.path.join(args.output_dir, "last.pt")
        self.best_path = os.path.join(args.output_dir, "best.pt")

        # Everything that can fail on bad input is read before anything is written.
        self.train_set = build_dataset(args.dataset, args.train_split, root=args.data_root, seed=args.seed,
                                       synthetic_size=args.synthetic_size, synthetic_images=args.synthetic_images)
        self.val_set = build_dataset(args.dataset, args.val_split, root=args.data_root, seed=args.seed,
                                     synthetic_size=args.synthetic_size, synthetic_images=args.synthetic_val_images)
        resume = load_training_checkpoint(args.resume) if args.resume else None
        if resume is not None and (resume["model_name"], resume["num_classes"]) != (args.model, self.num_classes):
            raise CheckpointError(
                f"{args.resume} holds a {resume['model_name']} with {resume['num_classes']} classes, "
                f"not a {args.model} with {self.num_classes}"
            )

        if args.sync_bn and context.device.type != "cuda":
            # Refused even in a single process, where it would be a no-op: a CPU command line that
            # "works" alone would then fail only once launched under torchrun.
            raise TrainingError(
                f"--sync-bn needs CUDA devices (--device {args.device} given): PyTorch's SyncBatchNorm does "
                "not run on the CPU; drop --sync-bn to keep per-process BatchNorm statistics"
            )
        torch.manual_seed(args.seed)
        self.teacher = load_teacher(args, self.num_classes, context.device) if args.distill != "none" else None
        student = build_model(args.model, self.num_classes, sync_bn=args.sync_bn and context.distributed)
        if args.init_checkpoint and resume is None:
            load_network_file(student, args.model, args.init_checkpoint, "--model")
        elif args.backbone_weights and resume is None:
            load_backbone_file(student.backbone, args.backbone_weights)
        teacher_channels = feature_channels(self.teacher) if self.teacher is not None else None
        objective = Objective(objective_config(args), feature_channels(student), teacher_channels)
        if args.compile_loss:
            objective.compile_cskd(context.device)
        self.step_module = StudentStep(student, objective).to(context.device)
        self.student = student
        self.objective = objective
        # images/s and the CSKD loss's share of the step, in each logged row (cskd_train/throughput.py)
        self.timing = StepTiming(context.device, args.batch_size)
        self.tensorboard = None  # a SummaryWriter once the run writes, with --tensorboard (rank 0)
        self.progress = None
        objective.cskd_timing = self.timing
        self.optimizer = torch.optim.SGD(
            self.step_module.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.PolynomialLR(
            self.optimizer, total_iters=args.max_iterations, power=args.power
        )
        self.scaler = grad_scaler(args.precision, context.device)
        self.iteration = 0
        self.best_miou = -1.0
        self.nonfinite_total = 0
        self.scaler_skips_total = 0  # fp16 steps the gradient scaler skipped (overflow), not counted as non-finite
        self.last_good = None  # (path, iteration) of the newest checkpoint known finite and complete
        if resume is not None:
            self.restore(resume, args.resume)
            self.last_good = (args.resume, self.iteration)
        # Read (and checked) now, before anything is written; rank 0's verdict is every rank's.
        error = None
        try:
            self.log = MetricsLog(os.path.join(self.output_dir, "metrics.jsonl"), context.is_main,
                                  resume_iteration=self.iteration if resume is not None else None)
        except TrainingError as failed:
            error = failed
        raise_together(error, context)
        self.ddp = self.step_module
        if context.distributed:
            self.ddp = DistributedDataParallel(
                self.step_module,
                device_ids=[context.device.index] if context.device.type == "cuda" else None,
                find_unused_parameters=args.aux_weight == 0,  # an unweighted aux head gets no gradient
            )
        self.train_loader, self.sampler = self.make_train_loader()
        self.val_loader = eval_loader(self.val_set, args.normalization, context, args.val_batch_size, args.workers)
        self.start_iteration = self.iteration
        self.resumed = resume is not None

    def restore(self, checkpoint, path):
        """Load a checkpoint into the built objects, every entry checked first: a hand-edited or damaged
        file is refused here, in one line, before the output directory is touched."""
        check_resume_entries(checkpoint, path, self.args.max_iterations)
        precision = checkpoint.get("precision", "fp32")  # checkpoints from before --precision are fp32
        if precision != self.args.precision:
            raise CheckpointError(f"{path} was trained with --precision {precision}: resume it with --precision "
                                  f"{precision}, not {self.args.precision}")
        if self.scaler is not None:
            load_scaler_state(self.scaler, checkpoint.get("scaler"), path)
        load_state_dict_checked(self.student, checkpoint["model"], path)
        load_state_dict_checked(self.objective, checkpoint["loss_module"], path)
        load_optimizer_state(self.optimizer, checkpoint["optimizer"], path)
        load_scheduler_state(self.scheduler, checkpoint["scheduler"], path)
        if self.scheduler.last_epoch != checkpoint["iteration"]:
            raise CheckpointError(f"{path}: its scheduler is at step {self.scheduler.last_epoch}, "
                                  f"its iteration is {checkpoint['iteration']}")
        try:
            set_rng_state(checkpoint["rng"])
        except (RuntimeError, ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: its RNG state cannot be restored: {error}".splitlines()[0]) from None
        self.iteration = checkpoint["iteration"]
        self.best_miou = float(checkpoint.get("best_miou", -1.0))
        self.nonfinite_total = checkpoint.get("nonfinite_total", 0)
        self.scaler_skips_total = int(checkpoint.get("scaler_skips_total", 0))
        if self.scheduler.total_iters != self.args.max_iterations:
            self.follow_new_schedule_length()

    def follow_new_schedule_length(self):
        """A resume with another --max-iterations: the poly schedule restored from the checkpoint keeps its
        old length (an extended run would train at lr 0), so the lr is set to where a run started with the
        new length would be at this iteration; PolynomialLR's step-to-step factors then follow that schedule."""
        scheduler, new = self.scheduler, self.args.max_iterations
        old = scheduler.total_iters
        scheduler.total_iters = new
        lrs = [base * (1.0 - self.iteration / new) ** scheduler.power for base in scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)
        self.message(
            f"resuming at iteration {self.iteration} with --max-iterations {new} (the checkpoint's schedule had "
            f"{old}): from here the learning rate follows the poly schedule of {new} iterations, "
            f"base_lr * (1 - i/{new})^{scheduler.power:g} (lr {lrs[0]:.6g} now)"
        )

    def make_train_loader(self):
        args, context = self.args, self.context
        transform = TrainTransform(args.crop_size, args.normalization, scale=not args.no_scale_aug)
        dataset = Transformed(self.train_set, transform)
        sampler = SeededSampler(dataset, num_replicas=context.world_size, rank=context.rank, seed=args.seed)
        if sampler.num_samples < args.batch_size:
            raise TrainingError(
                f"the {args.train_split} split has {len(dataset)} images: too few for {context.world_size} "
                f"process(es) with --batch-size {args.batch_size}"
            )
        # The loader's own generator: creating an epoch's iterator must not draw from the global RNG,
        # or a resumed run (which creates one at a different moment) would diverge.
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=args.workers,
            generator=torch.Generator().manual_seed(args.seed), pin_memory=context.device.type == "cuda",
            worker_init_fn=ignore_interrupts,
        )
        return loader, sampler

    # ---- checkpoints -------------------------------------------------------

    def checkpoint(self):
        return {
            "format": FORMAT,
            "iteration": self.iteration,
            "model_name": self.args.model,
            "num_classes": self.num_classes,
            "model": self.student.state_dict(),
            "loss_module": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "best_miou": self.best_miou,
            "nonfinite_total": self.nonfinite_total,
            "precision": self.args.precision,
            **({"scaler": self.scaler.state_dict(), "scaler_skips_total": self.scaler_skips_total}
               if self.scaler is not None else {}),
            "config": json.dumps(vars(self.args)),
        }

    def save(self, path):
        """Write a checkpoint (rank 0) from finite state only; every rank learns whether it worked."""
        error = None
        if self.context.is_main:
            try:
                if not self.state_is_finite():  # the loop stops before this; a checkpoint must never hold it
                    raise TrainingError(f"refusing to write {path}: {self.nonfinite_state()} is not finite; "
                                        f"{self.last_good_note()}")
                with self.writing(path):
                    save_atomic(self.checkpoint(), path)
            except TrainingError as failed:
                error = failed
        raise_together(error, self.context)  # also the barrier: no rank runs ahead of the save
        if path == self.last_path:
            self.last_good = (path, self.iteration)

    @contextlib.contextmanager
    def writing(self, path):
        """An OSError while writing path (disk full, quota, I/O error) becomes one line saying what survived."""
        try:
            yield
        except OSError as error:
            raise TrainingError(f"{reason(error)} while writing {path}; {self.intact_note()}") from None

    def intact_note(self):
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"{self.last_good[0]} of iteration {self.last_good[1]} is intact"

    def last_good_note(self):
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.last_good[0]} (iteration {self.last_good[1]})"

    def record(self, row):
        with self.writing(self.log.path):
            self.log.write(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, row["iteration"])

    # ---- finiteness of what a checkpoint saves ---------------------------------------------------

    def named_state_tensors(self):
        """(name, tensor) of every floating tensor a checkpoint saves that a step changes: parameters,
        BatchNorm statistics (changed by the forward pass, even of a skipped step) and optimiser buffers."""
        for name, tensor in self.step_module.named_parameters():
            yield name, tensor
        for name, tensor in self.step_module.named_buffers():
            if tensor.is_floating_point():
                yield name, tensor
        names = {id(p): n for n, p in self.step_module.named_parameters()}
        for parameter, buffers in self.optimizer.state.items():
            for key, tensor in buffers.items():
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    yield f"optimizer {key} of {names.get(id(parameter), '?')}", tensor

    def finite_state_tensor(self):
        """A 0-dim bool tensor, without a host sync: one max-abs norm per tensor (fused by dtype and device;
        inf or NaN exactly when the tensor holds one, and no overflow for large finite values)."""
        groups = {}
        for _, tensor in self.named_state_tensors():
            if tensor.numel():  # the inf-norm of an empty tensor is an error (no identity); it holds nothing
                groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
        norms = [torch.stack(torch._foreach_norm(tensors, ord=math.inf)).float().max()
                 for tensors in groups.values()]
        return torch.isfinite(torch.stack(norms)).all() if norms else torch.tensor(True)

    def state_is_finite(self):
        return bool(self.finite_state_tensor())

    def nonfinite_state(self):
        """The name of the first non-finite tensor (for the message; only on the failure path)."""
        for name, tensor in self.named_state_tensors():
            if not bool(torch.isfinite(tensor).all()):
                return name
        return "nothing"

    # ---- one step ----------------------------------------------------------

    def step(self, images, labels):
        """One optimisation step: (the loss parts as floats, or None if the loss was not finite and the step
        skipped; whether the parameters, BatchNorm statistics and optimiser state are still finite on every rank)."""
        if self.args.compile_loss:
            # A new step for the compiled loss's CUDA graphs: the last step's outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        teacher_out = None
        with autocast(self.args.precision, self.context.device):
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_out = self.teacher(images)
            parts = self.ddp(images, labels, teacher_out)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            return self.scaled_step(parts)
        nonfinite = distributed.any_across_ranks(not bool(torch.isfinite(parts["loss"])), self.context)
        if nonfinite:
            # Every rank skips together (a lone backward would hang DDP's gradient all-reduce).
            self.scheduler.step()
            return None, self.finite_on_all_ranks(self.state_is_finite())
        parts["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        # The state check rides on the host sync that reads the loss parts anyway.
        values = torch.stack([self.finite_state_tensor().double()]
                             + [value.detach().double() for value in parts.values()]).tolist()
        return dict(zip(parts, values[1:])), self.finite_on_all_ranks(values[0] == 1.0)

    def scaled_step(self, parts):
        """fp16: backward of the scaled loss and GradScaler's step, which skips a step whose gradients are not
        finite (a non-finite loss included) and lowers the scale. Returns step()'s pair; a skipped step's parts
        carry "scaler_skipped" = 1.0 (DDP's all-reduced gradients make every rank skip together)."""
        scale = self.scaler.get_scale()
        self.scaler.scale(parts["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # The schedule advances on a step the scaler skipped too (as on a skipped non-finite step): torch
            # warns that the optimiser did not step first, which is the point here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        values = torch.stack([self.finite_state_tensor().double()]
                             + [value.detach().double() for value in parts.values()]).tolist()
        row = dict(zip(parts, values[1:]))
        row["scaler_skipped"] = 1.0 if self.scaler.get_scale() < scale else 0.0
        return row, self.finite_on_all_ranks(values[0] == 1.0)

    def finite_on_all_ranks(self, finite):
        return not distributed.any_across_ranks(not finite, self.context)

    def validate(self):
        distributed.broadcast_buffers(self.student, self.context)
        miou, iou = evaluate(self.student, self.val_loader, self.num_classes, self.context,
                             mode=self.args.val_mode, crop_size=self.args.crop_size, precision=self.args.precision)
        self.record({"iteration": self.iteration, "miou": miou, "iou": iou})
        if miou > self.best_miou:
            self.best_miou = miou
            self.save(self.best_path)
        self.report(f"iteration {self.iteration}: validation mIoU {miou:.4f} (best {self.best_miou:.4f})")
        return miou

    # ---- the loop ----------------------------------------------------------

    def run(self):
        try:
            return self.run_loop()
        finally:
            self.log.close()
            if self.tensorboard is not None:
                self.tensorboard.close()

    def start_writing(self):
        """The first writes of the run, after everything was read and checked."""
        if self.context.is_main:
            if self.args.overwrite:
                remove_run_files(self.output_dir)
            config_path = os.path.join(self.output_dir, "config.json")
            config = (json.dumps(vars(self.args), indent=2) + "\n").encode("utf-8")
            with self.writing(config_path):
                write_atomic(config_path, lambda handle: handle.write(config))
            with self.writing(self.log.path):
                self.log.open()
            if self.args.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: on resume, TensorBoard hides the old events past the checkpoint's iteration,
                # as metrics.jsonl drops its rows past it.
                self.tensorboard = SummaryWriter(os.path.join(self.output_dir, TENSORBOARD_DIR),
                                                 purge_step=self.iteration + 1 if self.resumed else None)

    def run_loop(self):
        args, context = self.args, self.context
        self.start_writing()
        batches_per_epoch = self.sampler.num_samples // args.batch_size
        batches = train_batches(self.train_loader, self.sampler, self.iteration, batches_per_epoch)
        progress = self.progress = self.progress_bar()
        consecutive_nonfinite = 0
        stop_at = args.max_iterations if args.stop_after is None else min(
            args.max_iterations, self.start_iteration + args.stop_after)
        self.student.train()
        with SignalFlag() as signals:
            while self.iteration < stop_at:
                fetched = time.perf_counter()
                images, labels = next(batches)
                images, labels = images.to(context.device, non_blocking=True), labels.to(context.device)
                lr = self.optimizer.param_groups[0]["lr"]  # the step's learning rate (the scheduler moves it after)
                started = time.perf_counter()
                self.timing.begin_step()
                parts, state_finite = self.step(images, labels)
                self.timing.end_step(time.perf_counter() - fetched)
                seconds = time.perf_counter() - started
                self.iteration += 1
                distributed.report_progress(self.iteration, context)
                if not state_finite:
                    # Nothing of this step may reach a checkpoint, and later steps would start from it.
                    raise TrainingError(
                        f"iteration {self.iteration}: the step left non-finite values in "
                        f"{self.nonfinite_state()}: stopping without saving it; {self.last_good_note()}"
                    )
                if parts is None:
                    consecutive_nonfinite += 1
                    self.nonfinite_total += 1
                    self.record({"iteration": self.iteration, "nonfinite": True,
                                 "nonfinite_total": self.nonfinite_total})
                    self.message(f"iteration {self.iteration}: non-finite loss, step skipped "
                                 f"({consecutive_nonfinite} in a row, {self.nonfinite_total} in all)")
                    if consecutive_nonfinite >= args.max_nonfinite:
                        raise TrainingError(
                            f"{consecutive_nonfinite} non-finite losses in a row at iteration {self.iteration}: "
                            f"stopping; {self.last_good_note()}"
                        )
                elif parts.pop("scaler_skipped", 0.0):
                    self.scaler_skips_total += 1
                    self.record({"iteration": self.iteration, "scaler_skipped": True,
                                 "scaler_skips_total": self.scaler_skips_total, "scale": self.scaler.get_scale()})
                else:
                    consecutive_nonfinite = 0
                    if self.iteration % args.log_every == 0 or self.iteration == args.max_iterations:
                        row = with_totals(distributed.mean_across_ranks({**parts, **self.timing.read()}, context),
                                          context.world_size)
                        row.update(iteration=self.iteration, lr=lr, seconds=seconds)
                        self.record(row)
                    if progress is not None:
                        progress.set_postfix(loss=f"{parts['loss']:.4f}", refresh=False)
                if progress is not None:
                    progress.update(1)
                final = self.iteration == args.max_iterations
                if self.iteration % args.val_every == 0 or final:
                    self.validate()
                # The signal any rank received (SIGINT to one rank stops all), the same on every rank.
                stop = distributed.max_across_ranks(signals.signum or 0, context)
                if self.iteration % args.checkpoint_every == 0 or final or stop or self.iteration == stop_at:
                    self.save(self.last_path)
                if stop:
                    if progress is not None:
                        progress.close()
                    raise StopRequested(stop)
        if progress is not None:
            progress.close()
        if not distributed.replicas_in_sync(self.step_module, context):
            raise TrainingError("the student or loss-module parameters differ across ranks after training")
        if context.is_main and self.iteration == args.max_iterations and not args.no_plot:
            from cskd_train.plot import plot_curves

            title = (f"{os.path.basename(os.path.abspath(self.output_dir))}: {args.model}, --distill {args.distill}, "
                     f"iteration {self.iteration}")
            plot_curves(self.log.path, os.path.join(self.output_dir, "curves.png"), title=title)
        return self.best_miou

    def progress_bar(self):
        if self.args.no_progress or not self.context.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.args.max_iterations, initial=self.iteration, desc="train", unit="it",
                    dynamic_ncols=True)

    def report(self, text):
        """A progress line on stdout (rank 0), above the progress bar when there is one."""
        if self.context.is_main:
            if getattr(self, "progress", None) is not None:
                self.progress.write(f"cskd-train: {text}", file=sys.stdout)
            else:
                print(f"cskd-train: {text}", flush=True)

    def message(self, text):
        if self.context.is_main:
            print(f"cskd-train: {text}", file=sys.stderr, flush=True)


def error_line(error):
    """One line for the user; errors re-raised from loader workers carry a traceback text: keep its last line."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the cause is the last line
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text or type(error).__name__


def output_dir_claimed(args, context):
    """The output directory, checked and locked by rank 0 before datasets and models are built (a context
    manager: unlocked on exit); every rank fails together if it cannot take the run."""
    claim = contextlib.ExitStack()
    error = None
    if context.is_main:
        try:
            if args.resume and args.overwrite:
                raise OutputDirError("--overwrite starts a new run and --resume continues one: give one of them")
            claim.enter_context(claim_output_dir(args.output_dir, resume=bool(args.resume), overwrite=args.overwrite))
        except OutputDirError as failed:
            error = failed
    try:
        raise_together(error, context)
    except BaseException:
        claim.close()
        raise
    return claim


def main(argv=None):
    try:
        args = parse_args(argv)
    except TrainingError as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank parses: one line, not one per rank
            print(f"cskd-train: error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.resolved_device = resolve_device(args.device)  # recorded in config.json
        check_precision(args.precision, args.resolved_device)
        context = distributed.setup(args.resolved_device, args.ddp_timeout)
    except (RuntimeError, PrecisionError) as error:
        print(f"cskd-train: error: {error}", file=sys.stderr)
        return 2
    if context.is_main:  # once, on stdout (stderr carries errors and warnings)
        each = " (each process its local rank's)" if context.distributed else ""
        print(f"cskd-train: device {context.device}{each} (--device {args.device}), precision {args.precision}",
              flush=True)
    try:
        with output_dir_claimed(args, context):
            trainer = Trainer(args, context)
            best = trainer.run()
        if context.is_main:
            state = "done" if trainer.iteration == args.max_iterations else "stopped (--stop-after)"
            print(f"cskd-train: {state} at iteration {trainer.iteration} of {args.max_iterations}, "
                  f"best mIoU {best:.4f}, outputs in {args.output_dir}")
        return 0
    except StopRequested as stop:
        name = signal.Signals(stop.signum).name
        if context.is_main:
            print(f"cskd-train: {name} received: checkpoint saved to {os.path.join(args.output_dir, 'last.pt')}; "
                  f"continue with --resume", file=sys.stderr)
        return 128 + stop.signum
    except (CheckpointError, DatasetError, OutputDirError, TrainingError) as error:
        if not isinstance(error, OtherRankFailed):  # the failing rank says why, once
            print(f"cskd-train: error: {error_line(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not distributed.is_collective_failure(error, context):
            raise
        # A rank froze or died: one line from one rank, naming it, instead of a traceback from each.
        message = distributed.stalled_ranks_message(context, args.ddp_timeout)
        if message is not None:
            print(f"cskd-train: error: {message}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown(context)


if __name__ == "__main__":
    sys.exit(main())
