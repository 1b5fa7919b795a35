"""Conformance suites for the four roles: a plugin's test module subclasses them.

Every component, first- or third-party, is held to the same checks::

    from curvprune.testing.contracts import CurvatureEstimatorContract

    class TestWoodFisher(CurvatureEstimatorContract):
        name = "woodfisher"
        options = {"block_size": 4}

pytest collects the inherited ``test_*`` methods in each subclass named ``Test*`` (the contract
classes themselves are not collected). Components are built by name through the plugin registry
(:func:`curvprune.create`), so the suite also checks registration and config structuring. A
component whose distribution is not installed (a freshly copied plugin) can be registered
in-process with the ``plugins`` class attribute.

The suites use Hypothesis with the bounded strategies of :mod:`curvprune.testing.strategies`;
values are drawn inside the tests (``st.data()``), so a subclass can change what is drawn by
overriding the small strategy methods (``sizes_strategy``, ``layouts``, ...).

Tolerances: exactness checks run in float64 against :mod:`curvprune.testing.dense` and allow
errors of ``rtol·‖F⁻¹‖₂·‖v‖`` with ``rtol = c·(d + m)·eps·κ``, ``c = rtol_factor`` (4) and
``κ = max(cond(F), ‖F‖₂/λ)``. A backward-stable factorization or solve has error
≲ d·eps·cond(F) relative to ‖F⁻¹‖₂‖v‖; a recursion that starts at F₀⁻¹ = I/λ and applies m
rank-1 corrections (Woodbury) cancels terms of size 1/λ, so its error is ≲ eps/λ per update in
absolute terms, which is eps·‖F‖₂/λ·λ_min(F)/‖F‖₂ ≤ eps·‖F‖₂/λ relative to ‖F⁻¹‖₂ = 1/λ_min(F).
For the exact damped Fisher λ_min(F) ≥ λ, so κ = ‖F‖₂/λ, the conditioning of the worst
intermediate F_k of such a recursion.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import hypothesis.extra.numpy as hnp
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import curvprune
from curvprune import (
    BlockLayout,
    CurvatureEstimator,
    GradientSource,
    MaskApplier,
    ParamLayout,
    PluginHost,
    PruneContext,
    SaliencyScorer,
    Scheduler,
)
from curvprune.testing.dense import (
    assert_allclose,
    dense_inverse,
)
from curvprune.testing.strategies import dampings, gradients, sizes

__all__ = [
    "CurvatureEstimatorContract",
    "MaskApplierContract",
    "SaliencyScorerContract",
    "SchedulerContract",
]

#: Every contract test: subclasses re-run the same @given test, which is the point here.
_contract_settings = settings(suppress_health_check=[HealthCheck.differing_executors])

_HOSTS: dict[type, PluginHost] = {}


class _ComponentContract:
    """Shared plumbing: the plugin host and building components by kind and name."""

    kind: ClassVar[str]
    #: The registered name of the component under test.
    name: ClassVar[str]
    #: Config options the suite builds the component with.
    options: ClassVar[Mapping[str, Any]] = {}
    #: ``(name, plugin)`` pairs registered in-process, with entry-point autoload off (so an
    #: installed copy of the same plugin does not clash). Empty: use the installed plugins.
    plugins: ClassVar[Sequence[tuple[str, object]]] = ()

    @classmethod
    def host(cls) -> PluginHost:
        """The plugin host the suite resolves names in (built once per class)."""
        if cls not in _HOSTS:
            if cls.plugins:
                _HOSTS[cls] = curvprune.get_plugin_manager(autoload=False, plugins=cls.plugins)
            else:
                _HOSTS[cls] = curvprune.get_plugin_manager()
        return _HOSTS[cls]

    def _create(self, **config: Any) -> Any:
        return curvprune.create(self.kind, self.name, host=self.host(), **config)


# ------------------------------------------------------------------------------------------------
# Curvature estimators
# ------------------------------------------------------------------------------------------------
class CurvatureEstimatorContract(_ComponentContract):
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
        scale = torch.linalg.matrix_norm(reference, ord=2) * torch.linalg.vector_norm(
            v.reshape(-1, v.shape[-1]), dim=-1, keepdim=True
        ).clamp_min(torch.finfo(torch.float64).tiny)
        actual = actual.reshape(-1, actual.shape[-1]).to(torch.float64)
        expected = expected.reshape(-1, expected.shape[-1])
        assert_allclose(actual / scale, expected / scale, rtol=rtol, atol=rtol, what=what)

    # -- the suite -------------------------------------------------------------------------------
    @_contract_settings
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

    @_contract_settings
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

    @_contract_settings
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

    @_contract_settings
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

    @_contract_settings
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

    @_contract_settings
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

    @_contract_settings
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
        rtol = self.tolerance(reference, grads.shape[0], torch.float64, first.config.damping)
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

    @_contract_settings
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

    @_contract_settings
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


# ------------------------------------------------------------------------------------------------
# Saliency scorers
# ------------------------------------------------------------------------------------------------
def _structure_to_weights(keep: Tensor, layout: curvprune.ParamLayout) -> Tensor:
    """Weight keep-mask ``[d]`` from a structure keep-mask ``[S]`` (unprunable rows kept)."""
    sid = layout.structure_index()
    never = torch.ones_like(sid, dtype=torch.bool)
    per_channel = torch.where(sid >= 0, keep[sid.clamp_min(0)], never)
    return per_channel[layout.channel_index()]


class _TinyNet(nn.Module):
    """Conv (1→3 channels, 3×3) → ReLU → Linear (48→3) on 4×4 single-channel images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(48, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


class SaliencyScorerContract(_ComponentContract):
    """Conformance suite for a :class:`curvprune.SaliencyScorer`.

    Builds a tiny model and a :class:`curvprune.PruneContext` holding only what the scorer
    declares it needs (``needs_curvature``: a fitted ``estimator``, by default ``dense``;
    ``needs_gradient``: ``mean_grad``; ``needs_data``: ``batches`` and ``loss_fn``), so an
    undeclared need fails here rather than in a pipeline. For channel scorers the layout carries
    traced structures (:attr:`curvprune.ParamLayout.structures`), as the pipeline gives them with
    the ``channel`` mask. Checks the score shape (``[d]`` or ``[S]``, one per structure) and
    finiteness, that :meth:`~curvprune.SaliencyScorer.compensate` returns
    None or a finite ``[d]`` tensor and ``predicted_loss_change`` None or a finite 0-dim tensor,
    and that scoring leaves the model unchanged.

    Attributes:
        name: registered scorer name.
        options: its config options.
        estimator: the estimator fitted for scorers that need curvature.
        estimator_options: that estimator's options.
        data_size: samples in the tiny data set (and gradients fed to the estimator).
    """

    kind = "scorer"
    estimator: ClassVar[str] = "dense"
    estimator_options: ClassVar[Mapping[str, Any]] = {"damping": 1e-2, "dtype": "float64"}
    data_size: ClassVar[int] = 8

    def make(self, **overrides: Any) -> SaliencyScorer:
        """Build the scorer from ``options`` and ``overrides``."""
        return self._create(**{**self.options, **overrides})

    def make_model(self, generator: torch.Generator) -> nn.Module:
        """The model to score (default: a conv + linear net on 4×4 images), weights drawn."""
        model = _TinyNet().to(torch.float64)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(0.5 * torch.randn(param.shape, generator=generator,
                                              dtype=param.dtype))
        return model

    def make_batches(self, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        """The data: ``data_size`` inputs and labels, in two batches."""
        x = torch.randn(self.data_size, 1, 4, 4, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (self.data_size,), generator=generator)
        half = self.data_size // 2
        return [(x[:half], y[:half]), (x[half:], y[half:])]

    def make_context(self, scorer: SaliencyScorer, seed: int, sparsity: float) -> PruneContext:
        """A context on the tiny model, with a drawn existing mask of about ``sparsity``."""
        generator = torch.Generator().manual_seed(seed)
        model = self.make_model(generator)
        batches = self.make_batches(generator)
        layout = curvprune.select_parameters(model)
        if scorer.granularity == "channel":
            # as the pipeline does for a channel mask: traced structures (the classifier's
            # rows are not prunable); one score per structure
            graph = curvprune.StructureGraph.trace(model)
            layout = layout.with_structures(graph.structures(layout))
            keep = torch.rand(layout.n_structures, generator=generator) >= sparsity
            mask = _structure_to_weights(keep, layout)
        else:
            mask = torch.rand(layout.d, generator=generator) >= sparsity
        layout.scatter_(model, layout.gather(model) * mask)
        ctx = PruneContext(
            model=model, layout=layout, weights=layout.gather(model), mask=mask,
            target_sparsity=min(0.95, sparsity + 0.25),
        )
        if scorer.needs_curvature or scorer.needs_gradient:
            source = GradientSource(model, layout, F.cross_entropy, mask=mask)
            grads = torch.cat(list(source.iter_grads(batches, self.data_size)))
            if scorer.needs_gradient:
                ctx.mean_grad = grads.mean(0)
            if scorer.needs_curvature:
                est = curvprune.create("estimator", self.estimator, host=self.host(),
                                       **{**self.estimator_options, "num_grads": len(grads)})
                est.setup(layout.sizes)
                est.update(grads)
                ctx.estimator = est
        if scorer.needs_data:
            ctx.batches = lambda: iter(batches)
            ctx.loss_fn = F.cross_entropy
        return ctx

    def _scored(self, data: st.DataObject) -> tuple[SaliencyScorer, PruneContext, Tensor]:
        scorer = self.make()
        seed = data.draw(st.integers(0, 2**16), label="seed")
        sparsity = data.draw(st.sampled_from([0.0, 0.3, 0.6]), label="existing sparsity")
        ctx = self.make_context(scorer, seed, sparsity)
        return scorer, ctx, scorer.score(ctx)

    def _pruned(self, scorer: SaliencyScorer, ctx: PruneContext, scores: Tensor,
                fraction: float) -> Tensor:
        """The lowest-scored kept units, about ``fraction`` of them, as a bool ``[d]`` mask."""
        if scorer.granularity == "channel":
            kept = ctx.layout.alive_structures(ctx.mask)
        else:
            kept = ctx.mask.clone()
        count = int(fraction * int(kept.sum()))
        order = torch.where(kept, scores.to(torch.float64), torch.inf).argsort()
        chosen = torch.zeros_like(kept)
        chosen[order[:count]] = True
        if scorer.granularity == "channel":
            return ~_structure_to_weights(~chosen, ctx.layout) & ctx.mask
        return chosen

    @settings(_contract_settings, max_examples=10)
    @given(data=st.data())
    def test_score_shape_and_finite(self, data: st.DataObject) -> None:
        """Scores are finite floats, one per weight or per channel structure."""
        scorer, ctx, scores = self._scored(data)
        units = ctx.layout.d if scorer.granularity == "weight" else ctx.layout.n_structures
        assert scores.shape == (units,), (
            f"{scorer.granularity} scores must have shape [{units}], got {tuple(scores.shape)}"
        )
        assert scores.is_floating_point(), f"scores must be floating, got {scores.dtype}"
        assert bool(torch.isfinite(scores).all()), "scores hold NaN or infinity"

    @settings(_contract_settings, max_examples=10)
    @given(data=st.data())
    def test_compensate_is_none_or_finite(self, data: st.DataObject) -> None:
        """Compensate returns None or a finite [d] update."""
        scorer, ctx, scores = self._scored(data)
        fraction = data.draw(st.sampled_from([0.0, 0.2, 0.5]), label="fraction")
        delta = scorer.compensate(ctx, self._pruned(scorer, ctx, scores, fraction))
        if delta is not None:
            assert delta.shape == (ctx.layout.d,), f"δw must be [d], got {tuple(delta.shape)}"
            assert bool(torch.isfinite(delta).all()), "δw holds NaN or infinity"

    @settings(_contract_settings, max_examples=10)
    @given(data=st.data())
    def test_predicted_loss_change_is_none_or_finite_scalar(self, data: st.DataObject) -> None:
        """predicted_loss_change returns None or a finite 0-dim tensor."""
        scorer, ctx, scores = self._scored(data)
        pruned = self._pruned(scorer, ctx, scores, 0.3)
        scorer.compensate(ctx, pruned)
        change = scorer.predicted_loss_change(ctx, pruned)
        if change is not None:
            assert change.dim() == 0, f"predicted loss change must be 0-dim, got {change.shape}"
            assert bool(torch.isfinite(change)), f"predicted loss change is {change.item()}"

    @settings(_contract_settings, max_examples=5)
    @given(data=st.data())
    def test_quadratic_prediction_is_the_quadratic_form(self, data: st.DataObject) -> None:
        """With ``quadratic_prediction``: predicted change of {q} = ½δwᵀFδw, δw its update.

        F is formed densely from the estimator's IHVPs of the unit vectors (float64 by default;
        d is small here); the identity then holds to ~κ(F)·d·ε, far below the 1e-6 checked.
        """
        import pytest  # only collected under pytest; curvprune does not depend on it

        scorer = self.make()
        if not scorer.quadratic_prediction:
            pytest.skip(f"{self.name} does not declare quadratic_prediction")
        ctx = self.make_context(scorer, data.draw(st.integers(0, 2**16), label="seed"), 0.3)
        scorer.score(ctx)
        assert ctx.estimator is not None, "quadratic_prediction needs a curvature estimator"
        eye = torch.eye(ctx.layout.d, dtype=torch.float64)
        fisher = torch.linalg.inv(ctx.estimator.ihvp(eye).double())
        kept = ctx.mask.nonzero().squeeze(1)
        for q in kept[torch.randperm(kept.numel())[:3]].tolist():
            one = torch.zeros_like(ctx.mask)
            one[q] = True
            delta = scorer.compensate(ctx, one)
            predicted = scorer.predicted_loss_change(ctx, one)
            assert delta is not None and predicted is not None, (
                "a scorer with quadratic_prediction must compensate and predict"
            )
            delta = delta.double()
            delta[q] = -float(ctx.weights[q])  # the pipeline zeroes w_q exactly
            expected = 0.5 * delta @ fisher @ delta
            assert abs(float(predicted) - float(expected)) <= 1e-6 * abs(float(expected)) + 1e-12, (
                f"predicted {float(predicted):.6g} but ½δwᵀFδw = {float(expected):.6g} for weight {q}"
            )

    @settings(_contract_settings, max_examples=5)
    @given(data=st.data())
    def test_scoring_leaves_the_model_unchanged(self, data: st.DataObject) -> None:
        """Score and compensate modify neither the model nor ctx.weights."""
        scorer = self.make()
        ctx = self.make_context(scorer, data.draw(st.integers(0, 2**16), label="seed"), 0.3)
        before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        weights = ctx.weights.clone()
        scores = scorer.score(ctx)
        scorer.compensate(ctx, self._pruned(scorer, ctx, scores, 0.3))
        for key, value in ctx.model.state_dict().items():
            assert torch.equal(value, before[key]), f"scoring modified the model's {key!r}"
        assert torch.equal(ctx.weights, weights), "scoring modified ctx.weights in place"


# ------------------------------------------------------------------------------------------------
# Mask appliers
# ------------------------------------------------------------------------------------------------
@st.composite
def _layouts(draw: st.DrawFn) -> ParamLayout:
    shapes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 6)), min_size=1,
                           max_size=3))
    return ParamLayout(
        names=tuple(f"layer{i}.weight" for i in range(len(shapes))),
        shapes=tuple(torch.Size(s) for s in shapes),
        module_types=("Linear",) * len(shapes),
    )


