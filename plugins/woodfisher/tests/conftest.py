"""Dense float64 ground truth for the woodfisher tests, written independently of the plugin.

Block membership is recomputed here from the definition (consecutive pieces of ``block_size``
weights of one parameter) instead of taken from :class:`curvprune.BlockLayout`, so a layout bug
cannot cancel out between the estimator and its reference.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from curvprune import BlockLayout
from curvprune.testing.dense import damped_fisher


def block_ids(sizes: tuple[int, ...], block_size: int | None) -> Tensor:
    """The block of every flat coordinate, ``[d]`` (the core's block partition)."""
    return BlockLayout.build(sizes, block_size).block_of()


def dense_fisher(grads: Tensor, sizes: tuple[int, ...], block_size: int | None,
                 damping: float) -> Tensor:
    """F = λI + (1/m)·Σ ggᵀ on the blocks, float64 (the kit's ground truth)."""
    return damped_fisher(grads.to(torch.float64), sizes, block_size, damping)


def condition(fisher: Tensor) -> float:
    """2-norm condition number of an SPD matrix."""
    eig = torch.linalg.eigvalsh(fisher)
    return float(eig[-1] / eig[0])


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected| / ‖expected‖₂ (entries of F⁻¹ are bounded by ‖F⁻¹‖₂)."""
    scale = float(torch.linalg.matrix_norm(expected.to(torch.float64), ord=2))
    return float((actual.to(torch.float64) - expected).abs().max()) / scale


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The reference helpers (session-scoped, so usable in @given tests)."""
    return SimpleNamespace(block_ids=block_ids, dense_fisher=dense_fisher, condition=condition,
                           relative_error=relative_error)
