"""Every Python block of docs/*.md runs as pasted (a block marked ```python fragment is skipped)."""

import glob
import os
import re

import pytest

import train_support

DOCS = sorted(glob.glob(os.path.join(train_support.REPO, "docs", "*.md")))
BLOCKS = [(os.path.basename(path), index, code)
          for path in DOCS
          for index, code in enumerate(re.findall(r"^```python\n(.*?)^```", open(path, encoding="utf-8").read(),
                                                  flags=re.S | re.M))]


def test_there_are_blocks_to_run():
    assert BLOCKS


@pytest.mark.parametrize("name, index, code", BLOCKS, ids=[f"{name}:{index}" for name, index, _ in BLOCKS])
def test_block_runs(name, index, code):
    exec(compile(code, f"{name} block {index}", "exec"), {"__name__": "__docs__"})
