"""cskd-train's released loss variants: --similarity mse with --adapter, and the Hinton KD term --lambda-kd."""

import json

import pytest
import torch

import train_support  # noqa: F401
from cskd_kernels import released
from cskd_train import train
from cskd_train.checkpoint import load_training_checkpoint
from cskd_train.objective import kd_loss
from train_support import TINY, distill_flags, read_metrics

RUN = ["--max-iterations", "2", "--log-every", "1", "--val-every", "2", *TINY]


@pytest.fixture(scope="module")
def teacher_flags(tmp_path_factory):
    return distill_flags(tmp_path_factory.mktemp("teacher"))


def _step_rows(output_dir):
    return [row for row in read_metrics(output_dir) if "loss" in row]


def _config(output_dir):
    with open(output_dir / "config.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("adapter", ["resample", "fixed", "learned"])
def test_mse_variant_trains(tmp_path, teacher_flags, adapter):
    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out), *teacher_flags, "--similarity", "mse",
                       "--adapter", adapter]) == 0
    rows = _step_rows(out)
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:
        for part in ("cam", "pam", "cskd"):
            assert row[part] > 0 and row[part] == pytest.approx(row[part])  # an MSE: positive, finite
        assert row["cskd"] == pytest.approx(0.3 * row["cam"] + 0.8 * row["pam"], rel=1e-5)
    config = _config(out)
    assert (config["similarity"], config["adapter"]) == ("mse", adapter)
    state = load_training_checkpoint(str(out / "last.pt"))["loss_module"]
    assert ("cskd.adapter.weight" in state) == (adapter != "resample")
    if adapter != "resample":
        assert state["cskd.adapter.weight"].shape == (feature_width(teacher_flags), feature_width(None))
    if adapter == "learned":  # trained: moved away from its initial draw, which a fixed run keeps
        fixed = tmp_path / "fixed"
        assert train.main([*RUN, "--output-dir", str(fixed), *teacher_flags, "--similarity", "mse",
                           "--adapter", "fixed"]) == 0
        initial = load_training_checkpoint(str(fixed / "last.pt"))["loss_module"]["cskd.adapter.weight"]
        assert not torch.equal(state["cskd.adapter.weight"], initial)
        torch.testing.assert_close(state["cskd.adapter.weight"], initial, rtol=0, atol=0.1)  # the same draw


def feature_width(teacher_flags):
    """Feature channels of the teacher (deeplabv3_resnet18) or, for None, the student (deeplabv3_mobilenetv2)."""
    from cskd_train.models import build_model, feature_channels

    return feature_channels(build_model("deeplabv3_resnet18" if teacher_flags else "deeplabv3_mobilenetv2", 19))


def test_mse_defaults_to_the_resampled_adapter_and_takes_any_batch(teacher_flags):
    args = train.parse_args([*teacher_flags, "--similarity", "mse", "--batch-size", "1"])
    assert (args.similarity, args.adapter) == ("mse", "resample")
    args = train.parse_args([*teacher_flags])
    assert (args.similarity, args.adapter) == ("cka", None)


def test_lambda_kd_adds_the_released_kd_term(tmp_path, teacher_flags):
    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out), *teacher_flags, "--lambda-kd", "2.5",
                       "--kd-temperature", "3"]) == 0
    rows = _step_rows(out)
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:
        assert row["kd"] > 0
        total = row["ce"] + 0.4 * row.get("aux", 0.0) + 3.0 * row["cwd"] + row["cskd"] + 2.5 * row["kd"]
        assert row["loss"] == pytest.approx(total, rel=1e-5)
    config = _config(out)
    assert (config["lambda_kd"], config["kd_temperature"]) == (2.5, 3.0)
    plain = tmp_path / "plain"
    assert train.main([*RUN, "--output-dir", str(plain), *teacher_flags]) == 0
    assert all("kd" not in row for row in _step_rows(plain))  # off by default (--lambda-kd 0)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_is_the_released_criterion_kd(temperature):
    student = torch.randn(3, 19, 5, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 19, 5, 7, dtype=torch.float64) * 3
    ours = kd_loss(student, teacher, temperature)
    theirs = released.kd_loss(student, teacher, temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=0)
    # T^2 / (B*H*W) * sum over pixels of KL(p_t || p_s), p = softmax over classes of logits / T
    p_t = torch.softmax(teacher / temperature, dim=1)
    kl = (p_t * (torch.log_softmax(teacher / temperature, 1) - torch.log_softmax(student / temperature, 1))).sum(1)
    torch.testing.assert_close(ours, temperature**2 * kl.sum() / (3 * 5 * 7), rtol=1e-12, atol=0)
    ours.backward()
    assert student.grad.abs().max() > 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--similarity", "cka", "--adapter", "fixed"], "--adapter fixed applies only to --similarity mse"),
        (["--adapter", "learned"], "--adapter learned applies only to --similarity mse"),
        (["--similarity", "mse", "--cka-global-batch"], "--cka-global-batch applies only to --similarity cka"),
        (["--kd-temperature", "0", "--lambda-kd", "1"], "--kd-temperature must be > 0, got 0.0"),
        ("none:--lambda-kd 1", "--lambda-kd needs a teacher: use --distill cwd or cskd"),
        ("cwd:--similarity mse", "--similarity is an option of the CSKD loss: it needs --distill cskd, got --distill cwd"),
    ],
)
def test_refusals_are_one_line_before_anything_is_written(tmp_path, capsys, teacher_flags, flags, message):
    if isinstance(flags, str):
        distill, extra = flags.split(":")
        base = [f for f in teacher_flags if f != "cskd"]
        base[base.index("--distill") + 1: base.index("--distill") + 1] = [distill]
        if distill == "none":
            base = ["--distill", "none"]
        flags = [*base, *extra.split()]
    else:
        flags = [*teacher_flags, *flags]
    out = tmp_path / "never"
    assert train.main([*RUN, "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cskd-train: error: ") and message in err, err
    assert not out.exists()
