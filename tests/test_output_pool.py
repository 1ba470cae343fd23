"""The C++ kernels' output pool (csrc/output_pool.cpp): large outputs reuse freed buffers, never live ones, and
what it keeps never raises its peak."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")


def _apply(x, attention):
    from cskd_kernels import _C
    return _C.channel_attention_apply(x, attention, torch.ones(1))


def _expected(x, attention):
    return (attention.double() @ x.double() + x.double()).float()


MIB = 2**20


def test_a_freed_output_is_reused_and_fully_overwritten():
    x = torch.randn(2, 16, 300_000)  # 36.6 MiB: pooled and kept (over 32 MiB)
    a1, a2 = torch.softmax(torch.randn(2, 16, 16), -1), torch.softmax(torch.randn(2, 16, 16), -1)
    first = _apply(x, a1)
    address = first.data_ptr()
    torch.testing.assert_close(first, _expected(x, a1), rtol=1e-4, atol=1e-4)
    second = _apply(x, a2)  # the first is alive: a buffer of its own
    assert second.data_ptr() != address
    del first
    third = _apply(x, a2)
    assert third.data_ptr() == address  # the freed buffer, kept by the pool
    torch.testing.assert_close(third, _expected(x, a2), rtol=1e-4, atol=1e-4)


def _output(mib):
    """A pooled output of `mib` MiB (a whole number of huge pages)."""
    from cskd_kernels import _C
    return _C.empty_output([mib * MIB // 4], torch.empty(()))


def test_outputs_from_a_huge_page_come_from_the_pool_and_every_size_is_kept():
    """Under 2 MiB torch.empty; from there the pool, which keeps every size (malloc would map a 2 MiB-aligned
    block afresh on each call and fault it in again, 28 MiB as much as 32)."""
    from cskd_kernels import _C
    _C.empty_cache()
    tiny = _C.empty_output([MIB // 8], torch.empty(()))  # 0.5 MiB
    assert _C.output_pool_live_bytes() == 0
    del tiny
    for mib in (4, 28, 32, 34):  # 32 MiB: the released Cityscapes student's map
        output = _output(mib)
        assert _C.output_pool_live_bytes() == mib * MIB
        address = output.data_ptr()
        del output
        assert _C.output_cache_bytes() == mib * MIB
        again = _output(mib)
        assert again.data_ptr() == address  # the kept buffer, its pages already mapped
        del again
        _C.empty_cache()
    assert _C.output_cache_bytes() == 0


def test_kept_buffers_never_take_the_pool_past_its_peak():
    from cskd_kernels import _C
    _C.empty_cache()
    first = _output(100)
    del first  # kept: 100 MiB, the most held at once so far 100
    second = _output(120)  # a new mapping: keeping the 100 would hold 220 MiB where 120 suffice
    assert _C.output_cache_bytes() == 0
    first = _output(100)  # both live: the pool has held 220 MiB at once
    del first, second  # 100 + 120 kept is over the 192 MiB limit: the older goes
    assert _C.output_cache_bytes() == 120 * MIB
    again = _output(100)  # 100 live + 120 kept = 220, no more than before: kept
    assert _C.output_cache_bytes() == 120 * MIB
    del again
    _C.empty_cache()


def test_empty_cache_frees_the_kept_buffers_and_later_outputs_are_right():
    from cskd_kernels import _C
    x = torch.randn(2, 16, 300_000)
    attention = torch.softmax(torch.randn(2, 16, 16), -1)
    _apply(x, attention)
    assert _C.output_cache_bytes() > 0
    _C.empty_cache()
    assert _C.output_cache_bytes() == 0
    torch.testing.assert_close(_apply(x, attention), _expected(x, attention), rtol=1e-4, atol=1e-4)


def _run(script, cache_setting):
    env = dict(os.environ, CSKD_OUTPUT_CACHE_MB=cache_setting)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_bad_cache_size_is_a_clear_error():
    result = _run("""
        import torch
        from cskd_kernels import _C
        try:
            _C.channel_attention_apply(torch.randn(2, 16, 40_000), torch.eye(16).expand(2, 16, 16).contiguous(),
                                       torch.ones(1))
        except RuntimeError as error:
            print(str(error).splitlines()[0])
    """, "lots")
    assert result.returncode == 0, result.stderr
    assert "CSKD_OUTPUT_CACHE_MB must be a whole number of MiB, got 'lots'" in result.stdout


@pytest.mark.parametrize("cache_setting", ["0", "1024"])
def test_results_do_not_depend_on_the_cache_size(cache_setting):
    result = _run("""
        import torch
        from cskd_kernels import CSKDLoss
        torch.manual_seed(0)
        loss = CSKDLoss(16, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            loss.gamma_cam.fill_(0.1); loss.gamma_pam.fill_(0.1)
        s, t = torch.randn(8, 16, 64, 96, requires_grad=True), torch.randn(8, 32, 64, 96)  # maps of 3 and 6 MiB: pooled
        values = []
        for _ in range(3):
            out = loss(s, t).loss
            out.backward()
            values.append(out.item())
        print(repr(values), repr(s.grad.abs().sum().item()))
    """, cache_setting)
    assert result.returncode == 0, result.stderr
    reference = _run(result.args[2], "64")
    assert result.stdout == reference.stdout
