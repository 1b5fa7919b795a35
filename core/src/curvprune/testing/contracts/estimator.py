"""Conformance suite for curvature estimators: every query against the dense float64 Fisher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from curvprune import (
    BlockLayout,
    CurvatureEstimator,
)
from curvprune.testing.contracts._base import ComponentContract, contract_settings
from curvprune.testing.dense import (
    assert_allclose,
    dense_inverse,
)
from curvprune.testing.strategies import dampings, gradients, sizes


# ------------------------------------------------------------------------------------------------
# Curvature estimators
# ------------------------------------------------------------------------------------------------
class CurvatureEstimatorContract(ComponentContract):
    """Conformance suite for a :class:`curvprune.CurvatureEstimator`.

    Checks, against :meth:`reference_inverse` in float64: ``ihvp`` on ``[d]`` and ``[n, d]``,
    ``inverse_diagonal``, ``inverse_columns`` on groups within blocks (with ``-1`` padding), the
    block structure, ``num_samples``, streaming in chunks, gradient order, shape errors,
    ``memory_bytes``, ``setup`` resetting state, and a float32 run within a conditioning-scaled
    tolerance.

    Attributes:
        name: registered estimator name.
        options: config options used by the suite (the suite forces ``dtype="float64"``, and sets
            ``damping`` and ``num_grads`` to each drawn problem's).
        exact_block_fisher: the estimator computes F = λ·I + (1/m)·Σ gᵢgᵢᵀ restricted to the
            blocks of ``config.block_size`` exactly; approximations set False and override
            :meth:`reference_inverse`.
        max_grads: the most gradients a drawn problem feeds (m ∈ [1, max_grads]).
        memory_scales_with_d: ``memory_bytes`` grows strictly with d (False for estimators whose
            state does not depend on d; it must still never shrink).
        rtol_factor: c in the tolerance c·(d + m)·eps·κ, κ = max(cond(F), ‖F‖₂/λ).
    """

    kind = "estimator"
    exact_block_fisher: ClassVar[bool] = True
    max_grads: ClassVar[int] = 8
    memory_scales_with_d: ClassVar[bool] = True
    rtol_factor: ClassVar[float] = 4.0

    # -- what subclasses may override ------------------------------------------------------------
    def make(self, **overrides: Any) -> CurvatureEstimator:
        """Build the estimator: ``options``, then ``dtype="float64"``, then ``overrides``."""
        return self._create(**{**self.options, "dtype": "float64", **overrides})

    def reference_inverse(
        self, grads: Tensor, sizes: Sequence[int], estimator: CurvatureEstimator
    ) -> Tensor:
        """The dense float64 ``[d, d]`` inverse the estimator approximates exactly.

        The default is the damped empirical Fisher restricted to ``config.block_size`` blocks
        (:func:`curvprune.testing.dense.dense_inverse`); approximations (diagonal, K-FAC, ...)
        override it with the dense inverse of their own structure.
        """
        if not self.exact_block_fisher:
            raise NotImplementedError(
                f"{type(self).__name__} sets exact_block_fisher = False, so it must override "
                "reference_inverse(grads, sizes, estimator)"
            )
        config = estimator.config
        return dense_inverse(grads, sizes, config.block_size, config.damping)

    def sizes_strategy(self) -> st.SearchStrategy[tuple[int, ...]]:
        """Parameter sizes to draw (default: 1–4 parameters of 1–12 weights)."""
        return sizes()

    def tolerance(
        self, reference: Tensor, m: int, dtype: torch.dtype, damping: float | None = None
    ) -> float:
        """Relative tolerance c·(d + m)·eps·κ, κ = max(cond(F), ‖F‖₂/λ) (module docstring).

        Comparisons of F⁻¹v allow ``tolerance·‖F⁻¹‖₂·‖v‖``; entries of F⁻¹ allow
        ``tolerance·‖F⁻¹‖₂``. ``reference`` is F⁻¹, so ‖F‖₂ = 1/λ_min(F⁻¹); without
        ``damping``, κ = cond(F).
        """
        eig = torch.linalg.eigvalsh(reference.to(torch.float64))
        kappa = float(eig[-1] / eig[0])
        if damping is not None:
            kappa = max(kappa, 1.0 / (damping * float(eig[0])))
        return self.rtol_factor * (reference.shape[0] + m) * torch.finfo(dtype).eps * kappa

    # -- helpers ---------------------------------------------------------------------------------
    def _draw(
        self,
        data: st.DataObject,
        *,
        grad_bound: float = 10.0,
        damping_range: tuple[float, float] = (1e-3, 1e2),
        width: int = 64,
    ) -> tuple[tuple[int, ...], float, Tensor]:
        drawn_sizes = data.draw(self.sizes_strategy(), label="sizes")
        damping = self.options.get("damping")
        if damping is None:
            damping = data.draw(dampings(*damping_range), label="damping")
        m = data.draw(st.integers(1, self.max_grads), label="m")
        grads = data.draw(gradients(m, sum(drawn_sizes), bound=grad_bound, width=width),
                          label="grads")
        return drawn_sizes, float(damping), grads

    def _fitted(
        self, drawn_sizes: Sequence[int], damping: float, grads: Tensor, **overrides: Any
    ) -> CurvatureEstimator:
        est = self.make(damping=damping, num_grads=int(grads.shape[0]), **overrides)
        est.setup(drawn_sizes)
        est.update(grads)
        return est

    @staticmethod
    def _check_products(
        actual: Tensor, expected: Tensor, v: Tensor, reference: Tensor, rtol: float, what: str
    ) -> None:
        # The error of F⁻¹v is bounded relative to ‖F⁻¹‖₂·‖v‖₂ (not elementwise): scale each row.
        # ‖v‖ is taken of v/max|v|: hypothesis draws v ~ 1e-168, whose squares underflow, and a
        # norm that flushed to zero turned this into an elementwise test it was never meant to be.
        rows = v.reshape(-1, v.shape[-1]).to(torch.float64)
        peak = rows.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        norm = peak * torch.linalg.vector_norm(rows / peak, dim=-1, keepdim=True)
        scale = torch.linalg.matrix_norm(reference, ord=2) * norm.clamp_min(
            torch.finfo(torch.float64).tiny
        )
        actual = actual.reshape(-1, actual.shape[-1]).to(torch.float64)
        expected = expected.reshape(-1, expected.shape[-1])
        assert_allclose(actual / scale, expected / scale, rtol=rtol, atol=rtol, what=what)

    # -- the suite -------------------------------------------------------------------------------
    @contract_settings
    @given(data=st.data())
    def test_ihvp_matches_reference_solve(self, data: st.DataObject) -> None:
        """ihvp(v) equals F⁻¹v for v of shape [d] and [n, d]."""
        drawn_sizes, damping, grads = self._draw(data)
        est = self._fitted(drawn_sizes, damping, grads)
        reference = self.reference_inverse(grads, drawn_sizes, est)
        rtol = self.tolerance(reference, grads.shape[0], torch.float64, damping)
        d = sum(drawn_sizes)
        n = data.draw(st.integers(1, 3), label="n")
        vs = data.draw(gradients(n, d, bound=1.0), label="v")
        single = est.ihvp(vs[0])
        assert single.shape == (d,), f"ihvp of a [d] vector has shape {tuple(single.shape)}"
        self._check_products(single, reference @ vs[0], vs[0], reference, rtol, "ihvp(v[d])")
        batched = est.ihvp(vs)
        assert batched.shape == (n, d), f"ihvp of [n, d] has shape {tuple(batched.shape)}"
        self._check_products(batched, vs @ reference, vs, reference, rtol, "ihvp(v[n, d])")

    @contract_settings
    @given(data=st.data())
    def test_inverse_diagonal_matches_reference(self, data: st.DataObject) -> None:
        """inverse_diagonal() equals diag(F⁻¹), every entry > 0."""
        drawn_sizes, damping, grads = self._draw(data)
        est = self._fitted(drawn_sizes, damping, grads)
        reference = self.reference_inverse(grads, drawn_sizes, est)
        rtol = self.tolerance(reference, grads.shape[0], torch.float64, damping)
        diag = est.inverse_diagonal()
        assert diag.shape == (sum(drawn_sizes),), f"inverse_diagonal shape {tuple(diag.shape)}"
        assert bool((diag > 0).all()), f"inverse_diagonal has entries <= 0: {diag.tolist()}"
        # Diagonal entries of F⁻¹ are bounded by ‖F⁻¹‖₂; their error scales with it.
        atol = rtol * float(torch.linalg.matrix_norm(reference, ord=2))
        assert_allclose(diag, reference.diagonal(), rtol=rtol, atol=atol, what="inverse_diagonal")

    @contract_settings
    @given(data=st.data())
    def test_inverse_columns_within_blocks(self, data: st.DataObject) -> None:
        """inverse_columns gathers [F⁻¹]_{ij} within a block; padding holds the identity."""
        drawn_sizes, damping, grads = self._draw(data)
        est = self._fitted(drawn_sizes, damping, grads)
        reference = self.reference_inverse(grads, drawn_sizes, est)
        rtol = self.tolerance(reference, grads.shape[0], torch.float64, damping)
        blocks = est.block_layout
        starts, lengths = blocks.starts.tolist(), blocks.lengths.tolist()
        rows = []
        for _ in range(data.draw(st.integers(1, 3), label="rows")):
            b = data.draw(st.integers(0, blocks.n_blocks - 1), label="block")
            members = data.draw(
                st.lists(st.integers(0, lengths[b] - 1), unique=True, max_size=min(4, lengths[b])),
                label="positions",
            )
            rows.append([starts[b] + p for p in members])
        k = max(1, *(len(r) for r in rows)) + data.draw(st.integers(0, 1), label="extra padding")
        idx = torch.tensor([r + [-1] * (k - len(r)) for r in rows], dtype=torch.long)
        out = est.inverse_columns(idx)
        assert out.shape == (len(rows), k, k), f"inverse_columns shape {tuple(out.shape)}"
        valid = idx >= 0
        pair = valid[:, :, None] & valid[:, None, :]
        safe = idx.clamp_min(0)
        expected = reference[safe[:, :, None], safe[:, None, :]]
        expected = torch.where(pair, expected, torch.eye(k, dtype=torch.float64))
        out64 = out.to(torch.float64)
        padding = ~pair
        assert torch.equal(out64[padding], expected[padding]), (
            f"padding of inverse_columns must hold the identity; idx={idx.tolist()}"
        )
        atol = rtol * float(torch.linalg.matrix_norm(reference, ord=2))
        assert_allclose(out64, expected, rtol=rtol, atol=atol,
                        what=f"inverse_columns(idx={idx.tolist()})")

    @contract_settings
    @given(data=st.data())
    def test_block_structure(self, data: st.DataObject) -> None:
        """block_layout tiles [0, d) without crossing parameters, and F⁻¹ has no entry across it."""
        drawn_sizes, damping, grads = self._draw(data)
        est = self._fitted(drawn_sizes, damping, grads)
        blocks = est.block_layout
        d = sum(drawn_sizes)
        ends = (blocks.starts + blocks.lengths).tolist()
        assert blocks.starts.tolist() == [0, *ends[:-1]] and ends[-1] == d, (
            f"block_layout must tile [0, {d}) in order: starts={blocks.starts.tolist()}, "
            f"lengths={blocks.lengths.tolist()}"
        )
        if est.config.block_size is not None:
            boundaries = set(np.cumsum(drawn_sizes)[:-1].tolist())
            crossing = [(s, e) for s, e in zip(blocks.starts.tolist(), ends, strict=True)
                        if any(s < b < e for b in boundaries)]
            assert not crossing, f"blocks {crossing} cross a parameter boundary {boundaries}"
        if self.exact_block_fisher:
            expected = BlockLayout.build(drawn_sizes, est.config.block_size)
            assert torch.equal(blocks.starts, expected.starts) and torch.equal(
                blocks.lengths, expected.lengths
            ), f"block_layout does not follow block_size={est.config.block_size}"
        # F⁻¹ has no entry across blocks: the columns ihvp(e_q) vanish outside q's block.
        columns = est.ihvp(torch.eye(d, dtype=torch.float64))
        block_of = blocks.block_of()
        across = block_of[:, None] != block_of[None, :]
        reference = self.reference_inverse(grads, drawn_sizes, est)
        bound = self.tolerance(reference, grads.shape[0], torch.float64, damping) * float(
            torch.linalg.matrix_norm(reference, ord=2)
        )
        leak = columns.abs().masked_fill(~across, 0)
        assert float(leak.max()) <= bound, (
            f"F⁻¹ has entries across blocks (max {float(leak.max()):.3g} > {bound:.3g})"
        )

    @contract_settings
    @given(data=st.data())
    def test_num_samples_counts(self, data: st.DataObject) -> None:
        """num_samples is 0 after setup and counts every gradient fed."""
        drawn_sizes, damping, grads = self._draw(data)
        est = self.make(damping=damping, num_grads=int(grads.shape[0]))
        est.setup(drawn_sizes)
        assert est.num_samples == 0, f"num_samples after setup is {est.num_samples}, not 0"
        cut = data.draw(st.integers(0, grads.shape[0]), label="cut")
        est.update(grads[:cut])
        assert est.num_samples == cut, f"num_samples is {est.num_samples} after {cut} gradients"
        est.update(grads[cut:])
        m = grads.shape[0]
        assert est.num_samples == m, f"num_samples is {est.num_samples} after {m} gradients"
        assert isinstance(est.num_samples, int), "num_samples must be a Python int"

    @contract_settings
    @given(data=st.data())
    def test_streaming_in_chunks_equals_one_update(self, data: st.DataObject) -> None:
        """Feeding the gradients in chunks of any size equals one update."""
        drawn_sizes, damping, grads = self._draw(data)
        whole = self._fitted(drawn_sizes, damping, grads)
        m = grads.shape[0]
        cuts = sorted(data.draw(st.lists(st.integers(0, m), max_size=3), label="cuts"))
        chunked = self.make(damping=damping, num_grads=m)
        chunked.setup(drawn_sizes)
        for start, stop in zip([0, *cuts], [*cuts, m], strict=True):
            chunked.update(grads[start:stop])
        self._check_same(whole, chunked, grads, drawn_sizes, data, "chunked updates")

    @contract_settings
    @given(data=st.data())
    def test_gradient_order_does_not_matter(self, data: st.DataObject) -> None:
        """A permutation of the gradients gives the same estimate."""
        drawn_sizes, damping, grads = self._draw(data)
        order = data.draw(st.permutations(range(grads.shape[0])), label="order")
        forward = self._fitted(drawn_sizes, damping, grads)
        shuffled = self._fitted(drawn_sizes, damping, grads[list(order)])
        self._check_same(forward, shuffled, grads, drawn_sizes, data, f"order {order}")

    def _check_same(
        self,
        first: CurvatureEstimator,
        second: CurvatureEstimator,
        grads: Tensor,
        drawn_sizes: Sequence[int],
        data: st.DataObject,
        what: str,
    ) -> None:
        reference = self.reference_inverse(grads, drawn_sizes, first)
        # two computations, each within the bound of the exact answer: their difference is
        # within twice it (hypothesis found M-FAC orders 1.2× apart at κ ≈ 4)
        rtol = 2 * self.tolerance(reference, grads.shape[0], torch.float64, first.config.damping)
        v = data.draw(gradients(2, sum(drawn_sizes), bound=1.0), label="v")
        self._check_products(second.ihvp(v), first.ihvp(v), v, reference, rtol, f"ihvp, {what}")
        atol = rtol * float(torch.linalg.matrix_norm(reference, ord=2))
        assert_allclose(second.inverse_diagonal(), first.inverse_diagonal(), rtol=rtol,
                        atol=atol, what=f"inverse_diagonal, {what}")

    def test_update_rejects_wrong_shapes(self) -> None:
        """Update and ihvp raise ValueError on shapes other than [k, d] and [d]/[n, d]."""
        est = self.make()
        est.setup([3, 2])
        for bad in (torch.zeros(2, 6), torch.zeros(5), torch.zeros(2, 5, 1), torch.zeros(2, 4)):
            try:
                est.update(bad)
            except ValueError:
                continue
            raise AssertionError(f"update accepted grads of shape {tuple(bad.shape)} for d=5")
        for bad in (torch.zeros(6), torch.zeros(2, 4), torch.zeros(1, 2, 5)):
            try:
                est.ihvp(bad)
            except ValueError:
                continue
            raise AssertionError(f"ihvp accepted v of shape {tuple(bad.shape)} for d=5")
        assert est.num_samples == 0, "a rejected update must not count gradients"

    def test_memory_bytes_is_a_positive_int_growing_with_d(self) -> None:
        """memory_bytes is a positive int that grows with d."""
        est = self.make()
        cls = type(est)
        small, large = cls.memory_bytes([4, 4], est.config), cls.memory_bytes([32, 32], est.config)
        for value in (small, large):
            assert isinstance(value, int) and not isinstance(value, bool), (
                f"memory_bytes must return an int, got {type(value).__name__}"
            )
            assert value > 0, f"memory_bytes must be > 0, got {value}"
        if self.memory_scales_with_d:
            assert large > small, f"memory_bytes does not grow with d: {small} (d=8), {large} (64)"
        else:
            assert large >= small, f"memory_bytes shrinks with d: {small} (d=8), {large} (d=64)"

    @contract_settings
    @given(data=st.data())
    def test_setup_resets_state(self, data: st.DataObject) -> None:
        """setup() drops all state: a reused estimator equals a fresh one."""
        first_sizes, damping, first_grads = self._draw(data)
        second_sizes = data.draw(self.sizes_strategy(), label="second sizes")
        m = first_grads.shape[0]
        second_grads = data.draw(gradients(m, sum(second_sizes)), label="second grads")
        reused = self._fitted(first_sizes, damping, first_grads)
        reused.setup(second_sizes)
        assert reused.num_samples == 0, f"num_samples after setup is {reused.num_samples}"
        assert reused.d == sum(second_sizes)
        reused.update(second_grads)
        fresh = self._fitted(second_sizes, damping, second_grads)
        self._check_same(fresh, reused, second_grads, second_sizes, data, "after re-setup")

    @contract_settings
    @given(data=st.data())
    def test_float32_agrees_with_float64(self, data: st.DataObject) -> None:
        """A float32 run agrees with float64 within c·(d + m)·eps₃₂·κ."""
        # Gradients in [-1, 1] and λ in [0.1, 10] keep κ ≤ 1 + 48/0.1, so the float32
        # budget c·(d + m)·eps₃₂·cond stays well below 1 and the check has teeth.
        # Inputs are float32-representable, so both runs see the same problem.
        drawn_sizes, damping, grads = self._draw(
            data, grad_bound=1.0, damping_range=(0.1, 10.0), width=32
        )
        est32 = self._fitted(drawn_sizes, damping, grads, dtype="float32")
        assert est32.dtype == torch.float32, f"dtype='float32' gave {est32.dtype}"
        est64 = self._fitted(drawn_sizes, damping, grads)
        reference = self.reference_inverse(grads, drawn_sizes, est64)
        rtol = self.tolerance(reference, grads.shape[0], torch.float32, damping)
        v = data.draw(gradients(2, sum(drawn_sizes), bound=1.0, width=32), label="v")
        out = est32.ihvp(v)
        assert out.dtype == torch.float32, f"float32 estimator's ihvp returned {out.dtype}"
        self._check_products(out, v @ reference, v, reference, rtol, "float32 ihvp")
        atol = rtol * float(torch.linalg.matrix_norm(reference, ord=2))
        assert_allclose(est32.inverse_diagonal(), reference.diagonal(), rtol=rtol, atol=atol,
                        what="float32 inverse_diagonal")
