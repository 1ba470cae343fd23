"""The Triton backend through torch.library.triton_op: torch.compile traces into the ops and sees the kernels.

With cskd_kernels._library.TRITON_OPS on (the default on a GPU; these tests
switch it on under the interpreter too), each Triton op is a triton_op whose
body launches its kernels through wrap_triton, so AOTAutograd records the
kernel launches themselves (triton_kernel_wrapper_functional nodes) instead of
one opaque cskd:: call. The tests check that no cskd:: op is left in the
compiled forward and backward graphs, that the expected kernels are there, and
that compiled values and every gradient equal eager ones. Without a GPU the
graphs run through aot_eager (Inductor cannot compile Triton for the CPU);
on CUDA through Inductor.
"""

import functools
import os
import subprocess
import sys

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._inductor.utils import run_and_get_code

from cskd_kernels import _library, channel_attention, cka_loss, cwd_loss, position_attention
from cskd_kernels.backend import triton_available, triton_interpreting
from cskd_kernels.ops import cka as cka_ops
from conftest import CUDA_REASON, HAS_CUDA
from test_compile import OPCHECK_OPS, _cskd_loss, _grads, _leaves, _opcheck_cases

pytestmark = [
    pytest.mark.compile,
    pytest.mark.skipif(not (triton_available() and (HAS_CUDA or triton_interpreting())),
                       reason="Triton runs here neither on CUDA nor interpreted"),
    pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="this torch has no torch.library.triton_op"),
]

DEVICE = "cuda" if HAS_CUDA else "cpu"


# The device in every test id: benchmarks/gpu_check.sh selects the CUDA tests by it.
@pytest.fixture(autouse=True, params=[DEVICE], ids=[f"triton-{DEVICE}"])
def _triton_ops(monkeypatch):
    """The Triton backend through its triton_op registrations, each test compiling from scratch."""
    monkeypatch.setattr(_library, "TRITON_OPS", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphRecorder:
    """A torch.compile backend that keeps AOTAutograd's forward and backward graphs and runs them eagerly."""

    def __init__(self):
        self.graphs = []
        aot_eager = torch._dynamo.lookup_backend("aot_eager")
        self.backend = functools.partial(aot_eager, fw_compiler=self._keep, bw_compiler=self._keep)

    def _keep(self, graph, example_inputs):
        self.graphs.append(graph)
        return make_boxed_func(graph.forward)

    def nodes(self):
        return [node for graph in self.graphs for node in graph.graph.nodes if node.op == "call_function"]

    def kernels(self):
        """'<module>.<kernel>' of every Triton launch in the graphs, e.g. 'cwd._cwd_forward_kernel'."""
        names = set()
        for node in self.nodes():
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                while hasattr(kernel, "fn"):  # Autotuner -> JITFunction -> Python function
                    kernel = kernel.fn
                names.add(f"{kernel.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}")
        return names

    def cskd_ops(self):
        """The cskd:: ops left as calls in the graphs (none when every op was traced into)."""
        return {str(node.target) for node in self.nodes() if str(node.target).startswith("cskd.")}


class Compiled:
    """fn under torch.compile(fullgraph=True), forward and backward compiled at the first call.

    On CUDA through Inductor, keeping the code it generates; without a GPU
    through aot_eager, keeping AOTAutograd's graphs.
    """

    def __init__(self, fn):
        self.recorder, self.code = GraphRecorder(), ""
        self.fn = torch.compile(fn, fullgraph=True, backend="inductor" if HAS_CUDA else self.recorder.backend)

    def __call__(self, *inputs):
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):  # the backward graph too
            if not HAS_CUDA:
                return self.fn(*inputs)
            out, codes = run_and_get_code(self.fn, *inputs)
            self.code += "\n".join(codes)
            return out

    def assert_traced_into(self, kernels):
        """No opaque cskd:: call is left, and the launches are exactly ``kernels`` ('<module>.<kernel>')."""
        if HAS_CUDA:  # Inductor's code launches each user kernel under its own name
            assert "torch.ops.cskd." not in self.code
            assert {k for k in kernels if k.split(".")[1] in self.code} == kernels
        else:
            assert self.recorder.cskd_ops() == set()
            assert self.recorder.kernels() == kernels


