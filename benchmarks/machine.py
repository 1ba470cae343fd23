"""What the benchmarks run on: device names, and the machine's copy bandwidth and matmul rate.

The rates are measured once per session and device, in the same run as the
benchmarks, so a case's floor (the time its unavoidable memory traffic or
arithmetic takes at those rates) reflects the machine as it was during the run
(busy or not).
"""

import dataclasses
import functools
import platform
import re
import statistics
import time

import torch

COPY_MIB = 256  # float32 buffer size for the bandwidth measurement (read 256 MiB + write 256 MiB)


def cpu_name():
    """The CPU model with the number of threads torch uses: the same model with fewer cores is another machine."""
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model}{_isa_note()}, {torch.get_num_threads()} threads"


def _isa_note():
    """' (AVX2)' where the C++ kernels run below AVX-512: one model name covers CPU generations that differ
    (an AVX-512 EPYC and an AVX2 one are both "AMD EPYC"), and their results must not merge into one file."""
    try:
        from cskd_kernels import _C
    except ImportError:
        return ""
    isa = _C.kernel_isa()
    return "" if isa == "avx512" else f" ({isa.upper()})"


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slug(name):
    """A file-name-safe form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, repeats):
    fn()  # warm-up: first-touch page faults, kernel launch setup
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Rates:
    """Measured rates of one device: bytes per second of dst.copy_(src) and float32 matmul FLOP/s."""

    copy_bytes_per_s: float
    matmul_flops_per_s: float

    def floor_seconds(self, bytes_moved=0.0, flops=0.0):
        """Time the traffic and arithmetic take at these rates: the larger of the two bounds."""
        return max(bytes_moved / self.copy_bytes_per_s, flops / self.matmul_flops_per_s)


@functools.lru_cache(maxsize=None)
def measure_rates(device):
    """Copy bandwidth (256 MiB float32, bytes read + written per second) and float32 matmul rate.

    The matmul rate is torch's (a @ b) or, on the CPU, the package's own gemm where that is faster.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    numel = COPY_MIB * 2**20 // 4
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device, repeats=20 if cuda else 5)
    del src, dst
    size = 8192 if cuda else 2048
    a = torch.rand(size, size, device=device)
    b = torch.rand(size, size, device=device)
    # Plain float32 (no TF32): the rate the float32 kernels are held to.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        matmul_s = _median_seconds(lambda: a @ b, device, repeats=10 if cuda else 3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    own_gemm = _own_cpu_gemm()
    if not cuda and own_gemm is not None:
        # The C++ kernels run their products on the package's gemm, faster than torch's BLAS on some
        # CPUs (AVX-512 AMD, where MKL runs AVX2): the floor is held to the faster of the two.
        matmul_s = min(matmul_s, _median_seconds(lambda: own_gemm(a, b, False, False), device, repeats=3))
    return Rates(copy_bytes_per_s=2 * numel * 4 / copy_s, matmul_flops_per_s=2 * size**3 / matmul_s)


def _own_cpu_gemm():
    """cskd_kernels._C.gemm (the C++ kernels' product, parallel over columns), or None without the extension."""
    try:
        from cskd_kernels import _C
    except ImportError:
        return None
    return getattr(_C, "gemm", None)


def versions():
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"torch": torch.__version__, "triton": triton_version}
