"""CSKDLoss under DistributedDataParallel: 2 torchrun processes on gloo.

- The loss module wrapped in DDP keeps identical gammas on every rank.
- global_batch=True with 2 images a rank computes the CKA of the 4 images exactly as one process does:
  same loss, and after DDP's averaging the same gradients for the student and the loss module.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_global_batch_case import build, draw_seed, images

HERE = Path(__file__).parent


def _torchrun(script, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _run(tmp_path, mode):
    out = tmp_path / f"gammas_{mode}.json"
    _torchrun("ddp_cskd_worker.py", str(out), mode)
    return json.loads(out.read_text())


def test_gammas_stay_identical_across_ranks_with_ddp(tmp_path):
    rank0, rank1 = _run(tmp_path, "ddp")
    assert rank0 == rank1
    assert rank0 != [0.0, 0.0], "the gammas never moved: the test would not show synchronisation"
    # Without DDP each rank's gammas follow its own data: the check above can fail.
    plain0, plain1 = _run(tmp_path, "plain")
    assert plain0 != plain1


def _one_process(projection):
    """Loss parts and gradients of one process that sees the whole batch of 4."""
    student, teacher, loss_module = build(projection, global_batch=False)
    batch = images()
    torch.manual_seed(draw_seed(0))
    with torch.no_grad():
        feat_t = teacher(batch)
    out = loss_module(student(batch), feat_t)
    out.loss.backward()
    grads = {f"student.{n}": p.grad for n, p in student.named_parameters()}
    grads.update({f"loss.{n}": p.grad for n, p in loss_module.named_parameters()})
    return torch.stack([t.detach() for t in out]), grads


@pytest.mark.parametrize("projection", ["learned", "resample"])
def test_global_batch_is_one_process_with_the_whole_batch(tmp_path, projection):
    path = tmp_path / "ranks.pt"
    _torchrun("ddp_global_batch_worker.py", str(path), projection)
    ranks = torch.load(path, weights_only=True)
    expected_parts, expected_grads = _one_process(projection)
    for parts in ranks["parts"]:  # every rank computed the loss of all 4 images (resample: rank 0's draws)
        torch.testing.assert_close(parts, expected_parts, rtol=1e-5, atol=1e-6)
    assert set(ranks["grads"]) == set(expected_grads)
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, f"{name}: no gradient, the comparison would show nothing"
        torch.testing.assert_close(ranks["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_two_images_a_process_without_global_batch_is_refused():
    student, teacher, loss_module = build("fixed", global_batch=False)
    batch = images()[:2]
    with pytest.raises(ValueError, match=r"at least 3 samples, got a batch of 2.*global_batch=True"):
        loss_module(student(batch), teacher(batch))


def test_global_batch_without_a_process_group_is_the_ordinary_loss():
    _, _, plain = build("fixed", global_batch=False)
    _, _, global_ = build("fixed", global_batch=True)
    feat_s, feat_t = torch.randn(3, 16, 6, 7), torch.randn(3, 32, 6, 7)
    torch.testing.assert_close(global_(feat_s, feat_t).loss, plain(feat_s, feat_t).loss)
    with pytest.raises(ValueError, match=r"global batch of 2 \(1 process"):
        global_(feat_s[:2], feat_t[:2])
