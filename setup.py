"""Build and install cskd_kernels.

The C++ extension ``cskd_kernels._C`` is built from every file in csrc/ with
torch's cpp_extension (ninja, -O3, OpenMP). Install with

    pip install --no-build-isolation -e .

so that the torch already installed is the one compiled against. Set
``CSKD_SKIP_EXTENSION=1`` to install without compiling: the package then runs
the plain PyTorch reference on CPU tensors (and says so once, in a warning).
"""

import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
torch_requirement = "torch>=2.4"
if os.environ.get("CSKD_SKIP_EXTENSION", "0") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # A C++ extension loads only with the torch it was compiled against (its C++ ABI changes between
    # minor versions): the requirement says so, and cskd_kernels/_build_info.py lets the package name
    # the mismatch in one line (cskd_kernels.backend) instead of an undefined-symbol error.
    built = torch.__version__.split("+")[0]
    major, minor = (int(part) for part in built.split(".")[:2])
    torch_requirement = f"torch>={built},<{major}.{minor + 1}"
    with open(os.path.join("cskd_kernels", "_build_info.py"), "w", encoding="utf-8") as handle:
        handle.write('"""Written by setup.py when it builds the C++ extension."""\n'
                     f"TORCH_VERSION = {torch.__version__!r}\n")

    ext_modules.append(
        CppExtension(
            name="cskd_kernels._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            # -Wno-psabi: the vector helpers of csrc/gram_tiles.h are always inlined into functions of one
            # target (AVX-512, AVX2, baseline), so GCC's note on passing vectors between targets never applies.
            # -g0: no debug information (Python's CFLAGS bring -g): a 0.9 MB extension instead of 50 MB.
            extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++20", "-Wno-psabi", "-g0"]},
            extra_link_args=["-fopenmp"],
        )
    )
    class BuildInCheckout(BuildExtension.with_options(use_ninja=True)):
        """Objects in the checkout's build/ (not a fresh temporary directory per pip run), so that a
        second `pip install -e .` in the same checkout lets ninja skip what is already compiled."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "temp")

    cmdclass["build_ext"] = BuildInCheckout

setup(
    name="cskd-kernels",
    version="0.1.0",
    description="Fused kernels for Channel-Spatial Knowledge Distillation (CKA, channel and position attention, CWD)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["cskd_kernels", "cskd_kernels.*"]) + ["cskd_train"],
    # The training application lives in python/ and installs as the package cskd_train.
    package_dir={"cskd_train": "python/cskd_train"},
    install_requires=[torch_requirement, "numpy"],
    extras_require={
        "test": ["pytest>=7.3", "psutil", "tensorboard"],
        "bench": ["pytest>=7", "pytest-benchmark>=4", "psutil"],
        # The training application (python/cskd_train): cskd-train, cskd-eval, cskd-demo.
        "train": ["timm>=1.0", "torchvision", "torchmetrics>=1.0", "tqdm", "matplotlib", "Pillow"],
        # examples/ (tests/test_examples.py): CSKD with the libraries users train with.
        "examples": ["torchvision", "segmentation-models-pytorch>=0.3", "lightning>=2.1", "torchdistill>=1.0"],
    },
    entry_points={
        "console_scripts": [
            # Through cskd_train.commands: without the train extra, one line says what to install.
            "cskd-train=cskd_train.commands:train",
            "cskd-eval=cskd_train.commands:evaluate",
            "cskd-demo=cskd_train.commands:demo",
            "cskd-ablate=cskd_train.commands:ablate",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
