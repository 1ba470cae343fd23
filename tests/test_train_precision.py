"""cskd-train --precision (bf16, fp16 with a gradient scaler) and --device auto, on the CPU."""

import json

import pytest
import torch

import train_support  # noqa: F401
from cskd_train import evaluate, train
from cskd_train.checkpoint import load_training_checkpoint
from train_support import TINY, distill_flags, loss_rows, read_metrics

RUN = ["--max-iterations", "6", "--log-every", "1", "--val-every", "3", *TINY]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_exact_in_reduced_precision(tmp_path, precision):
    """CSKD distillation under autocast, interrupted after 4 of 6 iterations and resumed == uninterrupted."""
    extra = [*distill_flags(tmp_path), "--precision", precision]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train.main([*RUN, "--output-dir", str(full), *extra]) == 0
    assert train.main([*RUN, "--output-dir", str(parts), "--stop-after", "4", *extra]) == 0
    assert train.main([*RUN, "--output-dir", str(parts), "--resume", str(parts / "last.pt"), *extra]) == 0
    expected = loss_rows(read_metrics(full))
    assert loss_rows(read_metrics(parts)) == expected
    losses = [row for row in expected if "loss" in row]
    assert len(losses) + sum("scaler_skipped" in row for row in expected) == 6
    assert all(row["cam"] > 0 and row["pam"] > 0 for row in losses)  # the CSKD term is there
    state = load_training_checkpoint(str(full / "last.pt"))
    assert state["precision"] == precision
    assert ("scaler" in state) == (precision == "fp16")
    assert torch.equal(state["model"]["head.block.4.weight"],
                       load_training_checkpoint(str(parts / "last.pt"))["model"]["head.block.4.weight"])


def test_the_forward_runs_in_bfloat16(tmp_path, monkeypatch):
    flags = distill_flags(tmp_path)  # trains the teacher first, in float32
    seen = []
    from cskd_train.objective import Objective

    original = Objective.forward

    def spy(self, student, labels, teacher=None):
        seen.append((student.features.dtype, teacher.features.dtype))
        return original(self, student, labels, teacher)

    monkeypatch.setattr(Objective, "forward", spy)
    assert train.main(["--max-iterations", "1", "--output-dir", str(tmp_path / "run"), *TINY, *flags,
                       "--precision", "bf16"]) == 0
    # The losses get the features as autocast makes them: no upcast copy before the CSKD loss.
    assert seen == [(torch.bfloat16, torch.bfloat16)]


def test_resume_in_another_precision_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out), "--stop-after", "2", "--precision", "bf16"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    rc = train.main([*RUN, "--output-dir", str(out), "--resume", str(out / "last.pt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "was trained with --precision bf16: resume it with --precision bf16, not fp32" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_fp16_overflow_is_skipped_by_the_scaler_and_counted_apart(tmp_path, monkeypatch):
    """A scale so large that every scaled gradient overflows: the scaler skips the steps (and lowers the
    scale); they are not the float32 non-finite skips, which would stop the run after --max-nonfinite."""
    def huge_scaler(precision, device):
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 100) if precision == "fp16" else None

    monkeypatch.setattr(train, "grad_scaler", huge_scaler)
    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out), "--precision", "fp16", "--max-nonfinite", "1"]) == 0
    rows = read_metrics(out)
    skipped = [row for row in rows if row.get("scaler_skipped")]
    assert skipped and not any(row.get("nonfinite") for row in rows)
    assert skipped[-1]["scaler_skips_total"] == len(skipped)
    assert all(row["scale"] < 2.0 ** 100 for row in skipped)
    assert load_training_checkpoint(str(out / "last.pt"))["scaler_skips_total"] == len(skipped)


def test_device_auto_is_printed_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--max-iterations", "1", "--output-dir", str(out), *TINY]) == 0
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cskd-train: device")]
    assert printed == [f"cskd-train: device {expected} (--device auto), precision fp32"]
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "auto" and config["resolved_device"] == expected


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    pytest.param(["--device", "cuda"], "--device cuda was asked for but CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_bad_precision_or_device_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) if "fp8" in flags else _no_exit() as exit_info:
        rc = train.main(["--max-iterations", "1", "--output-dir", str(out), *TINY, *flags])
    rc = exit_info.value.code if exit_info is not None and hasattr(exit_info, "value") else rc
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


class _no_exit:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_fp16_without_autocast_support_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    out = tmp_path / "run"
    assert train.main(["--max-iterations", "1", "--output-dir", str(out), *TINY, "--device", "cpu",
                       "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cskd-train: error: --precision fp16: torch has no autocast for cpu devices"
    assert not out.exists()


def test_eval_in_bf16(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--max-iterations", "1", "--output-dir", str(out), *TINY]) == 0
    assert evaluate.main(["--model", "deeplabv3_resnet18", "--checkpoint", str(out / "last.pt"), "--synthetic-size",
                          "40", "--synthetic-images", "2", "--precision", "bf16"]) == 0
    assert "mIoU" in capsys.readouterr().out