def _compile_and_compare(fn, inputs, *, backward=True):
    """fn compiled against eager: values and the gradients of every input that requires grad."""
    compiled = Compiled(fn)
    eager_inputs = _leaves(inputs)
    expected, actual = fn(*eager_inputs), compiled(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    if backward:
        weight = torch.randn_like(expected)
        want, got = _grads(expected, eager_inputs, weight), _grads(actual, inputs, weight)
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    return compiled


def _randn(*shape, grad=True):
    return torch.randn(*shape, device=DEVICE, requires_grad=grad)


CASES = {
    "cka_loss": (lambda x, y: cka_loss(x, y, backend="triton"), lambda: [_randn(6, 3, 5), _randn(6, 4)],
                 {"cka._centered_gram_few_samples_kernel", "cka._centered_gram_backward_few_samples_kernel"}),
    "channel_attention": (
        lambda x, g: channel_attention(x, g, temperature=2.0, backend="triton"),
        lambda: [_randn(2, 5, 3, 4), _randn(1)],
        {"channel_attention._nt_product_kernel", "channel_attention._softmax_rows_kernel",
         "channel_attention._attend_residual_kernel", "channel_attention._softmax_backward_rows_kernel",
         "channel_attention._input_grad_kernel"}),
    "cwd_loss": (lambda s, t: cwd_loss(s, t, temperature=2.0, backend="triton"),
                 lambda: [_randn(2, 3, 4, 5), _randn(2, 3, 4, 5, grad=False)], {"cwd._cwd_forward_kernel"}),
    "position_attention": (
        lambda q, k, v: position_attention(q, k, v, temperature=2.0, grid=(2, 3), backend="triton"),
        lambda: [_randn(2, 3, 5, 7), _randn(2, 3, 5, 7), _randn(2, 6, 5, 7)],
        {"position_attention._forward_kernel", "position_attention._dv_kernel", "position_attention._dkdq_kernel"}),
}


@pytest.mark.parametrize("case", CASES)
def test_op_is_traced_into_its_kernels(case):
    fn, make_inputs, kernels = CASES[case]
    _compile_and_compare(fn, make_inputs()).assert_traced_into(kernels)


CSKD_LOSS_KERNELS = {
    "cell_projection._forward_kernel", "cell_projection._input_grad_kernel",
    "cell_cross_gram._forward_kernel", "cell_cross_gram._backward_kernel",
    "channel_attention._nt_product_kernel", "channel_attention._softmax_rows_kernel",
    "channel_attention._attend_residual_kernel", "channel_attention._softmax_backward_rows_kernel",
    "channel_attention._input_grad_kernel",
    "position_attention._forward_kernel", "position_attention._dv_kernel", "position_attention._dkdq_kernel",
    "cka._centered_gram_few_samples_kernel", "cka._centered_gram_backward_few_samples_kernel",
}


def test_cskd_loss_is_traced_into_its_kernels():
    """The whole loss in grid mode: per-cell projections and cross-Grams too, no opaque op left.

    Without a GPU only the forward runs (both graphs are traced and checked):
    torch finds the tensors a kernel writes by compiling it for a GPU, and
    without one it treats every input as written (cskd_kernels.triton.common),
    which makes autograd refuse this backward.
    """
    loss = _cskd_loss("learned", "triton").to(DEVICE)  # gammas 0.5 and 0.7: every gradient exercised
    compiled = _compile_and_compare(lambda s, t: loss(s, t).loss, [_randn(4, 8, 6, 7), _randn(4, 16, 6, 7, grad=False)],
                                    backward=HAS_CUDA)
    if not HAS_CUDA:
        assert len(compiled.recorder.graphs) == 2  # forward and backward
    compiled.assert_traced_into(CSKD_LOSS_KERNELS)


def test_opaque_ops_when_switched_off(monkeypatch):
    """TRITON_OPS off: the Triton backend calls the opaque custom op, and the graph keeps it as one call."""
    monkeypatch.setattr(_library, "TRITON_OPS", False)
    assert cka_ops.centered_gram.for_backend("triton") is cka_ops.centered_gram.opaque
    compiled = _compile_and_compare(lambda x, y: cka_loss(x, y, backend="triton"), [_randn(6, 3, 5), _randn(6, 4)])
    if HAS_CUDA:
        assert "torch.ops.cskd.cka_centered_gram.default" in compiled.code
    else:
        assert compiled.recorder.kernels() == set()
        assert "cskd.cka_centered_gram.default" in compiled.recorder.cskd_ops()


@pytest.mark.parametrize("setting,interpret,expected", [("", "1", False), ("", "0", True), ("1", "1", True),
                                                        ("0", "0", False)])
def test_setting(setting, interpret, expected):
    """CSKD_TRITON_OP and TRITON_INTERPRET choose the registration at import."""
    code = "from cskd_kernels import _library; print(_library.TRITON_OPS)"
    env = {"CSKD_TRITON_OP": setting, "TRITON_INTERPRET": interpret}
    assert _python(code, env).stdout.strip() == str(expected)


def test_bad_setting_is_a_clear_error():
    result = _python("import cskd_kernels.ops.cka", {"CSKD_TRITON_OP": "yes"}, check=False)
    assert result.returncode != 0
    assert "CSKD_TRITON_OP must be 0 or 1 (or unset), got 'yes'" in result.stderr


def _python(code, env, check=True):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          check=check)


@pytest.mark.parametrize("name", OPCHECK_OPS)
def test_opcheck(name):
    """torch.library.opcheck of the triton_op registrations: schema, traced fake, autograd, AOT dispatch.

    AOT dispatch is checked on CUDA only: without a GPU torch treats every
    input of a kernel as written (see the CSKDLoss test above), which breaks
    AOTAutograd's partitioning of the ops with a saved second output.
    """
    op, args = _opcheck_cases("triton", DEVICE)[name]
    assert op.for_backend("triton") is op.traceable
    checks = ["test_schema", "test_autograd_registration", "test_faketensor"]
    torch.library.opcheck(op.traceable, args, test_utils=checks + (["test_aot_dispatch_dynamic"] if HAS_CUDA else []))


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_cskd_loss_under_cuda_graphs_matches_eager():
    """torch.compile(mode="reduce-overhead") (the benchmarks' triton-graphs): replays give eager's values and grads.

    Three calls with fresh inputs: the graphs are recorded, then replayed on
    new data (a replay reading stale static buffers would repeat the first
    result).
    """
    loss = _cskd_loss("learned", "triton").to(DEVICE)  # gammas 0.5 and 0.7: every gradient exercised
    graphed = torch.compile(loss, mode="reduce-overhead")
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()  # a new training step, as a training loop marks it
        feat_s, feat_t = _randn(4, 8, 6, 7), _randn(4, 16, 6, 7, grad=False)
        params = [loss.gamma_cam, loss.gamma_pam]
        expected = loss(feat_s, feat_t).loss
        want = torch.autograd.grad(expected, [feat_s, *params])
        actual = graphed(feat_s, feat_t).loss
        got = torch.autograd.grad(actual, [feat_s, *params])
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