class MaskApplierContract(_ComponentContract):
    """Conformance suite for a :class:`curvprune.MaskApplier`.

    Checks that a new mask is a bool ``[d]`` subset of the current one, reaches the target
    sparsity exactly (within :meth:`rounding_units` units, in the applier's units), is a fixed
    point when applied again at the same level, and that masks for increasing levels are nested
    (distinct scores). Scores with ties are drawn too: ties must not break exactness.

    Attributes:
        name: registered mask applier name.
        options: its config options.
        max_sparsity: levels are drawn in [0, max_sparsity].
    """

    kind = "mask"
    max_sparsity: ClassVar[float] = 0.9

    def make(self, **overrides: Any) -> MaskApplier:
        """Build the applier from ``options`` and ``overrides``."""
        return self._create(**{**self.options, **overrides})

    def layouts(self) -> st.SearchStrategy[ParamLayout]:
        """Layouts to draw (default: 1–3 ``[out, in]`` weights, 1–5 × 1–6)."""
        return _layouts()

    def rounding_units(self, applier: MaskApplier, layout: ParamLayout) -> int:
        """Units by which the achieved count may miss target·units (default: 1, one rounding)."""
        return 1

    def _units(self, applier: MaskApplier, layout: ParamLayout) -> int:
        return layout.d if applier.granularity == "weight" else layout.n_structures

    def _expand(self, applier: MaskApplier, layout: ParamLayout, unit_mask: Tensor) -> Tensor:
        if applier.granularity == "weight":
            return unit_mask
        return _structure_to_weights(unit_mask, layout)

    def _problem(
        self, data: st.DataObject, *, distinct: bool = False
    ) -> tuple[MaskApplier, ParamLayout, Tensor, Tensor]:
        applier = self.make()
        layout = data.draw(self.layouts(), label="layout")
        n = self._units(applier, layout)
        if distinct:
            values = data.draw(st.permutations(range(n)), label="score ranks")
            scores = torch.tensor(values, dtype=torch.float64)
        else:
            elements = st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 10, allow_subnormal=False)
            scores = torch.from_numpy(data.draw(hnp.arrays(np.float64, (n,), elements=elements),
                                                label="scores"))
        keep = torch.from_numpy(data.draw(hnp.arrays(np.bool_, (n,)), label="current mask"))
        return applier, layout, scores, self._expand(applier, layout, keep)

    def _check_step(self, applier: MaskApplier, layout: ParamLayout, before: Tensor,
                    after: Tensor, level: float) -> None:
        assert after.dtype == torch.bool and after.shape == (layout.d,), (
            f"select must return bool [{layout.d}], got {after.dtype} {tuple(after.shape)}"
        )
        assert not bool((after & ~before).any()), "select revived pruned weights"
        if applier.granularity == "channel":
            channel = layout.channel_index()
            per_channel = torch.zeros(sum(layout.channels), dtype=torch.long).index_add_(
                0, channel, after.long()
            )
            size = torch.zeros_like(per_channel).index_add_(0, channel, torch.ones_like(channel))
            assert bool(((per_channel == 0) | (per_channel == size)).all()), (
                "a channel mask must keep or remove whole channels"
            )
        units = self._units(applier, layout)
        achieved = applier.achieved_sparsity(after, layout)
        floor = applier.achieved_sparsity(before, layout)
        wanted = max(level, floor)
        slack = self.rounding_units(applier, layout)
        assert abs(achieved - wanted) * units <= slack + 1e-9, (
            f"target sparsity {level} (current {floor:.4f}) over {units} units gave "
            f"{achieved:.4f}: off by {abs(achieved - wanted) * units:.2f} units (allowed {slack})"
        )

    @settings(_contract_settings, max_examples=25)
    @given(data=st.data())
    def test_subset_and_exact_sparsity(self, data: st.DataObject) -> None:
        """Each new mask is a subset of the current one at exactly the target sparsity."""
        applier, layout, scores, mask = self._problem(data)
        levels = data.draw(st.lists(st.floats(0, self.max_sparsity), min_size=1, max_size=3),
                           label="levels")
        for level in sorted(levels):
            new = applier.select(scores, mask, level, layout)
            self._check_step(applier, layout, mask, new, level)
            mask = new

    @settings(_contract_settings, max_examples=25)
    @given(data=st.data())
    def test_idempotent_at_the_same_level(self, data: st.DataObject) -> None:
        """Selecting again at the same level leaves the mask unchanged."""
        applier, layout, scores, mask = self._problem(data)
        level = data.draw(st.floats(0, self.max_sparsity), label="level")
        once = applier.select(scores, mask, level, layout)
        twice = applier.select(scores, once, level, layout)
        assert torch.equal(once, twice), (
            f"selecting again at sparsity {level} changed the mask: "
            f"{int((once != twice).sum())} weights differ"
        )

    @settings(_contract_settings, max_examples=25)
    @given(data=st.data())
    def test_monotone_over_increasing_levels(self, data: st.DataObject) -> None:
        """Masks for increasing levels are nested (distinct scores)."""
        applier, layout, scores, mask = self._problem(data, distinct=True)
        levels = sorted(data.draw(st.lists(st.floats(0, self.max_sparsity), min_size=2,
                                           max_size=3), label="levels"))
        masks = [applier.select(scores, mask, level, layout) for level in levels]
        for i in range(len(levels) - 1):
            assert not bool((masks[i + 1] & ~masks[i]).any()), (
                f"the mask at sparsity {levels[i + 1]} keeps weights the mask at {levels[i]} "
                "removes"
            )


