"""Nothing lost, nothing silent (issue #19): what cskd-train leaves in its output directory.

Finite checkpoints only, one run per directory (lock, --overwrite), an extended
schedule on resume, torn metrics lines, hand-edited checkpoints, unwritable
directories, a full disk, stale temporaries and the umask.
"""

import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train_support  # noqa: F401
from cskd_train import checkpoint as ckpt
from cskd_train import train
from cskd_train.checkpoint import load_training_checkpoint
from train_support import TINY, read_metrics, run_module, subprocess_env

RUN = ["--log-every", "1", "--val-every", "1000", *TINY]


def snapshot(directory):
    """Every file under directory (names and bytes): 'nothing written' means this is unchanged."""
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cskd-train: error: "), err
    assert "Traceback" not in err
    return lines[0]


def finite_everywhere(obj):
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(finite_everywhere(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_everywhere(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """A run stopped after 2 of 4 iterations: last.pt at iteration 2, metrics rows 1 and 2."""
    out = tmp_path_factory.mktemp("two") / "run"
    assert train.main(["--max-iterations", "4", "--stop-after", "2", "--output-dir", str(out), *RUN]) == 0
    return out


def copy_run(source, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(source, out)
    return out


# ---- 1. only finite checkpoints ----------------------------------------------


def test_huge_lr_never_leaves_a_nonfinite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main(["--max-iterations", "10", "--lr", "1e12", "--max-nonfinite", "3", "--checkpoint-every", "1",
                     "--val-every", "1", "--output-dir", str(out), *RUN])
    assert rc == 2
    err = capsys.readouterr().err
    checkpoints = sorted(name for name in os.listdir(out) if name.endswith(".pt"))
    assert checkpoints, err
    for name in checkpoints:
        assert finite_everywhere(torch.load(out / name, weights_only=True)), name
    iteration = load_training_checkpoint(str(out / "last.pt"))["iteration"]
    assert f"the last good checkpoint is {out / 'last.pt'} (iteration {iteration})" in err.splitlines()[-1]


def test_an_update_to_nonfinite_weights_is_not_saved(tmp_path, monkeypatch, capsys):
    """The loss is finite but the 3rd update makes a weight infinite: the run stops, last.pt stays at 2."""
    original = torch.optim.SGD.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    out = tmp_path / "run"
    rc = train.main(["--max-iterations", "6", "--checkpoint-every", "1", "--output-dir", str(out), *RUN])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "iteration 3" in err and f"the last good checkpoint is {out / 'last.pt'} (iteration 2)" in err
    state = load_training_checkpoint(str(out / "last.pt"))
    assert state["iteration"] == 2 and finite_everywhere(state)


# ---- 2. one run per output directory ---------------------------------------------


def test_fresh_run_in_a_used_directory_is_refused(two_iterations, tmp_path, capsys):
    out = copy_run(two_iterations, tmp_path)
    before = snapshot(out)
    assert train.main(["--max-iterations", "4", "--output-dir", str(out), *RUN]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--overwrite" in line and "--resume" in line and str(out) in line
    assert snapshot(out) == before


def test_overwrite_starts_over(two_iterations, tmp_path):
    out = copy_run(two_iterations, tmp_path)
    (out / "best.pt").write_bytes(b"an older run's best")
    assert train.main(["--max-iterations", "1", "--overwrite", "--output-dir", str(out), *RUN]) == 0
    assert [r["iteration"] for r in read_metrics(out) if "loss" in r] == [1]
    assert load_training_checkpoint(str(out / "best.pt"))["iteration"] == 1
    assert not (out / ".lock").exists()


def test_resume_into_a_fresh_directory_still_works(two_iterations, tmp_path):
    out = tmp_path / "elsewhere"
    assert train.main(["--max-iterations", "4", "--resume", str(two_iterations / "last.pt"),
                       "--output-dir", str(out), *RUN]) == 0
    assert load_training_checkpoint(str(out / "last.pt"))["iteration"] == 4


def test_second_live_process_is_refused(tmp_path):
    out = tmp_path / "run"
    args = ["--max-iterations", "400", "--output-dir", str(out), *RUN]
    first = subprocess.Popen([sys.executable, "-m", "cskd_train.train", *args], env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2):
            time.sleep(0.2)
        for extra in ([], ["--overwrite"], ["--resume", str(out / "last.pt")]):
            second = run_module("cskd_train.train", [*args, *extra])
            assert second.returncode == 2, second.stderr
            line = one_error_line(second.stderr)
            assert f"pid {first.pid}" in line and str(out) in line
        assert first.poll() is None  # still training
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1))  # one run's rows only
    assert load_training_checkpoint(str(out / "last.pt"))["iteration"] == len(rows)
    assert json.loads((out / "config.json").read_text())["max_iterations"] == 400
    assert not (out / ".lock").exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_every_rank_stops_when_rank_0_refuses_the_directory(two_iterations, tmp_path):
    """Only rank 0 checks and locks the directory; the other rank must stop with it, not wait for it."""
    out = copy_run(two_iterations, tmp_path)
    before = snapshot(out)
    started = time.time()
    result = run_module("torch.distributed.run", [
        "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "cskd_train.train",
        "--max-iterations", "4", "--output-dir", str(out), *RUN], timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("cskd-train: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"cskd-train: error: --output-dir {out} holds a run"), \
        result.stderr[-3000:]
    assert time.time() - started < 120  # no rank waited for a collective timeout
    assert snapshot(out) == before


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / ".lock").write_text(f"{pid} {socket.gethostname()}\n")
    assert train.main(["--max-iterations", "1", "--output-dir", str(out), *RUN]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "stale lock" in warnings[0] and str(pid) in warnings[0], err
    assert not (out / ".lock").exists()


# ---- 3. a longer schedule on resume --------------------------------------------------


def test_resume_with_a_longer_schedule_extends_the_poly_schedule(two_iterations, tmp_path, capsys):
    out = copy_run(two_iterations, tmp_path)
    assert train.main(["--max-iterations", "4", "--resume", str(out / "last.pt"), "--output-dir", str(out), *RUN]) == 0
    capsys.readouterr()
    assert train.main(["--max-iterations", "8", "--resume", str(out / "last.pt"), "--output-dir", str(out), *RUN]) == 0
    err = capsys.readouterr().err
    assert "poly schedule of 8 iterations" in err
    rows = {r["iteration"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    assert sorted(rows) == list(range(1, 9))
    for i in range(5, 9):  # the row of iteration i logs the learning rate step i ran at
        assert rows[i] == pytest.approx(0.02 * (1 - (i - 1) / 8) ** 0.9, rel=1e-9, abs=1e-15), i
        assert rows[i] > 0


def test_resume_with_a_schedule_shorter_than_the_checkpoint_is_refused(two_iterations, tmp_path, capsys):
    out = copy_run(two_iterations, tmp_path)
    before = snapshot(out)
    assert train.main(["--max-iterations", "1", "--resume", str(out / "last.pt"), "--output-dir", str(out), *RUN]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "iteration 2" in line and "--max-iterations 1" in line
    assert snapshot(out) == before


# ---- 4. metrics.jsonl -----------------------------------------------------------------


def test_torn_last_metrics_line_is_dropped_with_a_warning(two_iterations, tmp_path, capsys):
    out = copy_run(two_iterations, tmp_path)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"ce": 1.8, "aux": 1.')  # the disk filled up mid-line
    assert train.main(["--max-iterations", "4", "--resume", str(out / "last.pt"), "--output-dir", str(out), *RUN]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("cskd-train: warning: ")]
    assert len(warnings) == 1 and "torn" in warnings[0] and "metrics.jsonl" in warnings[0], err
    assert [r["iteration"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_corrupt_metrics_line_is_one_error_naming_the_line(two_iterations, tmp_path, capsys):
    out = copy_run(two_iterations, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(lines[0][:10] + "\n" + "".join(lines[1:]))
    before = snapshot(out)
    assert train.main(["--max-iterations", "4", "--resume", str(out / "last.pt"), "--output-dir", str(out), *RUN]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{out / 'metrics.jsonl'} line 1" in line
    assert snapshot(out) == before


def test_metrics_rewrite_on_resume_is_atomic(two_iterations, tmp_path, monkeypatch):
    """A crash while metrics.jsonl is cut back to the checkpoint's iteration loses none of its rows."""
    out = copy_run(two_iterations, tmp_path)
    shutil.copy(out / "last.pt", tmp_path / "at2.pt")
    assert train.main(["--max-iterations", "4", "--resume", str(out / "last.pt"), "--output-dir", str(out), *RUN]) == 0
    before = (out / "metrics.jsonl").read_bytes()
    original = os.replace

    def crash_on_metrics(src, dst, *args, **kwargs):
        if str(dst).endswith("metrics.jsonl"):
            raise KeyboardInterrupt  # killed between writing the temporary file and renaming it
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_on_metrics)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--max-iterations", "4", "--resume", str(tmp_path / "at2.pt"), "--output-dir", str(out), *RUN])
    monkeypatch.undo()
    assert (out / "metrics.jsonl").read_bytes() == before
    assert not [name for name in os.listdir(out) if name.endswith(".tmp") or name == ".lock"]


# ---- 8. hand-edited checkpoints ------------------------------------------------------------


def edit_no_rng(state):
    del state["rng"]


def edit_iteration_string(state):
    state["iteration"] = "2"


def edit_iteration_negative(state):
    state["iteration"] = -1


def edit_iteration_huge(state):
    state["iteration"] = 10 ** 12


def edit_optimizer_string(state):
    state["optimizer"] = "sgd"


def edit_optimizer_lr_string(state):
    state["optimizer"]["param_groups"][0]["lr"] = "0.02"


def edit_momentum_shape(state):
    first = next(iter(state["optimizer"]["state"].values()))
    first["momentum_buffer"] = torch.zeros(3)


def edit_scheduler_list(state):
    state["scheduler"] = [1, 2]


def edit_scheduler_total_string(state):
    state["scheduler"]["total_iters"] = "4"


def edit_loss_module_list(state):
    state["loss_module"] = ["gamma"]


def edit_best_miou_string(state):
    state["best_miou"] = "high"


def edit_nan_weight(state):
    next(v for v in state["model"].values() if v.is_floating_point()).view(-1)[0] = float("nan")


EDITS = [edit_no_rng, edit_iteration_string, edit_iteration_negative, edit_iteration_huge, edit_optimizer_string,
         edit_optimizer_lr_string, edit_momentum_shape, edit_scheduler_list, edit_scheduler_total_string,
         edit_loss_module_list, edit_best_miou_string, edit_nan_weight]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__[5:] for e in EDITS])
def test_hand_edited_checkpoint_is_one_line_and_writes_nothing(two_iterations, tmp_path, capsys, edit):
    out = copy_run(two_iterations, tmp_path)
    state = torch.load(out / "last.pt", weights_only=True)
    edit(state)
    torch.save(state, out / "last.pt")
    before = snapshot(out)
    rc = train.main(["--max-iterations", "4", "--resume", str(out / "last.pt"), "--output-dir", str(out), *RUN])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert str(out / "last.pt") in line
    assert snapshot(out) == before


# ---- 9. unwritable output directories ------------------------------------------------------------


def unwritable(tmp_path, kind):
    if kind == "file-in-path":
        (tmp_path / "a-file").write_text("x")
        return tmp_path / "a-file" / "run"
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0o500 directory anyway")
        directory = tmp_path / "ro"
        directory.mkdir()
        directory.chmod(0o500)
        return directory / "run"
    return "/proc/cskd-test"


@pytest.mark.parametrize("kind", ["file-in-path", "read-only", "proc"])
def test_unwritable_output_dir_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, kind):
    out = unwritable(tmp_path, kind)

    def no_dataset(*args, **kwargs):
        raise AssertionError("datasets were built before the output directory was checked")

    monkeypatch.setattr(train, "build_dataset", no_dataset)
    assert train.main(["--max-iterations", "1", "--output-dir", str(out), *RUN]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line


# ---- 10. a full disk -------------------------------------------------------------------------------


def no_space(obj, handle):
    handle.write(b"PK\x03\x04 part of a checkpoint")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_saving_is_one_line_and_keeps_last_pt(two_iterations, tmp_path, monkeypatch, capsys):
    out = copy_run(two_iterations, tmp_path)
    before = (out / "last.pt").read_bytes()
    monkeypatch.setattr(torch, "save", no_space)
    rc = train.main(["--max-iterations", "4", "--checkpoint-every", "1", "--resume", str(out / "last.pt"),
                     "--output-dir", str(out), *RUN])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"cskd-train: error: no space left on device while writing {out / 'last.pt'}; "
                    f"{out / 'last.pt'} of iteration 2 is intact")
    assert (out / "last.pt").read_bytes() == before
    assert not [name for name in os.listdir(out) if name.endswith(".tmp") or name == ".lock"]


def test_full_disk_before_the_first_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", no_space)
    out = tmp_path / "run"
    assert train.main(["--max-iterations", "2", "--checkpoint-every", "1", "--output-dir", str(out), *RUN]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith("no checkpoint was written yet") and "no space left on device" in line


# ---- 11. stale temporaries -------------------------------------------------------------------------------


def test_stale_temporaries_of_dead_writers_are_removed(two_iterations, tmp_path, capsys):
    out = copy_run(two_iterations, tmp_path)
    dead = out / f".last.pt.{dead_pid()}.k2j4h5g6.tmp"
    live = out / f".best.pt.{os.getppid()}.a1b2c3d4.tmp"  # pytest's parent: alive
    old_format = out / ".last.pt.x8y7z6w5.tmp"
    recent_old_format = out / ".best.pt.q1w2e3r4.tmp"
    for path in (dead, live, old_format, recent_old_format):
        path.write_bytes(b"\0" * 4096)
    two_hours_ago = time.time() - 7200
    os.utime(old_format, (two_hours_ago, two_hours_ago))
    assert train.main(["--max-iterations", "3", "--resume", str(out / "last.pt"), "--output-dir", str(out), *RUN]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "temporar" in line]
    assert len(notes) == 1 and "2" in notes[0], err
    assert not dead.exists() and not old_format.exists()
    assert live.exists() and recent_old_format.exists()


def test_temporary_names_carry_the_writer_pid(tmp_path, monkeypatch):
    seen = []

    def record(obj, handle):
        seen.extend(os.listdir(tmp_path))  # the temporary file being written
        raise OSError(errno.EIO, "stop")

    monkeypatch.setattr(torch, "save", record)
    with pytest.raises(OSError):
        ckpt.save_atomic({"format": ckpt.FORMAT}, str(tmp_path / "last.pt"))
    assert len(seen) == 1 and seen[0].startswith(f".last.pt.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert os.listdir(tmp_path) == []


# ---- 13. the umask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    out = tmp_path / "run"
    previous = os.umask(umask)
    try:
        assert train.main(["--max-iterations", "1", "--val-every", "1", "--output-dir", str(out), *TINY]) == 0
    finally:
        os.umask(previous)
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
