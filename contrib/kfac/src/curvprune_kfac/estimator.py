"""K-FAC as a curvprune estimator: F = λI + blockdiag_l(G_l ⊗ A_l), one block per parameter.

The baseline WoodFisher (Singh & Alistarh, NeurIPS 2020, Sec. 6) compares against: the Fisher of
each layer approximated by a Kronecker product of the covariance of its inputs A_l and of the
gradients w.r.t. its outputs G_l (Martens & Grosse, ICML 2015, Eq. 1-2; Grosse & Martens,
ICML 2016 for convolutions), different layers uncoupled. The factors come from curvlinops
(:mod:`curvprune_kfac.factors`); the inverse queries are exact for that matrix, through
eigendecompositions of the factors (:mod:`curvprune_kfac.kronecker`):

* ``ihvp``: F⁻¹v, four GEMMs per layer;
* ``inverse_diagonal``: diag F⁻¹, the sum over eigenpairs of (u_g∘u_g)(u_a∘u_a)ᵀ/(s_g·s_a + λ);
* ``inverse_columns``: entries of F⁻¹ within one parameter, O(k²·o·i) per row of k indices.

Damping: λ is added to the Kronecker product (curvprune's convention F = λI + curvature, the same
λ as every other estimator; curvlinops' ``use_exact_damping``), not to each factor.

K-FAC cannot be built from flattened gradient rows (they do not carry the layer inputs and output
gradients separately), so the estimator declares :attr:`fits_model` and the pipeline calls
:meth:`KFACEstimator.fit` with the model and data instead of :meth:`update`, which raises
:class:`curvprune.UnsupportedQuery`.

Pruned weights: the pipeline zeroes their gradient rows for the other estimators, so F couples
them to nothing. A Kronecker product cannot express that: the factors see the pruned model (its
pruned weights are zero in every forward pass), but F⁻¹ still couples pruned to kept coordinates.
Scores of pruned weights are 0 (w = 0), and the pipeline re-zeroes them after every update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvprune import (
    BlockLayout,
    CurvatureEstimator,
    EstimatorConfig,
    EstimatorStateError,
    NumericalError,
    ParamLayout,
)
from curvprune_kfac.config import KFACConfig
from curvprune_kfac.factors import kronecker_factors, take_samples
from curvprune_kfac.kronecker import KroneckerInverse

__all__ = ["KFACEstimator"]


def _factor_dims(shape: Sequence[int]) -> tuple[int, int]:
    """(o, i): the G and A sizes of a parameter (i = 1 for a bias; i = c·kh·kw for a Conv2d)."""
    if len(shape) == 1:
        return int(shape[0]), 1
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def _layer_bytes(o: int, i: int, config: EstimatorConfig) -> int:
    itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
    return int(4 * (o * o + i * i) + itemsize * (2 * (o * o + i * i) + o + i + o * i) + 8 * o * i)


class KFACEstimator(CurvatureEstimator):
    """K-FAC through curvlinops: λI + G_l ⊗ A_l per selected Linear/Conv2d weight or bias."""

    config: KFACConfig
    fits_model = True
    #: one block per parameter: a rank fits the factors of its own parameters only
    sharding = "separable"

    def shard_alignment(self) -> None:
        """Whole parameters: a Kronecker block cannot be cut."""
        return None

    def __init__(self, config: KFACConfig | None = None) -> None:
        super().__init__(config or KFACConfig())
        self._inverse: KroneckerInverse | None = None
        self._m = 0

    # -- sizes and planning -----------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """m: the samples the factors were averaged over (0 before :meth:`fit`)."""
        return self._m

    @property
    def block_layout(self) -> BlockLayout:
        """One block per parameter: K-FAC couples the weights of one layer, no two layers."""
        sizes = torch.tensor(self.sizes, dtype=torch.long)
        starts = torch.cumsum(sizes, 0) - sizes
        return BlockLayout(starts, sizes, int(sizes.max()), int(sizes.sum()))

    @classmethod
    def plan_memory_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """Peak bytes while inverting: per parameter, curvlinops' factors G (o×o) and A (i×i) in
        the model's dtype (counted as float32), the eigendecompositions and their work copies
        (2·(o² + i²) + o + i), R (o·i) at the configured dtype, and the flat index (8·o·i)."""
        return sum(_layer_bytes(*_factor_dims(shape), config) for shape in layout.shapes)

    @classmethod
    def plan_held_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """Bytes held while a batch after the first is fitted: the factor sums, G (o×o) and A
        (i×i) of every layer once, in the model's dtype (counted as float32). The batch's own
        passes (its activations, unfolded patches and covariances) ``plan`` measures with
        :meth:`fit_passes`."""
        factors = {}
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            o, i = _factor_dims(shape)
            module = name.rpartition(".")[0]
            factors[module] = max(factors.get(module, 0), 4 * (o * o + i * i))
        return sum(factors.values())

    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """Like :meth:`plan_memory_bytes`, taking each parameter of n weights as a √n×√n layer.

        Sizes alone do not fix K-FAC's factors (a 1×n layer has an n×n factor); ``plan`` uses
        :meth:`plan_memory_bytes` with the real shapes.
        """
        sides = [math.isqrt(int(n) - 1) + 1 for n in sizes]  # ⌈√n⌉
        return sum(_layer_bytes(side, side, config) for side in sides)

    # -- life cycle ---------------------------------------------------------------------------
    def _setup(self) -> None:
        self._inverse = None
        self._m = 0

    def _update(self, grads: Tensor) -> None:
        raise self.unsupported(
            "update(grads)",
            "K-FAC needs each layer's inputs and output gradients, not flattened gradient rows: "
            "call fit(model, batches, loss_fn, layout) (the pipeline does)",
        )

    def fit(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        layout: ParamLayout,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Compute the factors on the first ``num_grads`` samples of ``batches`` and invert.

        Raises:
            ConfigError: a selected parameter outside a Linear/Conv2d layer, an unsupported
                loss, or no data.
        """
        self._require_setup("fit")
        if tuple(layout.sizes) != self.sizes:
            raise ValueError(
                f"fit got a layout of sizes {list(layout.sizes)} but setup had {list(self.sizes)}"
            )
        device = next(iter(layout.parameters(model))).device
        data = take_samples(batches, self.config.num_grads, device)
        seed = 2147483647
        if generator is not None:
            seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device))
        factors = kronecker_factors(
            model, layout, data, loss_fn, fisher=self.config.fisher,
            mc_samples=self.config.mc_samples, kfac_approx=self.config.kfac_approx, seed=seed,
        )
        factors = [(g.to(self.device), a.to(self.device)) for g, a in factors]
        for (g, a), name in zip(factors, layout.names, strict=True):
            if not bool(torch.isfinite(g).all() and torch.isfinite(a).all()):
                raise NumericalError(f"kfac factors of {name!r} are not finite; check the model and data")
        self._inverse = KroneckerInverse(factors, self.config.damping, self.dtype,
                                         self.config.damping_split)
        self._m = sum(int(x.shape[0]) for x, _ in data)

    def fit_passes(
        self,
        model: nn.Module,
        batch: tuple[Tensor, Tensor],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        layout: ParamLayout,
    ) -> None:
        """curvlinops' passes over one batch (forward, backward, each layer's covariances),
        the factors dropped: what ``plan`` measures as the fit's per-batch peak."""
        kronecker_factors(model, layout, [batch], loss_fn, fisher=self.config.fisher,
                          mc_samples=self.config.mc_samples, kfac_approx=self.config.kfac_approx)

    def set_factors(self, factors: Sequence[tuple[Tensor, Tensor]], num_samples: int) -> None:
        """Use given factors ``(G_l, A_l)`` per parameter (tests, or factors from elsewhere)."""
        self._require_setup("set_factors")
        sizes = tuple(int(g.shape[0]) * int(a.shape[0]) for g, a in factors)
        if sizes != self.sizes:
            raise ValueError(f"factors of sizes {list(sizes)} do not match setup's {list(self.sizes)}")
        self._inverse = KroneckerInverse(
            [(g.to(self.device), a.to(self.device)) for g, a in factors], self.config.damping,
            self.dtype, self.config.damping_split,
        )
        self._m = int(num_samples)

    # -- queries ------------------------------------------------------------------------------
    def _fitted(self) -> KroneckerInverse:
        if self._inverse is None:
            raise EstimatorStateError(
                "KFACEstimator has no factors: call fit(model, batches, loss_fn, layout) after setup"
            )
        return self._inverse

    def _ihvp(self, v: Tensor) -> Tensor:
        return self._fitted().solve(v)

    def _inverse_diagonal(self) -> Tensor:
        return self._fitted().diagonal()

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        return self._fitted().entries(idx)

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Refuse joint OBS/WoodTaylor updates: a block is a whole layer, so the joint solve
        would be one |P|×|P| system over all weights pruned in a layer."""
        scorer = components.get("scorer")
        if scorer is not None and getattr(scorer.config, "joint", False):
            return (
                "kfac's blocks are whole layers, so a joint update would solve one system over "
                "every weight pruned in a layer; set joint = false (the summed OBS update is one "
                "IHVP) @ scorer.joint"
            )
        return None