# ------------------------------------------------------------------------------------------------
# Schedulers
# ------------------------------------------------------------------------------------------------
def _equal_state(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class SchedulerContract(_ComponentContract):
    """Conformance suite for a :class:`curvprune.Scheduler`.

    Checks that one-shot ``levels`` are non-decreasing, within [current, target] and end at the
    target; that ``level_at`` over ``horizon`` steps gives levels in [0, target] (and < 1) that
    never decrease; and that ``state_dict``/``load_state_dict`` round-trips mid-schedule.

    Attributes:
        name: registered schedule name.
        options: its config options.
        horizon: optimizer steps walked by the training-loop checks.
    """

    kind = "schedule"
    horizon: ClassVar[int] = 64

    def make(self, **overrides: Any) -> Scheduler:
        """Build the schedule from ``options`` and ``overrides``."""
        return self._create(**{**self.options, **overrides})

    @_contract_settings
    @given(target=st.floats(0, 0.99), current_fraction=st.floats(0, 1))
    def test_levels_end_at_target_and_never_decrease(
        self, target: float, current_fraction: float
    ) -> None:
        """levels() is non-decreasing, starts at or above current and ends at target."""
        current = target * current_fraction
        levels = list(self.make().levels(target, current))
        assert levels, "levels() returned no level"
        assert levels[-1] == target, f"levels {levels} do not end at the target {target}"
        rising = all(a <= b for a, b in zip(levels, levels[1:], strict=False))
        assert rising, f"levels {levels} decrease"
        assert current <= levels[0], f"levels {levels} go below the current sparsity {current}"

    @_contract_settings
    @given(target=st.floats(0, 0.99))
    def test_level_at_is_in_range_and_never_decreases(self, target: float) -> None:
        """level_at gives levels in [0, target] that never decrease over steps."""
        schedule = self.make()
        previous = 0.0
        for step in range(self.horizon):
            level = schedule.level_at(step, target)
            if level is None:
                continue
            assert 0.0 <= level < 1.0, f"level_at({step}) = {level} is outside [0, 1)"
            assert level <= target, f"level_at({step}) = {level} exceeds the target {target}"
            assert level >= previous, f"level_at({step}) = {level} < an earlier level {previous}"
            previous = level

    @_contract_settings
    @given(target=st.floats(0.1, 0.99), data=st.data())
    def test_state_dict_round_trip(self, target: float, data: st.DataObject) -> None:
        """A schedule restored from state_dict continues exactly like the original."""
        original = self.make()
        pause = data.draw(st.integers(0, self.horizon - 1), label="pause")
        for step in range(pause):
            original.level_at(step, target)
        state = original.state_dict()
        restored = self.make()
        restored.load_state_dict(copy.deepcopy(state))
        assert _equal_state(restored.state_dict(), state), (
            f"state_dict after load_state_dict differs: {restored.state_dict()} != {state}"
        )
        for step in range(pause, self.horizon):
            a, b = original.level_at(step, target), restored.level_at(step, target)
            assert a == b, f"after restoring at step {pause}, level_at({step}) gives {b}, not {a}"
            assert original.finished(step) == restored.finished(step), f"finished({step}) differs"
