"""uniform_fill_ (csrc/uniform.cpp on the CPU): torch.rand's values and generator state, bit for bit."""

import pytest
import torch

from cskd_kernels.modules.cskd_loss import draw_projections, uniform_fill_
from conftest import requires_extension


@requires_extension
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40 + 7])
@pytest.mark.parametrize("sizes", [[1], [623], [624], [625], [5, 1000, 3], [186_000], [1_000_003, 7]],
                         ids=lambda sizes: "-".join(map(str, sizes)))
def test_the_values_and_the_state_are_torch_rand_s(seed, sizes):
    from cskd_kernels import _C
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    offset = seed % 700  # start anywhere in the twister's 624-word block
    torch.rand(offset, generator=ours), torch.rand(offset, generator=theirs)
    for n in sizes:
        got, expected = torch.empty(n), torch.rand(n, generator=theirs)
        _C.uniform_float_([got], ours)
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert torch.equal(got, expected), n
    assert torch.equal(ours.get_state(), theirs.get_state())
    assert torch.equal(torch.randn(7, generator=ours), torch.randn(7, generator=theirs))  # later draws of any kind


@requires_extension
def test_the_default_generator_and_an_empty_draw():
    from cskd_kernels import _C
    torch.manual_seed(3)
    got, empty = torch.empty(1000), torch.empty(0)
    _C.uniform_float_([got, empty])
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(got, torch.rand(1000))
    assert torch.equal(after, torch.rand(3))  # the empty tensor took nothing from the stream


@requires_extension
@pytest.mark.parametrize("seed", [0, 77])
def test_filling_slices_in_place_is_successive_torch_rand_calls(seed):
    """uniform_float_ fills each tensor in turn in its logical order, whatever its row strides."""
    from cskd_kernels import _C
    stacked = torch.full((5, 3 + 4 + 11, 7), -1.0)
    parts = [stacked[:, :3], stacked[:, 3:7], stacked[:, 7:], torch.empty(0), torch.empty(2, 1, 3)[:, :, 1:]]
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    torch.rand(seed * 9, generator=ours), torch.rand(seed * 9, generator=theirs)
    _C.uniform_float_(parts, ours)
    for part in parts:
        assert torch.equal(part, torch.rand(part.shape, generator=theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())
    assert (stacked >= 0).all()  # every element written


@requires_extension
def test_filling_refuses_what_it_cannot_fill():
    from cskd_kernels import _C
    with pytest.raises(RuntimeError, match="float32 CPU"):
        _C.uniform_float_([torch.empty(4, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):
        _C.uniform_float_([torch.empty(4, 6)[:, ::2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_fill_and_the_projections_are_torch_rand_s(dtype):
    got = torch.empty(5000, dtype=dtype)
    uniform_fill_([got], generator=torch.Generator().manual_seed(9))
    assert torch.equal(got, torch.rand(5000, generator=torch.Generator().manual_seed(9), dtype=dtype))
    drawn = draw_projections(64, 8, 25, generator=torch.Generator().manual_seed(4), dtype=dtype)
    bound = 1.0 / 8.0
    flat = torch.rand(sum(t.numel() for t in drawn), generator=torch.Generator().manual_seed(4), dtype=dtype)
    assert torch.equal(torch.cat([t.flatten() for t in drawn]), flat.mul_(2 * bound).sub_(bound))


@pytest.mark.compile
def test_the_draw_compiles_without_a_graph_break():
    """Under torch.compile the draw is torch.rand's (the extension's import would break the graph)."""
    torch._dynamo.reset()

    def drawn(x):
        return x * draw_projections(16, 8, 3)[4].sum()

    torch.manual_seed(5)
    compiled = torch.compile(drawn, fullgraph=True, backend="aot_eager")(torch.ones(2))
    assert compiled.shape == (2,) and torch.isfinite(compiled).all()
    torch._dynamo.reset()
