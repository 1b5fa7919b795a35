"""MaskSet statistics: exact integer counts, whatever the default dtype."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from curvprune.tensors.layout import ParamLayout, select_parameters
from curvprune.tensors.masks import MaskSet


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _layout(*shapes: tuple[int, ...]) -> ParamLayout:
    names = tuple(f"p{i}.weight" for i in range(len(shapes)))
    return ParamLayout(names, tuple(torch.Size(s) for s in shapes), ("Linear",) * len(shapes))


def _mask_set(removed: list[int], sizes: list[int]) -> MaskSet:
    layout = _layout(*((n,) for n in sizes))
    pieces = [torch.arange(n) >= k for k, n in zip(removed, sizes, strict=True)]
    return MaskSet(layout, torch.cat(pieces))


@pytest.mark.parametrize("default", [None, "float64"])
def test_per_layer_counts_are_exact_integers_and_fractions_correctly_rounded(default, request):
    if default:
        request.getfixturevalue("float64_default")
    # 1/3, 2/3, 5/7, 0 and 1: k/n the float32 path (count and divide in float32) gets wrong.
    removed, sizes = [1, 2, 5, 0, 11], [3, 3, 7, 4, 11]
    masks = _mask_set(removed, sizes)
    counts = masks.removed_per_layer()
    assert counts == {f"p{i}.weight": k for i, k in enumerate(removed)}
    assert all(type(c) is int for c in counts.values())
    per_layer = masks.per_layer_sparsity()
    for i, (k, n) in enumerate(zip(removed, sizes, strict=True)):
        value = per_layer[f"p{i}.weight"]
        assert type(value) is float
        assert value == float(Fraction(k, n)), (k, n, value)  # exact, not approx
    assert masks.sparsity() == float(Fraction(sum(removed), sum(sizes)))
    assert masks.num_removed() == sum(removed)


def test_float32_counting_would_not_be_exact():
    # The failure the integer count prevents: above 2^24 a float32 accumulator drops ones.
    big = torch.tensor(2.0**24, dtype=torch.float32)
    assert float(big + 1) == float(big)


def test_per_layer_sparsity_under_float64_default_with_a_real_layout(float64_default):
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    layout = select_parameters(model)
    flat = torch.ones(layout.d, dtype=torch.bool)
    flat[:7] = False  # 7 of layer 0's 15
    flat[-1] = False  # 1 of layer 1's 6
    per_layer = MaskSet(layout, flat).per_layer_sparsity()
    assert per_layer == {"0.weight": 7 / 15, "1.weight": 1 / 6}
