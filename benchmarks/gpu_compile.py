"""Compile every Triton kernel launch of the GPU path for a GPU, on a machine without one.

    python -m benchmarks.gpu_compile [--arch 90] [--fit-arch 80 ...] [--multiprocessors 132] [--quick]
                                     [--out launches.json]

The interpreter (how CI runs the Triton kernels) accepts code the compiler
rejects (a plain global read inside a kernel, found on the first lent GPU),
and it has no registers or shared memory to run out of. This checks what it
cannot, with Triton's own compiler and ptxas:

1. plan: the workloads below run on the CPU with a GPU's launch sizes
   (cskd_kernels.triton.common.interpreted_launches answers False, the SM
   count is --multiprocessors), each launch recorded and none run;
2. compile: each distinct launch (kernel, argument types and Triton's
   specialisations of them, constexprs, num_warps, num_stages) compiled for
   sm_<arch> exactly as Triton would on that GPU, then compiled again from
   the source torch.compile generates for it (Inductor re-emits a triton_op's
   kernels from their source: cskd_kernels._library).

A launch fails if either compilation fails, if it needs more shared memory
than the architecture has, or, for --arch (the GPU the launch sizes are
chosen for), if ptxas spills registers to local memory; --fit-arch (default:
sm_80, the A100) checks only the first two. The table gives per launch its
registers per thread, spilled bytes, shared memory and the blocks of it one
SM holds at once. Exit status 1 on any failure. --quick: the released
configuration only in float32.
"""

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Shared memory one block may use, by compute capability (CUDA programming guide, opt-in maximum), and one SM
# has (each resident block also takes 1 KiB of it for the system).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
SM_SHARED_BYTES = {80: 167936, 86: 102400, 89: 102400, 90: 233472, 100: 233472, 120: 102400}
SM_REGISTERS, SM_MAX_WARPS, SM_MAX_BLOCKS = 65536, 64, 32  # 48 warps on sm_86/89/120: an upper bound there


# ----------------------------------------------------------------------------- plan (runs under the interpreter)

def _workloads(quick):
    """(name, function) pairs; each runs forward + backward of a public op at the shapes the benchmarks use."""
    import torch

    import cskd_kernels

    def cskd_loss(grid, dtype, precision="highest"):
        def run():
            torch.set_float32_matmul_precision(precision)
            loss = cskd_kernels.CSKDLoss(128, 256, grid=grid, backend="triton")
            feat_t = torch.randn(8, 256, 64, 128, dtype=dtype)
            feat_s = torch.randn(8, 128, 64, 128, dtype=dtype, requires_grad=True)
            loss(feat_s, feat_t).loss.backward()
            torch.set_float32_matmul_precision("highest")
        return run

    def cwd(h, w, dtype):
        def run():
            s = torch.randn(8, 19, h, w, dtype=dtype, requires_grad=True)
            cskd_kernels.cwd_loss(s, torch.randn(8, 19, h, w, dtype=dtype), backend="triton").backward()
        return run

    def cka(n, dtype):
        def run():
            x = torch.randn(n, 4096, dtype=dtype, requires_grad=True)
            cskd_kernels.cka_loss(x, torch.randn(n, 2048, dtype=dtype), backend="triton").backward()
        return run

    def attention(op, shape, dtype, **kwargs):
        def run():
            inputs = [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shape]
            out = op(*inputs, backend="triton", **kwargs)
            out.sum().backward()
        return run

    def cross_grams(batch):
        def run():
            from cskd_kernels.ops.cross_gram import centered_cross_grams

            maps = [torch.randn(batch, 64, 32, 64, requires_grad=True) for _ in range(2)]
            centered_cross_grams(*maps, grid=(5, 5), backend="triton").sum().backward()
        return run

    released = [("cskd grid float32", cskd_loss((5, 5), torch.float32))]
    if quick:
        return released
    channels = 512
    return released + [
        ("cskd grid float32 tf32", cskd_loss((5, 5), torch.float32, "high")),
        ("cskd grid bfloat16", cskd_loss((5, 5), torch.bfloat16)),
        ("cskd global float32", cskd_loss(None, torch.float32)),
        ("cskd global bfloat16", cskd_loss(None, torch.bfloat16)),
        ("cwd 64x128 float32", cwd(64, 128, torch.float32)),
        ("cwd 512x1024 float32", cwd(512, 1024, torch.float32)),
        ("cwd 64x128 bfloat16", cwd(64, 128, torch.bfloat16)),
        ("cka 16 samples float32", cka(16, torch.float32)),
        ("cka 64 samples float32", cka(64, torch.float32)),
        ("cka 128 samples bfloat16", cka(128, torch.bfloat16)),
        ("cka 8 samples bfloat16", cka(8, torch.bfloat16)),
        ("cam C=512 float32", attention(cskd_kernels.channel_attention, [(8, channels, 64, 128), (1,)],
                                        torch.float32, temperature=2.0)),
        ("cam C=512 bfloat16", attention(cskd_kernels.channel_attention, [(8, channels, 64, 128), (1,)],
                                         torch.bfloat16, temperature=2.0)),
        ("pam grid d=32 float32", attention(cskd_kernels.position_attention, [(8, 32, 64, 128)] * 2
                                            + [(8, 256, 64, 128)], torch.float32, grid=(5, 5))),
        ("pam d=64 bfloat16", attention(cskd_kernels.position_attention,
                                        [(2, 64, 32, 64), (2, 64, 32, 64), (2, 512, 32, 64)], torch.bfloat16)),
        ("pam d=128 float32", attention(cskd_kernels.position_attention,
                                        [(2, 128, 32, 64), (2, 128, 32, 64), (2, 256, 32, 64)], torch.float32)),
        ("cross-Grams of 64 rows", cross_grams(32)),
        ("cross-Grams of 128 rows", cross_grams(64)),
    ]


