"""cskd-train under torchrun (2 gloo processes) when a rank freezes or is interrupted, and at small batches.

- A frozen (SIGSTOPped) rank: the other stops after --ddp-timeout with one line naming it.
- SIGINT to one rank stops every rank; last.pt and metrics.jsonl stay consistent.
- SIGTERM to torchrun: the ranks save and exit; no traceback from our code.
- --distill cskd refuses batches under 3 images per CKA at start-up; --cka-global-batch takes the CKAs
  over the batch of both processes (2 images each).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

import train_support  # noqa: F401
from cskd_train import train
from cskd_train.checkpoint import load_training_checkpoint
from train_support import TINY, distill_flags, read_metrics, subprocess_env

LONG_RUN = ["--max-iterations", "400", "--log-every", "1", "--val-every", "1000", *TINY]


def torchrun(args, **kwargs):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "cskd_train.train", *args]
    return subprocess.Popen(command, env=subprocess_env(), text=True, **kwargs)


def rank_process(launcher, rank, timeout=60):
    """The psutil.Process of a rank started by torchrun (found by its RANK variable)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never started")


def wait_for_metrics(out, rows, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= rows:
            return
        time.sleep(0.2)
    raise AssertionError("the run logged nothing")


def our_traceback(text):
    """Traceback lines that come from the training application (torchrun's own are not ours)."""
    return [line for line in text.splitlines() if "cskd_train" in line and "File " in line]


def test_frozen_rank_is_named_after_the_timeout(tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "stderr", "w") as err:
        launcher = torchrun([*LONG_RUN, "--output-dir", str(out), "--ddp-timeout", "5"], stderr=err,
                            stdout=subprocess.DEVNULL)
        frozen = rank_process(launcher, 1)
        wait_for_metrics(out, 2)
        frozen.suspend()
        frozen_at = time.time()
        try:
            deadline = time.time() + 120
            while "stopped answering" not in (tmp_path / "stderr").read_text() and time.time() < deadline:
                time.sleep(0.2)
            detected_after = time.time() - frozen_at
        finally:
            # torchrun would wait 30 s for a stopped process to take its SIGTERM; it may be gone already
            # (the agent's own kill after the surviving rank stopped), which is no failure of this test.
            with contextlib.suppress(psutil.NoSuchProcess):
                frozen.kill()
            launcher.wait(timeout=120)
    stderr = (tmp_path / "stderr").read_text()
    lines = [line for line in stderr.splitlines() if line.startswith("cskd-train:")]
    assert len(lines) == 1 and "rank 1 stopped answering" in lines[0] and "--ddp-timeout 5 s" in lines[0], stderr
    assert detected_after < 60, detected_after
    assert not our_traceback(stderr), stderr


def test_sigint_to_one_rank_stops_every_rank_consistently(tmp_path):
    out = tmp_path / "run"
    launcher = torchrun([*LONG_RUN, "--output-dir", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    rank1 = rank_process(launcher, 1)
    wait_for_metrics(out, 2)
    rank1.send_signal(signal.SIGINT)
    _, stderr = launcher.communicate(timeout=180)
    assert "SIGINT received: checkpoint saved" in stderr, stderr
    assert not our_traceback(stderr), stderr
    saved = load_training_checkpoint(str(out / "last.pt"))["iteration"]
    logged = [row["iteration"] for row in read_metrics(out) if "loss" in row]
    assert 2 <= saved < 400 and logged == list(range(1, saved + 1))


def test_sigterm_to_torchrun_saves_without_a_traceback_of_ours(tmp_path):
    out = tmp_path / "run"
    launcher = torchrun([*LONG_RUN, "--output-dir", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    wait_for_metrics(out, 2)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=180)
    assert "SIGTERM received: checkpoint saved" in stderr, stderr
    assert not our_traceback(stderr), stderr
    assert load_training_checkpoint(str(out / "last.pt"))["iteration"] >= 2


@pytest.mark.parametrize("batch", ["1", "2"])
def test_cskd_at_a_batch_under_three_is_refused_at_start(tmp_path, capsys, batch):
    flags = distill_flags(tmp_path)
    out = tmp_path / "run"
    rc = train.main(["--max-iterations", "1", "--output-dir", str(out), *TINY, *flags, "--batch-size", batch])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at least 3 images per CKA" in err and "--cka-global-batch" in err, err
    assert not out.exists()


def test_cka_global_batch_needs_cskd(capsys):
    assert train.main(["--cka-global-batch", *TINY]) == 2
    assert "needs --distill cskd" in capsys.readouterr().err


def test_cka_global_batch_trains_two_images_a_process(tmp_path):
    """2 processes x 2 images: refused per process, trained with the CKAs over the 4 images."""
    flags = distill_flags(tmp_path)
    common = ["--max-iterations", "2", "--log-every", "1", "--val-every", "2", *TINY, *flags, "--batch-size", "2"]
    refused = torchrun([*common, "--output-dir", str(tmp_path / "local")], stderr=subprocess.PIPE,
                       stdout=subprocess.DEVNULL)
    _, stderr = refused.communicate(timeout=240)
    assert refused.returncode != 0 and stderr.count("cskd-train: error:") == 1, stderr
    assert "or add --cka-global-batch" in stderr
    run = torchrun([*common, "--cka-global-batch", "--output-dir", str(tmp_path / "global")],
                   stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _, stderr = run.communicate(timeout=240)
    assert run.returncode == 0, stderr
    rows = [row for row in read_metrics(tmp_path / "global") if "loss" in row]
    assert [row["iteration"] for row in rows] == [1, 2]
    # Over 2 samples the CKA loss would be -log(1) = 0 exactly; over 4 it is not.
    assert all(row["cam"] > 1e-6 and row["pam"] > 1e-6 for row in rows), rows
    assert torch.load(tmp_path / "global" / "last.pt", weights_only=True)["iteration"] == 2
