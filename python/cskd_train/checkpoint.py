"""Checkpoints: written atomically, read with ``weights_only=True``, refused in one line when bad.

A checkpoint is a plain dict of tensors, numbers and strings (no pickled
objects), so ``torch.load(..., weights_only=True)`` reads it and a file from
elsewhere can run no code. Writes go to a temporary file in the same directory
which is then renamed over the target: a process killed at any moment leaves
either the old file or the new one, never a torn one. The temporary file's
name carries the writer's pid (``.last.pt.<pid>.<random>.tmp``), so a later
start can tell a dead writer's leftovers from a live process's file, and it is
given the mode the umask asks for (mkstemp would leave it 0600).
"""

import math
import numbers
import os
import pickle
import tempfile
import warnings

import torch

FORMAT = "cskd-train/1"
REQUIRED_KEYS = ("format", "iteration", "model", "model_name", "num_classes")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not what was asked for (one-line message)."""


def current_umask():
    """The process umask. /proc/self/status tells it without changing it; elsewhere os.umask(0) and back
    (racy with threads creating files meanwhile, but this is called from the training loop's one thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_prefix(path):
    """``.NAME.<pid>.``: a start can tell a dead writer's temporaries (output_dir.remove_stale_temporaries)."""
    return f".{os.path.basename(path)}.{os.getpid()}."


def write_atomic(path, write):
    """Call write(binary_handle) on a temporary file next to path, fsync it and rename it over path.

    A crash at any moment leaves the old file or the new one; the temporary file is removed on errors
    (including KeyboardInterrupt). The new file gets 0o666 & ~umask like any file open() creates.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    # The rename itself must reach the disk too, or a power cut could bring the old name back.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(obj, path):
    write_atomic(path, lambda handle: torch.save(obj, handle))


def first_line(error):
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def load_file(path):
    """torch.load with weights_only=True; any failure becomes a one-line CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of foreign files
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects other than tensors and plain containers "
                "(checkpoints are read with weights_only=True)"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(error)}") from None
    except Exception as error:  # torch raises many types for truncated or corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {first_line(error)}") from None


