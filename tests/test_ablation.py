"""cskd-ablate: every objective over several seeds from one teacher, the summary and its statistics."""

import json
import math

import pytest

import train_support  # noqa: F401
from cskd_train import ablation
from train_support import read_metrics


def test_paired_interval_is_the_student_t_interval():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, 2) = 4.303
    mean, (low, high) = ablation.paired_interval([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    half = 4.303 * 0.1 / math.sqrt(3)
    assert mean == pytest.approx(0.2) and (low, high) == pytest.approx((0.2 - half, 0.2 + half))


def test_summary_compares_each_objective_with_cwd_seed_by_seed():
    rows = ablation.summarise({"CWD": [0.5, 0.6], "CSKD": [0.55, 0.64], "CE": [0.4, 0.45]})
    assert "diff" not in rows["CWD"]
    assert rows["CSKD"]["diff"] == pytest.approx(0.045)
    assert rows["CE"]["mean"] == pytest.approx(0.425) and rows["CE"]["std"] == pytest.approx(0.0353553, rel=1e-5)
    table = ablation.format_table(rows, 2)
    assert "CSKD" in table and "+0.0450" in table


@pytest.mark.parametrize("argv, message", [(["--seeds", "1"], "--seeds must be at least 2"),
                                           (["--objectives", "CE", "CSKD"], "--objectives must include CWD")])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablation.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_tiny_ablation_runs_every_objective_for_every_seed(tmp_path, capsys):
    out = tmp_path / "ablation"
    assert ablation.main(["--output-dir", str(out), "--seeds", "2", "--teacher-iterations", "1",
                          "--student-iterations", "1", "--batch-size", "3", "--image-size", "40",
                          "--train-images", "6", "--val-images", "2", "--threads", "1", "--no-progress"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["mious"]) == set(ablation.OBJECTIVES)
    assert all(len(values) == 2 for values in saved["mious"].values())
    assert (out / "ablation.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "paired difference against CWD" in printed and "CSKD MSE" in printed
    # Each objective really ran as named: the CSKD runs log their terms, CAM only has no PAM part, and so on.
    rows = {name: [r for r in read_metrics(out / f"{name}_seed1") if "loss" in r] for name in
            ("ce", "cwd", "cskd", "cam_only", "pam_only", "cskd_mse")}
    assert not any("cwd" in r for r in rows["ce"]) and all("cwd" in r and "cam" not in r for r in rows["cwd"])
    assert all(r["pam"] == 0 and r["cam"] > 0 for r in rows["cam_only"])
    assert all(r["cam"] == 0 and r["pam"] > 0 for r in rows["pam_only"])
    assert all(r["cam"] > 0 and r["pam"] > 0 for r in rows["cskd"] + rows["cskd_mse"])
