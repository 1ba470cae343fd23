"""Loading a released checkpoint: cskd-train's loader against torch.load + load_state_dict of the same file.

    python -m benchmarks.checkpoint_load [--model deeplabv3_resnet101] [--repeats 5]

A file in the released layout (tests/released_models/, random values) is written to a temporary
directory; the two ways of loading it into our network run in alternation, medians of --repeats.
"plain" is torch.load(weights_only=True) + load_state_dict of a file already in our names (what
loading costs without any conversion); "ours" is cskd_train.convert.load_network_file of the
released file (reading, key conversion, the checks, the strict load).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests"))

from cskd_train.convert import load_network_file  # noqa: E402
from cskd_train.models import build_model  # noqa: E402
from released_support import released_network_file  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplabv3_resnet101")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        source, released_path = released_network_file(directory, args.model, 19)
        plain_path = os.path.join(directory, "ours.pth")
        torch.save(source.state_dict(), plain_path)
        model = build_model(args.model, 19)

        def plain():
            model.load_state_dict(torch.load(plain_path, map_location="cpu", weights_only=True))

        def ours():
            load_network_file(model, args.model, released_path, "--model")

        times = {"plain": [], "ours": []}
        for i in range(args.repeats + 1):
            for name, load in (("plain", plain), ("ours", ours)):
                started = time.perf_counter()
                load()
                if i:  # the first round warms the page cache
                    times[name].append(time.perf_counter() - started)
        size = os.path.getsize(released_path) / 2**20
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    print(f"{args.model} ({size:.0f} MiB), medians of {args.repeats}: torch.load + load_state_dict "
          f"{1000 * median['plain']:.0f} ms, load_network_file (released names) {1000 * median['ours']:.0f} ms, "
          f"ratio {median['ours'] / median['plain']:.2f}")
    return median


if __name__ == "__main__":
    main()
