"""cskd-train's habits: defaults in --help, validation printed as it comes, the step's own lr logged,
a titled curves.png, --tensorboard with the same scalars as metrics.jsonl."""

import pytest

import train_support  # noqa: F401
from cskd_train import train
from train_support import TINY, read_metrics

RUN = ["--max-iterations", "3", "--log-every", "1", "--val-every", "2", *TINY]


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: 0.02)" in text and "(default: auto)" in text and "(default: fp32)" in text


def test_validation_is_printed_as_it_comes_and_the_logged_lr_is_the_steps(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out), "--lr", "0.05", "--power", "0.9"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "validation mIoU" in line]
    miou = [row["miou"] for row in read_metrics(out) if "miou" in row]
    assert printed == [f"cskd-train: iteration 2: validation mIoU {miou[0]:.4f} (best {miou[0]:.4f})",
                       f"cskd-train: iteration 3: validation mIoU {miou[1]:.4f} (best {max(miou):.4f})"]
    lrs = [row["lr"] for row in read_metrics(out) if "loss" in row]
    # Step i (1-based) runs at base_lr * (1 - (i-1)/max)^power: the first at the base lr, none at 0.
    assert lrs == pytest.approx([0.05 * (1 - i / 3) ** 0.9 for i in range(3)])


def test_curves_are_titled_with_the_run(tmp_path, monkeypatch):
    from cskd_train import plot

    titles = []
    monkeypatch.setattr(plot, "plot_curves", lambda metrics, png, title=None: titles.append(title))
    out = tmp_path / "my-run"
    assert train.main([*[a for a in RUN if a != "--no-plot"], "--output-dir", str(out)]) == 0
    assert titles == ["my-run: deeplabv3_resnet18, --distill none, iteration 3"]


def test_tensorboard_has_the_scalars_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train.main([*RUN, "--output-dir", str(out), "--tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = read_metrics(out)
    for key in ("loss", "ce", "lr", "miou"):
        expected = [(row["iteration"], row[key]) for row in rows if key in row]
        got = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in got] == [step for step, _ in expected]
        assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6)
    # --overwrite starts the event files over too
    assert train.main([*RUN, "--output-dir", str(out), "--overwrite", "--max-iterations", "1", "--tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1]
