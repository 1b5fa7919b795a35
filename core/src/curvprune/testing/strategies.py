"""Bounded, shrinkable Hypothesis strategies for curvature problems.

Every float is bounded (no NaN, no infinity, no subnormals), every shape is small, and arrays are
drawn with :func:`hypothesis.extra.numpy.arrays` and converted with :func:`torch.from_numpy`, so a
failure shrinks to a readable 1×1 or 2×2 case. Arrays keep Hypothesis' default ``fill``: many
entries then share one value, which makes rank-deficient gradient batches common, the case that
stresses damping.

Typical use inside a test (no function-scoped fixture with ``@given``)::

    @given(fisher_problems())
    def test_ihvp(problem):
        sizes, block_size, damping, grads = problem
        ...
"""

from __future__ import annotations

from typing import NamedTuple

import hypothesis.extra.numpy as hnp
import numpy as np
import torch
from hypothesis import strategies as st
from torch import Tensor

__all__ = [
    "FisherProblem",
    "block_sizes",
    "dampings",
    "fisher_problems",
    "gradients",
    "sizes",
    "well_conditioned_spd",
]


class FisherProblem(NamedTuple):
    """A drawn damped-Fisher problem: F = damping·I + (1/m)·Σ gᵢgᵢᵀ within the blocks.

    Attributes:
        sizes: number of weights of each parameter.
        block_size: block width (None: one block).
        damping: λ > 0.
        grads: float64 ``[m, d]``.
    """

    sizes: tuple[int, ...]
    block_size: int | None
    damping: float
    grads: Tensor

    @property
    def d(self) -> int:
        """Total number of weights."""
        return sum(self.sizes)

    @property
    def m(self) -> int:
        """Number of gradients."""
        return int(self.grads.shape[0])


def sizes(
    *, min_params: int = 1, max_params: int = 4, min_size: int = 1, max_size: int = 12
) -> st.SearchStrategy[tuple[int, ...]]:
    """Numbers of weights of 1–4 parameters, each 1–12 (shrinks towards one weight)."""
    return st.lists(
        st.integers(min_size, max_size), min_size=min_params, max_size=max_params
    ).map(tuple)


def block_sizes(*, max_block: int = 8) -> st.SearchStrategy[int | None]:
    """None (one block over everything) or a block width in 1..``max_block``."""
    return st.none() | st.integers(1, max_block)


def dampings(min_value: float = 1e-3, max_value: float = 1e2) -> st.SearchStrategy[float]:
    """Damping λ in [1e-3, 1e2]: bounded away from 0 so F stays invertible in float64."""
    return st.floats(min_value, max_value, allow_nan=False, allow_infinity=False)


def gradients(
    m: int, d: int, *, bound: float = 10.0, width: int = 64
) -> st.SearchStrategy[Tensor]:
    """Float64 gradient rows ``[m, d]`` with entries in [−bound, bound], no subnormals.

    ``width=32`` draws only float32-representable values (held in float64), for comparisons
    of a float32 computation with a float64 one on the same inputs.
    """
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False,
                         allow_subnormal=False, width=width)
    return hnp.arrays(np.float64, (m, d), elements=elements).map(torch.from_numpy)


# fisher_problems' keyword arguments shadow the strategy functions above; keep handles to them.
_default_sizes, _default_block_sizes, _default_dampings = sizes, block_sizes, dampings


@st.composite
def fisher_problems(
    draw: st.DrawFn,
    *,
    sizes: st.SearchStrategy[tuple[int, ...]] | None = None,
    block_sizes: st.SearchStrategy[int | None] | None = None,
    dampings: st.SearchStrategy[float] | None = None,
    min_grads: int = 1,
    max_grads: int = 8,
    grad_bound: float = 10.0,
) -> FisherProblem:
    """A :class:`FisherProblem`: sizes, block size, damping and m ∈ [1, 8] gradient rows.

    Each part can be replaced by another strategy (``st.just(...)`` to fix it), e.g. a contract
    suite fixes ``block_sizes`` to the estimator's configured block size.
    """
    drawn_sizes = draw(sizes if sizes is not None else _default_sizes())
    block_size = draw(block_sizes if block_sizes is not None else _default_block_sizes())
    damping = draw(dampings if dampings is not None else _default_dampings())
    m = draw(st.integers(min_grads, max_grads))
    grads = draw(gradients(m, sum(drawn_sizes), bound=grad_bound))
    return FisherProblem(drawn_sizes, block_size, damping, grads)


@st.composite
def well_conditioned_spd(draw: st.DrawFn, n: int, max_cond: float) -> Tensor:
    """A float64 SPD ``[n, n]`` matrix Q·diag(s)·Qᵀ with s ∈ [1, max_cond], so cond ≤ max_cond.

    Q is the orthogonal factor of a Householder QR of a drawn matrix (orthogonal even when that
    matrix is singular), so the condition number is bounded by construction, not by filtering.
    """
    if n < 1 or not max_cond >= 1:
        raise ValueError(f"need n >= 1 and max_cond >= 1, got n={n}, max_cond={max_cond}")
    entries = st.floats(-1, 1, allow_nan=False, allow_subnormal=False, width=64)
    raw = torch.from_numpy(draw(hnp.arrays(np.float64, (n, n), elements=entries)))
    q, _ = torch.linalg.qr(raw)
    spectrum = draw(hnp.arrays(np.float64, (n,), elements=st.floats(1.0, max_cond)))
    matrix = (q * torch.from_numpy(spectrum)) @ q.mT
    return (matrix + matrix.mT) / 2
