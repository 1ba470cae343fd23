"""The documentation runs as written.

- Every ```python block of README.md and docs/*.md runs as pasted, each in a fresh namespace (a block
  fenced as ```python fragment is skipped; there should be very few).
- The Markdown links of README.md and docs/*.md to files of the repository point at files that exist.
- `python -m benchmarks.report --plot` writes its PNGs from the committed benchmarks/results CSVs, and
  docs/ holds the ones the README and docs/benchmarks.md show.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

import train_support

REPO = train_support.REPO
PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _name(path):
    return os.path.relpath(path, REPO)


BLOCKS = [(_name(path), index, code)
          for path in PAGES
          for index, code in enumerate(re.findall(r"^```python\n(.*?)^```", _read(path), flags=re.S | re.M))]
FRAGMENTS = [(_name(path), code) for path in PAGES
             for code in re.findall(r"^```python fragment\n(.*?)^```", _read(path), flags=re.S | re.M)]


def test_there_are_blocks_to_run():
    names = {name for name, _, _ in BLOCKS}
    assert "README.md" in names and "docs/integration.md" in names and "docs/design.md" in names
    assert len(FRAGMENTS) <= 2, FRAGMENTS  # fragments are the exception


def test_every_python_fence_is_a_block_or_a_fragment():
    # A typo in the fence (```py, ```Python) would silently drop a block from the run.
    for path in PAGES:
        for info in re.findall(r"^```(\S.*)$", _read(path), flags=re.M):
            assert info in ("python", "python fragment", "bash", "text"), f"{_name(path)}: ```{info}"


@pytest.mark.parametrize("name, index, code", BLOCKS, ids=[f"{name}:{index}" for name, index, _ in BLOCKS])
def test_block_runs(name, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, f"{name} block {index}", "exec"), {"__name__": "__docs__"})


def test_links_to_repository_files_exist():
    for path in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(path)):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
            assert os.path.exists(resolved), f"{_name(path)} links to {target}, which does not exist"


def test_report_plot_writes_pngs_from_the_committed_results(tmp_path):
    results = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "*.csv")))
    assert results
    run = subprocess.run([sys.executable, "-m", "benchmarks.report", "--plot", "--plot-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    written = sorted(os.path.basename(line) for line in run.stdout.split())
    devices = [os.path.basename(path)[:-len(".csv")] for path in results]
    expected = sorted(f"{kind}-{device}.png" for kind in ("speedup", "memory") for device in devices)
    assert written == expected
    for name in expected:
        path = tmp_path / name
        assert path.stat().st_size > 10_000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # The committed chart of the same name is there for the docs to show.
        assert os.path.getsize(os.path.join(REPO, "docs", name)) > 10_000
