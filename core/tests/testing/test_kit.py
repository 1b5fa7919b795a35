"""The plugin authors' testing kit: strategies, dense helpers, fixtures, the contracts' teeth."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import curvprune
from curvprune import MaskApplier, Scheduler, hookimpl
from curvprune.testing import dense, strategies
from curvprune.testing.contracts import (
    CurvatureEstimatorContract,
    MaskApplierContract,
    SaliencyScorerContract,
    SchedulerContract,
)
from curvprune.testing.dense import DenseEstimator

# ------------------------------------------------------------------------------------------------
# Strategies draw what they promise
# ------------------------------------------------------------------------------------------------


@given(strategies.fisher_problems())
def test_fisher_problems_are_valid(problem):
    sizes, block_size, damping, grads = problem
    assert 1 <= len(sizes) <= 4 and all(1 <= s <= 12 for s in sizes)
    assert block_size is None or 1 <= block_size <= 8
    assert 1e-3 <= damping <= 1e2
    assert grads.dtype == torch.float64 and grads.shape == (problem.m, problem.d)
    assert 1 <= problem.m <= 8
    assert bool(torch.isfinite(grads).all()) and float(grads.abs().max()) <= 10


@given(st.integers(1, 6), st.floats(1, 1e4), st.data())
def test_well_conditioned_spd_is_bounded_by_construction(n, max_cond, data):
    matrix = data.draw(strategies.well_conditioned_spd(n, max_cond))
    assert torch.equal(matrix, matrix.mT)
    eig = torch.linalg.eigvalsh(matrix)
    # Q from Householder QR is orthogonal to ~n·eps, so the spectrum is s up to ~n·eps·max_cond.
    slack = 64 * n * torch.finfo(torch.float64).eps * max_cond
    assert float(eig[0]) >= 1 - slack and float(eig[-1]) <= max_cond + slack


@given(st.data())
def test_gradients_of_width_32_are_float32_values(data):
    grads = data.draw(strategies.gradients(3, 4, bound=1.0, width=32))
    assert torch.equal(grads.float().double(), grads)


# ------------------------------------------------------------------------------------------------
# Dense helpers against numpy, written the obvious way
# ------------------------------------------------------------------------------------------------


def test_damped_fisher_matches_a_blockwise_numpy_construction():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((4, 5))
    # sizes (3, 2) with B = 2: blocks {0, 1}, {2}, {3, 4}.
    expected = 0.1 * np.eye(5)
    for block in ([0, 1], [2], [3, 4]):
        expected[np.ix_(block, block)] += g[:, block].T @ g[:, block] / 4
    got = dense.damped_fisher(torch.from_numpy(g), [3, 2], 2, 0.1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-14, atol=1e-15)
    one_block = dense.damped_fisher(torch.from_numpy(g), [3, 2], None, 0.1)
    np.testing.assert_allclose(one_block.numpy(), 0.1 * np.eye(5) + g.T @ g / 4, rtol=1e-14)


def test_block_mask_never_crosses_a_parameter():
    mask = dense.block_mask([3, 2], 4)
    assert mask[:3, :3].all() and mask[3:, 3:].all()
    assert not mask[:3, 3:].any() and not mask[3:, :3].any()


def test_dense_inverse_and_loss_change_match_numpy():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((3, 4))
    fisher = 0.5 * np.eye(4) + g.T @ g / 3
    inverse = dense.dense_inverse(torch.from_numpy(g), [4], None, 0.5)
    # cond(F) is ~10 here: float64 agreement to 1e-12 leaves a 1e2 margin over eps·cond.
    np.testing.assert_allclose(inverse.numpy(), np.linalg.inv(fisher), rtol=1e-12, atol=1e-13)
    delta = rng.standard_normal(4)
    got = dense.quadratic_loss_change(torch.from_numpy(fisher), torch.from_numpy(delta))
    assert float(got) == pytest.approx(0.5 * delta @ fisher @ delta, rel=1e-14)
    assert dense.condition_number(torch.from_numpy(fisher)) == pytest.approx(
        np.linalg.cond(fisher), rel=1e-10
    )


def test_allclose_report_explains_the_worst_element():
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert dense.allclose_report(expected * (1 + 1e-9), expected, rtol=1e-8, what="x") is None
    actual = expected.clone()
    actual[1, 0] = 3.5
    report = dense.allclose_report(actual, expected, rtol=1e-6, what="ihvp")
    assert report is not None
    assert "ihvp: 1/4 elements" in report and "(1, 0)" in report and "got 3.5" in report
    assert "expected 3" in report and "rtol=1e-06" in report
    assert "shape (3,)" in dense.allclose_report(torch.zeros(3), torch.zeros(2), rtol=1)
    assert "non-finite" in dense.allclose_report(torch.tensor([float("nan")]), torch.zeros(1),
                                                 rtol=1)
    with pytest.raises(AssertionError, match="ihvp: 1/4"):
        dense.assert_allclose(actual, expected, rtol=1e-6, what="ihvp")


@pytest.mark.parametrize("magnitude", [1e-168, 1.0, 1e150])
def test_product_check_scales_by_the_norm_of_v_at_any_magnitude(magnitude):
    # F⁻¹v errors are bounded relative to ‖F⁻¹‖·‖v‖; at v ~ 1e-168 the squares underflow, and a
    # norm flushed to zero made the check elementwise (a false M-FAC failure hypothesis found).
    reference = torch.diag(torch.tensor([1.0, 0.01], dtype=torch.float64))
    v = torch.full((1, 2), magnitude, dtype=torch.float64)
    expected = v @ reference
    inside = expected + torch.tensor([[0.0, 0.5e-8 * magnitude]], dtype=torch.float64)
    check = CurvatureEstimatorContract._check_products
    check(inside, expected, v, reference, 1e-8, "ihvp")  # 0.5e-8·‖v‖·‖F⁻¹‖/(√2) < 1e-8: passes
    outside = expected + torch.tensor([[0.0, 5e-8 * magnitude]], dtype=torch.float64)
    with pytest.raises(AssertionError, match="ihvp"):
        check(outside, expected, v, reference, 1e-8, "ihvp")


# ------------------------------------------------------------------------------------------------
# Fixtures of the kit (the plugin manager's own tests are in core/tests/plugin)
# ------------------------------------------------------------------------------------------------


def test_fake_dist_with_an_importable_target(fake_dist):
    name = fake_dist("curvprune-kitref", "kitref", None, module="curvprune.builtin.scorers")
    assert name == "curvprune-kitref"
    with pytest.raises(ValueError, match="module="):
        fake_dist("curvprune-kitnone", "kitnone", None)


def test_hook_recorder_records_hook_calls(plugin_host, hook_recorder):
    assert plugin_host.registry.names("estimator")  # builds the registry through the hooks
    assert "curvprune_register_curvature_estimators" in hook_recorder.names()
    hook_recorder.clear()
    model = torch.nn.Linear(2, 2)
    plugin_host.pipeline_start(pipeline=None, model=model)
    assert hook_recorder.calls == [
        ("curvprune_pipeline_start", {"pipeline": None, "model": model})
    ]
    assert hook_recorder.kwargs_of("curvprune_pipeline_start")[0]["model"] is model
    hook_recorder.detach()
    plugin_host.pipeline_start(pipeline=None, model=model)
    assert len(hook_recorder.calls) == 1


# ------------------------------------------------------------------------------------------------
# The contracts on builtin and reference components
# ------------------------------------------------------------------------------------------------


class TestMagnitudeScorerContract(SaliencyScorerContract):
    name = "magnitude"


class TestChannelMagnitudeScorerContract(SaliencyScorerContract):
    name = "magnitude"
    options = {"granularity": "channel", "norm": "l1"}


class TestOBSScorerContract(SaliencyScorerContract):
    name = "obs"


class TestJointOBSScorerContract(SaliencyScorerContract):
    name = "obs"
    options = {"joint": True}
    estimator_options = {"damping": 1e-2, "dtype": "float64", "block_size": 8}


class _GlobalKeep(MaskApplier):
    """Reference applier: remove the lowest scores globally, ties by index (stable sort)."""

    def select(self, scores, mask, sparsity, layout):
        count = max(round(sparsity * mask.numel()), int((~mask).sum()))
        order = torch.where(mask, scores.double(), -torch.inf).argsort(stable=True)
        new = torch.ones_like(mask)
        new[order[:count]] = False
        return new


class _Cubic(Scheduler):
    """Reference schedule: cubic ramp, pruning every 8 steps up to step 32."""

    def __init__(self, config=None):
        super().__init__(config)
        self.events = 0

    def levels(self, target, current=0.0):
        return [current + (target - current) * f for f in (0.5, 0.75)] + [target]

    def level_at(self, step, target):
        if step % 8 or step > 32:
            return None
        self.events += 1
        return target * (1 - (1 - step / 32) ** 3)

    def finished(self, step):
        return step >= 32

    def state_dict(self):
        return {"events": torch.tensor(self.events)}

    def load_state_dict(self, state):
        self.events = int(state["events"])


class _BrokenDense(DenseEstimator):
    """Forgets the 1/m of the Fisher: F = λI + Σggᵀ."""

    def _update(self, grads):
        super()._update(grads)
        self._m = 1
        self.__dict__["_count"] = self.__dict__.get("_count", 0) + grads.shape[0]

    @property
    def num_samples(self):
        return self.__dict__.get("_count", 0)


class _Reviving(_GlobalKeep):
    def select(self, scores, mask, sparsity, layout):
        return super().select(scores, torch.ones_like(mask), sparsity, layout)


class _Overshooting(_Cubic):
    def levels(self, target, current=0.0):
        return [target, target + 0.01]


class _KitComponents:
    """An in-process plugin (a namespace with hook implementations)."""

    @staticmethod
    @hookimpl
    def curvprune_register_mask_appliers(register):
        register("kit-global", _GlobalKeep)
        register("kit-reviving", _Reviving)

    @staticmethod
    @hookimpl
    def curvprune_register_schedulers(register):
        register("kit-cubic", _Cubic)
        register("kit-overshooting", _Overshooting)

    @staticmethod
    @hookimpl
    def curvprune_register_curvature_estimators(register):
        register("kit-broken", _BrokenDense, config=curvprune.EstimatorConfig)


_IN_PROCESS = [("kit-components", _KitComponents)]


class TestReferenceMaskApplierContract(MaskApplierContract):
    name = "kit-global"
    plugins = _IN_PROCESS


class TestReferenceSchedulerContract(SchedulerContract):
    name = "kit-cubic"
    plugins = _IN_PROCESS


class _BrokenEstimatorSuite(CurvatureEstimatorContract):
    name = "kit-broken"
    plugins = _IN_PROCESS


class _RevivingSuite(MaskApplierContract):
    name = "kit-reviving"
    plugins = _IN_PROCESS


class _OvershootingSuite(SchedulerContract):
    name = "kit-overshooting"
    plugins = _IN_PROCESS


@pytest.mark.parametrize(
    ("suite", "test", "message"),
    [
        (_BrokenEstimatorSuite, "test_ihvp_matches_reference_solve", "ihvp"),
        (_BrokenEstimatorSuite, "test_inverse_diagonal_matches_reference", "inverse_diagonal"),
        (_RevivingSuite, "test_subset_and_exact_sparsity", "revived"),
        (_OvershootingSuite, "test_levels_end_at_target_and_never_decrease", "do not end"),
    ],
)
def test_contracts_catch_broken_components(suite, test, message):
    with pytest.raises(AssertionError, match=message):
        getattr(suite(), test)()
