"""cskd_train --compile-loss: the CSKD loss under torch.compile inside a training run.

On the CPU torch.compile runs the loss through Inductor with the C++ kernels
as opaque ops (no CUDA graphs, which is what the flag is for on a GPU); these
tests check what must hold on every device: the run trains the same losses
as an eager run, writes the same checkpoint keys, resumes exactly, and the
flag is refused where there is no CSKD loss.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import train_support  # noqa: F401
from cskd_train import train
from cskd_train.checkpoint import load_training_checkpoint
from train_support import TINY, distill_flags, loss_rows, read_metrics

pytestmark = pytest.mark.compile

RUN = ["--max-iterations", "4", "--log-every", "1", "--val-every", "4", *TINY]


def _losses(output_dir):
    return [row for row in loss_rows(read_metrics(output_dir)) if "loss" in row]


def test_compiled_loss_trains_like_eager(tmp_path):
    """Projection "fixed": no random draw, so compiled and eager runs see the same loss, step after step."""
    flags = [*distill_flags(tmp_path), "--projection", "fixed"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.main([*RUN, "--output-dir", str(eager), *flags]) == 0
    torch._dynamo.reset()
    counters["stats"].clear()
    assert train.main([*RUN, "--output-dir", str(compiled), "--compile-loss", *flags]) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the loss did run compiled
    want, got = _losses(eager), _losses(compiled)
    assert [r["iteration"] for r in got] == [1, 2, 3, 4]
    for w, g in zip(want, got):
        for part in ("loss", "cam", "pam", "cskd"):
            assert g[part] == pytest.approx(w[part], rel=1e-4, abs=1e-6), (part, g["iteration"])
    eager_state = load_training_checkpoint(str(eager / "last.pt"))["loss_module"]
    compiled_state = load_training_checkpoint(str(compiled / "last.pt"))["loss_module"]
    assert compiled_state.keys() == eager_state.keys()  # no "_orig_mod." prefixes: checkpoints interchange


def test_compiled_loss_resumes_exactly(tmp_path):
    """The released projection ("resample", random draws inside the compiled loss): stopped and resumed == uninterrupted."""
    flags = [*distill_flags(tmp_path), "--compile-loss"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train.main([*RUN, "--output-dir", str(full), *flags]) == 0
    assert train.main([*RUN, "--output-dir", str(parts), "--stop-after", "2", *flags]) == 0
    assert train.main([*RUN, "--output-dir", str(parts), "--resume", str(parts / "last.pt"), *flags]) == 0
    assert loss_rows(read_metrics(parts)) == loss_rows(read_metrics(full))
    assert torch.equal(torch.load(full / "last.pt", weights_only=True)["loss_module"]["cskd.gamma_cam"],
                       torch.load(parts / "last.pt", weights_only=True)["loss_module"]["cskd.gamma_cam"])


def test_compile_loss_needs_the_cskd_loss(capsys):
    with pytest.raises(train.TrainingError, match="--compile-loss compiles the CSKD loss: it needs --distill cskd"):
        train.parse_args(["--compile-loss", *TINY])
