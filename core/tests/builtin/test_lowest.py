"""The sort-free k-lowest selection equals a stable sort, ties and signed zeros included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune.builtin.lowest import lowest_k, order_keys, prune_lowest_in_runs
from curvprune.builtin.selection import prune_lowest

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=5))
    n = sum(sizes)
    # few distinct values (ties), signed zeros, extremes of the dtype's range
    info = torch.finfo(dtype)
    pool = [0.0, -0.0, 1.0, -1.0, 0.5, -2.5, info.max, -info.max, info.tiny, -info.tiny, 3e-5]
    values = draw(st.lists(st.sampled_from(pool) | st.floats(-1e3, 1e3, width=16),
                           min_size=n, max_size=n))
    alive = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    quota = draw(st.lists(st.integers(0, 14), min_size=len(sizes), max_size=len(sizes)))
    total = draw(st.none() | st.integers(0, n + 2))
    return (torch.tensor(values, dtype=dtype), torch.tensor(alive), sizes,
            torch.tensor(quota), total)


def _stable_lowest(values: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    index = candidates.nonzero().squeeze(1)
    order = index[torch.sort(values[index].double(), stable=True).indices]
    out = torch.zeros_like(candidates)
    out[order[:k]] = True
    return out


@settings(max_examples=300, deadline=None)
@given(problem=problems(), k=st.integers(0, 70))
def test_lowest_k_is_the_first_k_of_a_stable_sort(problem, k):
    values, alive, *_ = problem
    assert torch.equal(lowest_k(values, alive, k), _stable_lowest(values, alive, k))


@settings(max_examples=300, deadline=None)
@given(problem=problems())
def test_runs_select_like_the_sorting_primitive(problem):
    values, alive, sizes, quota, total = problem
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    total_t = None if total is None else torch.tensor(total)
    expected = prune_lowest(values.double(), alive, group, quota, total_t)
    assert torch.equal(prune_lowest_in_runs(values, alive, sizes, quota, total_t), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_order_like_the_floats(dtype):
    info = torch.finfo(dtype)
    floats = torch.tensor([-info.max, -1.0, -info.tiny, -0.0, 0.0, info.tiny, 1.0, info.max],
                          dtype=dtype)
    keys = order_keys(floats)
    assert torch.equal(torch.sort(keys).values, keys)
    assert keys[3] == keys[4]  # −0.0 == +0.0
    assert (keys[:3] < keys[3]).all() and (keys[5:] > keys[4]).all()


def test_selection_holds_no_int64_index_per_score():
    """The point of the module: ~10 bytes per float32 score, not a sort's ~100."""
    from curvprune.pipeline.memprobe import peak_allocated

    n = 1_000_000
    values = torch.randn(n)
    alive = torch.rand(n) < 0.9
    _, peak = peak_allocated(lambda: lowest_k(values, alive, n // 3))
    assert peak <= 11 * n, f"{peak / n:.1f} bytes per score"
