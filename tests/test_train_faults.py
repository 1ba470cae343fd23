"""Checkpoints and faults: atomic writes, exact resume, signals, bad checkpoints, non-finite losses."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_support  # noqa: F401
from cskd_train import checkpoint as ckpt
from cskd_train import objective, train
from cskd_train.checkpoint import CheckpointError, load_training_checkpoint, save_atomic
from train_support import TINY, distill_flags, loss_rows, read_metrics, run_module, subprocess_env

RUN = ["--max-iterations", "6", "--log-every", "1", "--val-every", "3", *TINY]


# ---- atomic writes ---------------------------------------------------------


def test_killed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"format": ckpt.FORMAT, "iteration": 1}, str(path))

    def torn_save(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies in the middle of the write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"format": ckpt.FORMAT, "iteration": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["iteration"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_checkpoint_holds_what_a_resume_needs(tmp_path):
    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out), *distill_flags(tmp_path)]) == 0
    state = load_training_checkpoint(str(out / "last.pt"))  # weights_only=True inside
    assert state["iteration"] == 6
    for key in ("model", "optimizer", "scheduler", "loss_module", "rng"):
        assert state[key]
    assert {"cskd.gamma_cam", "cskd.gamma_pam"} <= set(state["loss_module"])
    assert (out / "curves.png").exists() is False  # --no-plot


# ---- exact resume ----------------------------------------------------------


@pytest.mark.parametrize("distill", [False, True], ids=["ce", "cskd"])
def test_resume_logs_the_same_losses(tmp_path, distill):
    """Interrupted after 4 of 6 iterations (mid-epoch 2: 6 images, batch 2) and resumed == uninterrupted."""
    extra = distill_flags(tmp_path) if distill else []
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train.main([*RUN, "--output-dir", str(full), *extra]) == 0
    assert train.main([*RUN, "--output-dir", str(parts), "--stop-after", "4", *extra]) == 0
    assert load_training_checkpoint(str(parts / "last.pt"))["iteration"] == 4
    assert train.main([*RUN, "--output-dir", str(parts), "--resume", str(parts / "last.pt"), *extra]) == 0
    expected = loss_rows(read_metrics(full))
    assert [r["iteration"] for r in expected if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert loss_rows(read_metrics(parts)) == expected
    assert torch.equal(torch.load(full / "last.pt", weights_only=True)["model"]["head.block.4.weight"],
                       torch.load(parts / "last.pt", weights_only=True)["model"]["head.block.4.weight"])


def test_sigterm_saves_and_resume_continues_exactly(tmp_path):
    """A SIGTERM mid-run saves last.pt and exits without a traceback; resuming replays the uninterrupted run."""
    out = tmp_path / "run"
    args = ["--max-iterations", "400", "--log-every", "1", "--val-every", "1000", "--output-dir", str(out), *TINY]
    process = subprocess.Popen([sys.executable, "-m", "cskd_train.train", *args], env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM received" in err
    stopped_at = load_training_checkpoint(str(out / "last.pt"))["iteration"]
    assert 2 <= stopped_at < 400
    resumed = run_module("cskd_train.train", [*args, "--resume", str(out / "last.pt"), "--stop-after", "2"])
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "reference"
    ref_args = [a if a != str(out) else str(reference) for a in args]
    assert train.main([*ref_args, "--stop-after", str(stopped_at + 2)]) == 0
    assert loss_rows(read_metrics(out)) == loss_rows(read_metrics(reference))


# ---- bad checkpoints -------------------------------------------------------


class Payload:
    """A pickled object: weights_only=True must refuse to build it."""

    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def bad_checkpoints(tmp_path, good):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint at all" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    unsafe = tmp_path / "unsafe.pt"
    with open(unsafe, "wb") as handle:
        pickle.dump({"format": ckpt.FORMAT, "model": Payload()}, handle)
    return {"truncated": truncated, "corrupt": corrupt, "foreign": foreign, "unsafe": unsafe,
            "missing": tmp_path / "missing.pt"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(["--max-iterations", "2", "--output-dir", str(out), *TINY]) == 0
    return out


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "foreign", "unsafe", "missing"])
@pytest.mark.parametrize("flag", ["--resume", "--teacher-checkpoint"])
def test_bad_checkpoint_is_one_line_and_overwrites_nothing(tmp_path, finished_run, kind, flag):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "config.json")}
    bad = bad_checkpoints(tmp_path, out / "last.pt")[kind]
    if flag == "--resume":
        args = ["--resume", str(bad)]
    else:
        # --overwrite: a fresh run in the used directory, which must still delete nothing before the check
        args = ["--overwrite", "--distill", "cwd", "--teacher-model", "deeplabv3_resnet18", "--teacher-checkpoint",
                str(bad)]
    result = run_module("cskd_train.train", ["--max-iterations", "4", "--output-dir", str(out), *args, *TINY])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "should-never-run" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(bad) in result.stderr
    assert {name: (out / name).read_bytes() for name in before} == before


def test_resume_of_another_model_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--max-iterations", "1", "--output-dir", str(out), *TINY]) == 0
    rc = train.main(["--model", "pspnet_resnet18", "--resume", str(out / "last.pt"), "--output-dir", str(out), *TINY])
    assert rc == 2
    assert "holds a deeplabv3_resnet18" in capsys.readouterr().err


# ---- non-finite losses -----------------------------------------------------


def poison_losses(monkeypatch, bad_calls):
    """Make the objective's total NaN on the given (1-based) calls."""
    original = objective.Objective.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        parts = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(objective.Objective, "forward", forward)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    poison_losses(monkeypatch, {2, 3})
    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out)]) == 0
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows if r.get("nonfinite")] == [2, 3]
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 4, 5, 6]
    state = load_training_checkpoint(str(out / "last.pt"))
    assert state["nonfinite_total"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "non-finite loss, step skipped" in capsys.readouterr().err


def test_many_nonfinite_in_a_row_stop_with_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    poison_losses(monkeypatch, set(range(3, 100)))
    out = tmp_path / "run"
    rc = train.main([*RUN, "--checkpoint-every", "1", "--max-nonfinite", "3", "--output-dir", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "3 non-finite losses in a row at iteration 5" in err
    state = load_training_checkpoint(str(out / "last.pt"))
    # Saved at iteration 4 (skipped steps leave the weights as they were), not at the stop.
    assert state["iteration"] == 4 and state["nonfinite_total"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
