"""Checkpoints: written atomically, read with ``weights_only=True``, refused in one line when bad.

A checkpoint is a plain dict of tensors, numbers and strings (no pickled
objects), so ``torch.load(..., weights_only=True)`` reads it and a file from
elsewhere can run no code. Writes go to a temporary file in the same directory
which is then renamed over the target: a process killed at any moment leaves
either the old file or the new one, never a torn one.
"""

import os
import pickle
import tempfile
import warnings

import torch

FORMAT = "cskd-train/1"
REQUIRED_KEYS = ("format", "iteration", "model", "model_name", "num_classes")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not what was asked for (one-line message)."""


def save_atomic(obj, path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
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


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
