"""CSKDLoss under DistributedDataParallel: 2 torchrun processes on gloo keep identical gammas."""

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("ddp_cskd_worker.py")


def _run(tmp_path, mode):
    out = tmp_path / f"gammas_{mode}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(WORKER), str(out), mode]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_gammas_stay_identical_across_ranks_with_ddp(tmp_path):
    rank0, rank1 = _run(tmp_path, "ddp")
    assert rank0 == rank1
    assert rank0 != [0.0, 0.0], "the gammas never moved: the test would not show synchronisation"
    # Without DDP each rank's gammas follow its own data: the check above can fail.
    plain0, plain1 = _run(tmp_path, "plain")
    assert plain0 != plain1
