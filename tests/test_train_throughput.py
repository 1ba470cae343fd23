"""cskd-train's throughput fields (images/s) and the CSKD loss's share of the step (cskd_train/throughput.py)."""

import time

import pytest
import torch

import train_support  # noqa: F401
from cskd_train import train
from cskd_train.throughput import StepTiming, with_totals
from train_support import TINY, distill_flags, read_metrics

RUN = ["--max-iterations", "4", "--log-every", "2", "--val-every", "4", *TINY]


def _training_rows(out):
    return [row for row in read_metrics(out) if "loss" in row]


def test_cskd_rows_have_images_per_s_and_the_share(tmp_path):
    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out), *distill_flags(tmp_path)]) == 0
    rows = _training_rows(out)
    assert [row["iteration"] for row in rows] == [2, 4]
    for row in rows:
        assert row["images_per_s"] > 0
        assert row["images_per_s_total"] == row["images_per_s"]  # one process
        assert 0 < row["cskd_share"] < 1
        assert 0 < row["cskd_ms"] < row["step_ms"]
        assert row["cskd_share"] == pytest.approx(row["cskd_ms"] / row["step_ms"])
        # images/s counts the whole step (and the batch's loading): at most batch / step time
        assert row["images_per_s"] <= 3 / (row["step_ms"] / 1000) * 1.001


def test_rows_without_cskd_have_images_per_s_only(tmp_path):
    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out)]) == 0
    for row in _training_rows(out):
        assert row["images_per_s"] > 0 and row["images_per_s_total"] == row["images_per_s"]
        assert "cskd_share" not in row and "cskd_ms" not in row


def test_total_is_the_sum_over_ranks():
    assert with_totals({"images_per_s": 10.0, "loss": 1.0}, 4) == {
        "images_per_s": 10.0, "images_per_s_total": 40.0, "loss": 1.0}


class _Sleep(torch.autograd.Function):
    """Identity that sleeps `forward` seconds in its forward and `backward` seconds in its backward."""

    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward_seconds = backward
        time.sleep(forward)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_seconds)
        return grad, None, None


class _SlowLoss(torch.nn.Module):
    """A CSKDLoss stand-in: 40 ms forward, 60 ms backward, returning a CSKDOutput."""

    def forward(self, feat_s, feat_t):
        from cskd_kernels.modules.cskd_loss import CSKDOutput

        value = (_Sleep.apply(feat_s, 0.04, 0.06) * feat_t).mean()
        return CSKDOutput(value, value.detach(), value.detach())


def test_the_marks_bracket_exactly_the_loss():
    """Forward and backward of the loss are timed, the rest of the step (a slow head, its backward, the
    part of the graph before the features) is not: autograd runs the loss's backward in one block."""
    timing = StepTiming("cpu", batch_size=2)
    weight = torch.ones(4, requires_grad=True)
    loss_module = _SlowLoss()
    for _ in range(2):
        started = time.perf_counter()
        timing.begin_step()
        features = _Sleep.apply(torch.randn(2, 4) * weight, 0.01, 0.05)  # the backbone: 50 ms of backward
        head = _Sleep.apply(features, 0.02, 0.08).sum()  # created before the loss, 80 ms of backward
        out = timing(loss_module, features, torch.randn(2, 4))
        (head + out.loss).backward()
        timing.end_step(time.perf_counter() - started)
    fields = timing.read()
    # per step: 100 ms in the loss (its sleeps), 160 ms outside it
    assert fields["cskd_ms"] == pytest.approx(100, abs=15)
    assert fields["step_ms"] == pytest.approx(260, abs=40)
    assert fields["cskd_share"] == pytest.approx(100 / 260, abs=0.06)
    assert fields["images_per_s"] == pytest.approx(2 / 0.26, rel=0.2)
    assert timing.read() == {}  # a new interval


def test_a_step_without_backward_is_left_out_of_the_share():
    timing = StepTiming("cpu", batch_size=1)
    timing.begin_step()
    timing(_SlowLoss(), torch.randn(2, 4, requires_grad=True), torch.randn(2, 4))  # no backward (a skipped step)
    timing.end_step(0.1)
    fields = timing.read()
    assert fields == {"images_per_s": pytest.approx(10.0)}