def is_training_checkpoint(obj):
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_training_checkpoint(path):
    """A last.pt/best.pt written by cskd-train, checked for the keys a resume needs."""
    obj = load_file(path)
    if not is_training_checkpoint(obj):
        raise CheckpointError(f"{path} is not a cskd-train checkpoint (no format marker {FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in obj]
    if missing:
        raise CheckpointError(f"{path} is an incomplete cskd-train checkpoint: missing {', '.join(missing)}")
    return obj


def load_state_dict_checked(module, state_dict, source):
    """load_state_dict(strict=True) with mismatches reported in one line naming the first offender."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: the state dict is a {type(state_dict).__name__}, not a dict of tensors")
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise CheckpointError(f"{source} does not fit the model: parameters {'; '.join(parts)}")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key} is a {type(value).__name__}, not a tensor")
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"{source} does not fit the model: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(state_dict)


# ---- what a resume reads, checked before anything is loaded or written ------------------------


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def type_name(value):
    return type(value).__name__


def nonfinite_entry(obj, where=""):
    """The path (a.b.c) of the first non-finite float or floating tensor in a nest of dicts and lists, or None."""
    if isinstance(obj, torch.Tensor):
        return where if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    if isinstance(obj, float):
        return where if not math.isfinite(obj) else None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = nonfinite_entry(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def check_resume_entries(obj, path, max_iterations):
    """The plain entries a resume reads (types and ranges); the states are checked as they are loaded."""
    for key, kind in (("iteration", int), ("model", dict), ("loss_module", dict), ("optimizer", dict),
                      ("scheduler", dict), ("rng", dict)):
        if key not in obj:
            raise CheckpointError(f"{path} has no {key!r} entry: it cannot be resumed")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise CheckpointError(f"{path}: {key!r} is a {type_name(obj[key])}, not a {kind.__name__}")
    iteration = obj["iteration"]
    if iteration < 0:
        raise CheckpointError(f"{path}: 'iteration' is {iteration}, a negative iteration")
    if iteration > max_iterations:
        raise CheckpointError(
            f"{path} is at iteration {iteration}, past --max-iterations {max_iterations}: a resume can only "
            f"continue a run (give --max-iterations {iteration} or more)"
        )
    if "best_miou" in obj and not (is_real(obj["best_miou"]) and -1.0 <= obj["best_miou"] <= 1.0):
        raise CheckpointError(f"{path}: 'best_miou' is {obj['best_miou']!r}, not a number in [-1, 1]")
    if "nonfinite_total" in obj and not (is_int(obj["nonfinite_total"]) and obj["nonfinite_total"] >= 0):
        raise CheckpointError(f"{path}: 'nonfinite_total' is {obj['nonfinite_total']!r}, not a count")
    rng = obj["rng"]
    torch_state = rng.get("torch")
    if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8
            and torch_state.shape == torch.get_rng_state().shape):
        raise CheckpointError(f"{path}: rng['torch'] is not a CPU generator state (a uint8 tensor "
                              f"of {torch.get_rng_state().numel()} bytes)")
    cuda = rng.get("cuda", [])
    if not (isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                    for t in cuda)):
        raise CheckpointError(f"{path}: rng['cuda'] is not a list of CUDA generator states")
    where = nonfinite_entry({key: obj[key] for key in ("model", "loss_module", "optimizer", "scheduler")})
    if where is not None:
        raise CheckpointError(f"{path}: {where} is not finite: this is not a good checkpoint to resume from")


def compatible(value, reference):
    """value may stand where the freshly built object has reference (a bool for a bool, any finite number
    for a number, a list of as many compatible items); None stands for an optional flag (foreach, fused)."""
    if isinstance(reference, bool):
        return isinstance(value, bool)
    if is_real(reference):
        return is_real(value) and math.isfinite(value)
    if reference is None:
        return value is None or isinstance(value, bool)
    if isinstance(reference, str):
        return isinstance(value, str)
    if isinstance(reference, (list, tuple)):
        return (isinstance(value, (list, tuple)) and len(value) == len(reference)
                and all(compatible(v, r) for v, r in zip(value, reference)))
    return type(value) is type(reference)


def check_like(state, reference, path, what, required=()):
    """Every entry of state that reference has must be compatible with it; required ones must be there;
    entries the built object does not know are refused (schedulers load their state into __dict__)."""
    for key in required:
        if key not in state:
            raise CheckpointError(f"{path}: {what} has no {key!r}")
    for key, value in state.items():
        if key not in reference:
            raise CheckpointError(f"{path}: {what} has an unexpected entry {key!r}")
        if not compatible(value, reference[key]):
            raise CheckpointError(f"{path}: {what}[{key!r}] is {value!r:.60}, which does not fit "
                                  f"(expected something like {reference[key]!r:.60})")


def load_optimizer_state(optimizer, state, path):
    """optimizer.load_state_dict after checking groups, hyper-parameters and per-parameter buffers."""
    reference = optimizer.state_dict()
    check_like(state, reference, path, "optimizer", required=("state", "param_groups"))
    groups = state["param_groups"]
    if not all(isinstance(group, dict) for group in groups):
        raise CheckpointError(f"{path}: optimizer param_groups are not dicts")
    for index, (group, own) in enumerate(zip(groups, reference["param_groups"])):
        check_like(group, own, path, f"optimizer param_groups[{index}]",
                   required=("params", "lr", "initial_lr", "momentum", "weight_decay"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, buffers in state["state"].items():
        if not (is_int(index) and 0 <= index < len(params) and isinstance(buffers, dict)):
            raise CheckpointError(f"{path}: optimizer state has an entry {index!r} for no parameter")
        for name, buffer in buffers.items():
            if buffer is not None and not (isinstance(buffer, torch.Tensor) and buffer.shape == params[index].shape):
                raise CheckpointError(
                    f"{path}: optimizer state[{index}][{name!r}] does not have the shape "
                    f"{tuple(params[index].shape)} of its parameter")
    try:
        optimizer.load_state_dict(state)
    except Exception as error:  # torch raises ValueError, KeyError, TypeError... for states that do not fit
        raise CheckpointError(f"{path} does not fit this run's optimiser: {first_line(error)}") from None


def load_scheduler_state(scheduler, state, path):
    check_like(state, scheduler.state_dict(), path, "scheduler",
               required=("total_iters", "power", "base_lrs", "last_epoch", "_last_lr"))
    if not (is_int(state["total_iters"]) and is_int(state["last_epoch"])):
        raise CheckpointError(f"{path}: scheduler total_iters and last_epoch must be integers")
    if state["total_iters"] < 1 or state["last_epoch"] < 0:
        raise CheckpointError(f"{path}: scheduler total_iters {state['total_iters']} / last_epoch "
                              f"{state['last_epoch']} out of range")
    scheduler.load_state_dict(state)


def load_scaler_state(scaler, state, path):
    """An fp16 run's GradScaler state: a positive, finite scale and the growth settings."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no gradient-scaler state (an fp16 run saves one): it cannot be resumed")
    check_like(state, scaler.state_dict(), path, "scaler", required=("scale", "_growth_tracker"))
    if not (is_real(state["scale"]) and 0 < state["scale"] < float("inf")):
        raise CheckpointError(f"{path}: the gradient scaler's scale {state['scale']!r} is not a positive number")
    scaler.load_state_dict(state)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