def _describe(value):
    """A launch argument as JSON: tensors by dtype and 16-byte alignment (what Triton specialises on)."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"launch argument of type {type(value).__name__}")


class _Recorder:
    """Stands in for cskd_kernels.triton.common.traceable: records a launch, runs nothing."""

    launches = []
    workload = None

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({
                "workload": self.workload,
                "kernel": f"{self.kernel.fn.__module__}:{self.kernel.fn.__name__}",
                "grid": list(grid),
                "args": [_describe(arg) for arg in args],
                "kwargs": {name: _describe(value) for name, value in kwargs.items()},
            })
        return launch


def _set_in_every_kernel_module(name, value, set_attribute=setattr):
    """``name`` = ``value`` in every cskd_kernels.triton module that has it (they import it by name)."""
    import cskd_kernels.triton as package

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(module, name):
            set_attribute(module, name, value)


def use_gpu_launch_sizes(multiprocessors, set_attribute=setattr):
    """Launch sizes of a GPU with ``multiprocessors`` SMs from now on, also for interpreted kernels.

    ``set_attribute`` (e.g. pytest's monkeypatch.setattr) sets the attributes.
    """
    from cskd_kernels.triton import common

    _set_in_every_kernel_module("interpreted_launches", lambda: False, set_attribute)
    set_attribute(common, "multiprocessors", lambda device: multiprocessors)


def plan(quick, multiprocessors):
    """Every launch the workloads make on a GPU with ``multiprocessors`` SMs (needs TRITON_INTERPRET=1)."""
    use_gpu_launch_sizes(multiprocessors)
    _set_in_every_kernel_module("traceable", _Recorder)
    for name, run in _workloads(quick):
        _Recorder.workload = name
        run()
    return _Recorder.launches


# ----------------------------------------------------------------------------- compile (runs without the interpreter)

def _specialisation(described):
    """What Triton compiles an argument for: an int by its range, divisibility by 16 and being 1; else as is."""
    value = described.get("value")
    if isinstance(value, int) and not isinstance(value, bool):
        return {"int": (value == 1, value % 16 == 0, -2 ** 31 <= value < 2 ** 31)}
    return described


def _distinct(launches):
    """Launches that compile to different code: one per (kernel, arguments' specialisations, constexprs, options)."""
    seen = {}
    for launch in launches:
        key = json.dumps([launch["kernel"], [_specialisation(arg) for arg in launch["args"]], launch["kwargs"]],
                         sort_keys=True)
        seen.setdefault(key, {**launch, "workloads": []})["workloads"].append(launch["workload"])
    return list(seen.values())


def _argument(described):
    """A stand-in Triton specialises like the recorded argument: a tensor by dtype and alignment, else the value."""
    import torch
    from triton.runtime.jit import MockTensor

    if "tensor" not in described:
        return described["value"]
    mock = MockTensor(getattr(torch, described["tensor"]))
    if not described["aligned"]:
        mock.data_ptr = lambda: 4
    return mock


class _TargetDriver:
    """Triton's active driver reduced to what compiling needs: the target GPU, no device."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _ptxas_report(ptx, arch):
    """(registers per thread, spilled bytes) from ptxas -v, run as Triton runs it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(source), "-o",
                              str(Path(folder) / "kernel.o")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def blocks_per_sm(registers, warps, shared_bytes, arch):
    """Blocks of a kernel that fit on one SM at once, by registers (allocated 8 a thread at a time), warps and
    shared memory: with the launch's warps, how well it can hide latency."""
    by_registers = SM_REGISTERS // (warps * 32 * -(-registers // 8) * 8)
    by_shared = SM_SHARED_BYTES.get(arch, min(SM_SHARED_BYTES.values())) // (shared_bytes + 1024)
    return min(by_registers, by_shared, SM_MAX_WARPS // warps, SM_MAX_BLOCKS)


def _as_inductor_emits(kernel, folder):
    """``kernel`` rebuilt from the source torch.compile generates for it, as a module of its own."""
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    imports = TritonKernel.gen_common_triton_imports()  # a str or, in older torch, an IndentedBuffer
    source = "\n".join([imports if isinstance(imports, str) else imports.getvalue(), "@triton.jit",
                        user_defined_triton_kernel_transitive_closure_source_code(kernel)])
    path = Path(folder) / f"{kernel.fn.__name__}_{abs(hash(source))}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, kernel.fn.__name__)


def compile_launch(launch, arch, folder, spills_fail=True):
    """The launch's compile results for sm_<arch>; "error" names what failed (spilled registers if spills_fail)."""
    module, name = launch["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    kernel.device_caches.clear()  # compiled for the active driver's target: another arch may have come before
    args = [_argument(arg) for arg in launch["args"]]
    kwargs = {key: _argument(value) for key, value in launch["kwargs"].items()}
    result = {**launch, "arch": arch, "constexprs": {key: value["value"] for key, value in launch["kwargs"].items()}}
    try:
        compiled = kernel.warmup(*args, grid=launch["grid"], **kwargs)
        result["registers"], result["spilled_bytes"] = _ptxas_report(compiled.asm["ptx"], arch)
        result["shared_bytes"] = compiled.metadata.shared
        result["blocks_per_sm"] = blocks_per_sm(result["registers"], compiled.metadata.num_warps,
                                                result["shared_bytes"], arch)
        rebuilt = _as_inductor_emits(kernel, folder).warmup(*args, grid=launch["grid"], **kwargs)
        result["inductor_shared_bytes"] = rebuilt.metadata.shared
    except Exception as error:  # reported per launch; the others still compile
        result["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        return result
    problems = []
    limit = MAX_SHARED_BYTES.get(arch, min(MAX_SHARED_BYTES.values()))
    # The rebuild may specialise differently (Inductor drops do_not_specialize), so it is checked on its own.
    for what, shared in (("", result["shared_bytes"]), ("torch.compile's rebuild: ", result["inductor_shared_bytes"])):
        if shared > limit:
            problems.append(f"{what}{shared} bytes of shared memory, sm_{arch} has {limit}")
    if result["spilled_bytes"] and spills_fail:
        problems.append(f"spills {result['spilled_bytes']} bytes of registers")
    if problems:
        result["error"] = "; ".join(problems)
    return result


def compile_all(distinct, arch, spills_fail=True):
    """compile_launch for each of the distinct launches (_distinct)."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile step needs compiled Triton kernels: run it without TRITON_INTERPRET=1")
    triton.runtime.driver.set_active(_TargetDriver(arch))
    with tempfile.TemporaryDirectory() as folder:
        return [compile_launch(launch, arch, folder, spills_fail) for launch in distinct]


# ----------------------------------------------------------------------------- command line

def _plan_in_interpreter(quick, multiprocessors):
    """The plan step in a child process: it needs TRITON_INTERPRET=1 set before Triton is imported."""
    command = [sys.executable, "-m", "benchmarks.gpu_compile", "--plan-only",
               "--multiprocessors", str(multiprocessors)] + (["--quick"] if quick else [])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"planning the launches failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def _line(result):
    constexprs = " ".join(f"{key}={value}" for key, value in result["constexprs"].items())
    if "registers" in result:
        numbers = f"{result['registers']:3d} regs {result['spilled_bytes']:5d} B spilled " \
                  f"{result['shared_bytes'] // 1024:4d} KiB shared {result['blocks_per_sm']:2d} blocks/SM"
    else:
        numbers = "not compiled"
    status = f"  FAILED: {result['error']}" if "error" in result else ""
    return f"sm_{result['arch']} {result['kernel'].split('.')[-1]:50s} {numbers}  {constexprs}{status}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--fit-arch", type=int, nargs="*", default=[80],
                        help="also compile for these, where only compile errors and shared memory fail (80: A100)")
    parser.add_argument("--multiprocessors", type=int, default=132, help="SM count the launch sizes assume")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plan-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan_only:
        json.dump(plan(args.quick, args.multiprocessors), sys.stdout)
        return 0
    launches = _plan_in_interpreter(args.quick, args.multiprocessors)
    distinct = _distinct(launches)
    results = compile_all(distinct, args.arch)
    for arch in args.fit_arch:
        results += compile_all(distinct, arch, spills_fail=False)
    for result in results:
        print(_line(result))
    failed = [result for result in results if "error" in result]
    archs = ", ".join(f"sm_{arch}" for arch in [args.arch, *args.fit_arch])
    print(f"{len(launches)} launches, {len(distinct)} distinct, compiled for {archs}: {len(failed)} failed")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
