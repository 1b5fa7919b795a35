"""``blocks = "alive"`` (the reference pruner's ``HInvFastBlock(grads[:, mask])``) against a dense
float64 ground truth written from the definition: the Fisher restricted to the live coordinates,
cut into consecutive blocks of B live weights (across parameters), inverted block by block;
dead coordinates get e_q/λ."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from curvprune import GradientSource, select_parameters
from curvprune_mfac import MFACEstimator
from curvprune_mfac.config import MFACConfig

from .conftest import EPS64


def dense_alive_inverse(grads: Tensor, keep: Tensor, block: int, damping: float) -> Tensor:
    """[d, d]: block-diagonal inverse over consecutive groups of ``block`` live coordinates."""
    g = grads.to(torch.float64)
    m, d = g.shape
    live = keep.nonzero().squeeze(1).tolist()
    inverse = torch.eye(d, dtype=torch.float64) / damping
    for start in range(0, len(live), block):
        idx = torch.tensor(live[start : start + block])
        gb = g[:, idx]
        fisher = damping * torch.eye(len(idx), dtype=torch.float64) + gb.T @ gb / m
        inverse[idx[:, None], idx[None, :]] = torch.linalg.inv(fisher)
    return inverse


@st.composite
def problems(draw):
    sizes = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=4)))
    d = sum(sizes)
    m = draw(st.integers(1, 8))
    block = draw(st.sampled_from([1, 3, 4, 7, 64]))
    damping = draw(st.floats(1e-2, 1.0))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(d, generator=gen) < draw(st.sampled_from([0.3, 0.7, 1.0]))
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64) * keep  # the source's masking
    return sizes, grads, keep, block, damping


@settings(max_examples=60, deadline=None)
@given(problem=problems(), data=st.data())
def test_alive_blocks_equal_the_dense_restricted_inverse(problem, data):
    sizes, grads, keep, block, damping = problem
    est = MFACEstimator(MFACConfig(dtype="float64", damping=damping, num_grads=grads.shape[0],
                                   block_size=block))
    assert est.config.block_mode == "alive"
    est.setup(sizes)
    est.update(grads)
    expected = dense_alive_inverse(grads, keep, block, damping)
    d = sum(sizes)
    scale = float(torch.linalg.matrix_norm(expected, ord=2))
    cond = scale * float(torch.linalg.matrix_norm(torch.linalg.inv(expected), ord=2))
    # M-FAC forms F⁻¹ = I/λ − ŴᵀŴ: two terms of size 1/λ cancel down to ‖F⁻¹‖ when the
    # gradients are large against λ, so round-off scales with 1/λ, not only with ‖F⁻¹‖
    atol = 64 * (d + grads.shape[0]) * EPS64 * max(cond * scale, 1.0 / damping)
    assert torch.allclose(est.ihvp(torch.eye(d, dtype=torch.float64)), expected, rtol=0, atol=atol)
    assert torch.allclose(est.inverse_diagonal(), expected.diagonal(), rtol=0, atol=atol)
    # entries for any pairs, within or across blocks, live or dead
    idx = torch.tensor([data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=5,
                                           unique=True))])
    got = est.inverse_columns(idx)[0]
    assert torch.allclose(got, expected[idx[0][:, None], idx[0][None, :]], rtol=0, atol=atol)
    # the block layout tiles [0, d), and F⁻¹ has nothing across it
    layout = est.block_layout
    of = layout.block_of()
    assert int(layout.lengths.sum()) == d
    across = of[:, None] != of[None, :]
    assert float(expected.abs().masked_fill(~across, 0).max()) == 0.0


def test_alive_differs_from_fixed_and_straddles_parameters():
    """Two parameters of 6 weights, the first half of each pruned: live weights [3,4,5] and
    [9,10,11]; with B = 4 the first alive block is [3,4,5,9], across the parameter boundary,
    which the fixed layout never does."""
    sizes, d, m = (6, 6), 12, 5
    keep = torch.tensor([False] * 3 + [True] * 3 + [False] * 3 + [True] * 3)
    grads = torch.randn(m, d, dtype=torch.float64) * keep
    alive = MFACEstimator(MFACConfig(dtype="float64", damping=0.1, num_grads=m, block_size=4))
    fixed = MFACEstimator(MFACConfig(dtype="float64", damping=0.1, num_grads=m, block_size=4,
                                     blocks="fixed"))
    for est in (alive, fixed):
        est.setup(sizes)
        est.update(grads)
    eye = torch.eye(d, dtype=torch.float64)
    expected = dense_alive_inverse(grads, keep, 4, 0.1)
    assert torch.allclose(alive.ihvp(eye), expected, atol=1e-10)
    assert abs(float(alive.ihvp(eye)[5, 9])) > 1e-6  # coupled across the parameter boundary
    assert float(fixed.ihvp(eye)[5, 9]) == 0.0
    assert alive.block_layout.starts.tolist() == [0, 10]


def test_pruned_gradients_are_exact_zeros_from_the_source():
    """The premise of "alive": the core's GradientSource zeroes pruned coordinates exactly, so
    the live set read from the gradients is the mask (for live weights with non-zero
    gradients)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    layout = select_parameters(model)
    keep = torch.rand(layout.d) < 0.5
    source = GradientSource(model, layout, torch.nn.functional.cross_entropy, mask=keep,
                            fisher_mini_batch=2)
    data = [(torch.randn(16, 5), torch.randint(0, 3, (16,)))]
    rows = torch.cat(list(source.iter_grads(data, 8)))
    assert bool((rows[:, ~keep] == 0).all())
    assert torch.equal(rows.ne(0).any(dim=0), keep)


def test_dynamic_rejects_alive_and_defaults_to_fixed():
    assert MFACConfig(algorithm="dynamic").block_mode == "fixed"
    with pytest.raises(ValueError, match="alive"):
        MFACConfig(algorithm="dynamic", blocks="alive")


def test_block_size_at_least_the_live_count_is_unblocked():
    sizes, m = (7, 5), 4
    grads = torch.randn(m, 12, dtype=torch.float64)
    big = MFACEstimator(MFACConfig(dtype="float64", damping=0.3, num_grads=m, block_size=10**6))
    none = MFACEstimator(MFACConfig(dtype="float64", damping=0.3, num_grads=m, block_size=None))
    for est in (big, none):
        est.setup(sizes)
        est.update(grads)
    v = torch.randn(3, 12, dtype=torch.float64)
    assert torch.allclose(big.ihvp(v), none.ihvp(v), atol=1e-9)
    assert MFACEstimator.memory_bytes(sizes, big.config) < 10**5
