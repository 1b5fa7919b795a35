"""The ``sparsegpt`` estimator split over torch.distributed ranks prunes like one process.

Under torch.distributed every layer of a fit has one owner rank: the ranks accumulate Σxxᵀ on
their slices of the calibration samples, each layer's sum is reduced to its owner alone, the
owner sweeps the layer, and one all-gather hands every layer's result to every rank. Each
scenario below runs in 1, 2 and 3 gloo processes (``curvprune.testing.distributed``) and is
compared with one process without a process group.

Tolerance. Model, inputs and Hessians are float64 here, so the ranks differ from one process
only in the order of the sums (each rank's slice, then the reduce) and in the GEMM blocking of
a batch slice against the whole batch: O(n·ε₆₄) relative in H, n ≤ 48 samples. The sweep
amplifies a relative perturbation of H̃ by at most its condition number, and the 1 % relative
damping bounds κ(H̃) ≤ 1 + 100·d ≤ 3·10⁴ for d ≤ 256, so one stage's weights move by ≲ 10⁻⁹
of their scale; a later stage sees inputs moved by that much. The weights are asserted within
float32 round-off (``rtol = 2⁻²²``, two float32 units in the last place, ``atol = 10⁻⁹``),
orders of magnitude above that and far below any change of mask; masks must be identical
(measured: at most 1.6·10⁻¹⁵ apart, and one rank in a group is bit for bit one process).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvprune import NumericalError, Pipeline, distributed, select_parameters
from curvprune.testing.distributed import run_distributed
from curvprune_sparsegpt import HessianError
from curvprune_sparsegpt.estimator import SparseGPTConfig, SparseGPTEstimator
from curvprune_sparsegpt.owners import balanced_owners, sweep_costs

#: one worker spawns this module's ranks once (module-scoped fixtures; --dist loadgroup)
pytestmark = pytest.mark.xdist_group("sparsegpt-ranks")

F64 = torch.float64
RTOL, ATOL = 2.0**-22, 1e-9


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 24),
        nn.ReLU(), nn.Linear(24, 10),
    ).double()


def _mlp_data(poison: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 16, generator=g, dtype=F64)
    y = torch.randint(0, 10, (48,), generator=g)
    if poison:
        x[20, 3] = float("nan")  # in the second batch
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def _gpt2_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, 100, (24, 16), generator=torch.Generator().manual_seed(1))
    return [(ids[i : i + 8], ids[i : i + 8]) for i in range(0, 24, 8)]


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return getattr(out, "logits", out).square().mean()


#: name: (model, data, estimator algorithm, calibration); "auto" is sequential for sparsegpt
SCENARIOS = {
    "mlp-sparsegpt": (_mlp, _mlp_data, "sparsegpt", "auto"),
    "mlp-sparsegpt-dense": (_mlp, _mlp_data, "sparsegpt", "dense"),
    "mlp-exact": (_mlp, _mlp_data, "exact", "auto"),
    "gpt2-sparsegpt": (_gpt2, _gpt2_data, "sparsegpt", "auto"),
    "gpt2-exact": (_gpt2, _gpt2_data, "exact", "auto"),
}


def _pipeline(algorithm: str, calibration: str, samples: int) -> Pipeline:
    return Pipeline.from_config({
        "estimator": {"name": "sparsegpt", "dtype": "float64", "num_grads": samples,
                      "algorithm": algorithm},
        "scorer": {"name": "obs"},
        "schedule": {"name": "oneshot", "calibration": calibration},
        "mask": {"name": "layerwise"},
        "prune": {"sparsity": 0.5, "loss_samples": 0},
    })


def _prune(name: str) -> dict[str, Any]:
    make, data, algorithm, calibration = SCENARIOS[name]
    model = make()
    batches = data()
    samples = sum(x.shape[0] for x, _ in batches)
    pipeline = _pipeline(algorithm, calibration, samples)
    result = pipeline.prune(model, batches, loss_fn=_loss)
    step = result.steps[-1]
    return {
        "mask": result.masks.flat.clone(),
        "weights": select_parameters(model).gather(model),
        "num_grads": step.num_grads,
        "layer_losses": dict(pipeline.estimator.layer_losses),
        "ranks": step.ranks or [],
        "own_sweeps": pipeline.estimator.inner_seconds,
    }


def _queries() -> dict[str, Any]:
    """The estimator fitted directly on this rank's slices of the data (dense: all layers in
    one fit), then its queries and what it keeps."""
    model = _mlp()
    layout = select_parameters(model)
    estimator = SparseGPTEstimator(SparseGPTConfig(dtype="float64", num_grads=48))
    estimator.setup(layout.sizes)
    estimator.fit(model, distributed.shard(_mlp_data()), _loss, layout)
    probe = torch.randn(3, layout.d, generator=torch.Generator().manual_seed(5), dtype=F64)
    return {
        "diagonal": estimator.inverse_diagonal(),
        "ihvp": estimator.ihvp(probe),
        "num_samples": estimator.num_samples,
        "held": [acc is not None for acc in estimator._hessians],
        "owners": SparseGPTEstimator.layer_owners(layout, estimator.config,
                                                  distributed.world_size()),
    }


def _reduce() -> dict[str, Any]:
    """reduce_sum_to_ in a group: the destination gets the sum; a bad rank is refused."""
    me, world = distributed.rank(), distributed.world_size()
    dst = world - 1
    got = distributed.reduce_sum_to_(torch.full((3,), float(me + 1), dtype=F64), dst)
    try:
        distributed.reduce_sum_to_(torch.zeros(2), world)
        refused = "no error"
    except ValueError as exc:
        refused = str(exc)
    return {"sum": got if me == dst else None, "refused": refused}


def _failure() -> str:
    """A NaN in one rank's calibration slice: the owner's factorization fails, every rank
    raises (never waits in the gather)."""
    try:
        _pipeline("sparsegpt", "auto", 48).prune(_mlp(), _mlp_data(poison=True), loss_fn=_loss)
    except (HessianError, NumericalError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _worker(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {name: _prune(name) for name in names}
    out["queries"] = _queries()
    out["reduce"] = _reduce()
    out["failure"] = _failure()  # last: the others must not depend on it
    return out


def _names() -> list[str]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [n for n in SCENARIOS if not n.startswith("gpt2")]
    return list(SCENARIOS)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {name: _prune(name) for name in _names()}
        out["queries"] = _queries()
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}-ranks")
def ranks(request) -> list[dict[str, Any]]:
    return run_distributed(_worker, (_names(),), world_size=request.param, timeout=300)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_split_sweeps_prune_like_one_process(name, ranks, reference):
    if name not in reference:
        pytest.skip("needs transformers")
    ref = reference[name]
    for got in ranks:
        assert torch.equal(got[name]["mask"], ref["mask"])
        if len(ranks) == 1:  # one rank in a group runs the very arithmetic of one process
            assert torch.equal(got[name]["weights"], ref["weights"])
        torch.testing.assert_close(got[name]["weights"], ref["weights"], rtol=RTOL, atol=ATOL)
        assert got[name]["num_grads"] == ref["num_grads"]  # every rank counts all samples
        assert got[name]["layer_losses"].keys() == ref["layer_losses"].keys()
        for layer, loss in ref["layer_losses"].items():
            assert got[name]["layer_losses"][layer] == pytest.approx(loss, rel=1e-9)


def test_every_rank_reports_its_own_sweep_time(ranks):
    """Each rank times the sweeps of the layers it owns, and the staged step's per-rank report
    counts them (``curvature``: its fits and its own sweeps). The MLP's sequential stages hold
    one layer each, owned by rank 0: the other ranks sweep nothing."""
    for me, got in enumerate(ranks):
        single = got["mlp-sparsegpt"]
        assert (single["own_sweeps"] > 0) == (me == 0)
        for name in ("mlp-sparsegpt", "mlp-sparsegpt-dense", "gpt2-sparsegpt"):
            if name not in got:
                continue
            reports = got[name]["ranks"]
            assert [r["rank"] for r in reports] == list(range(len(ranks)))
            assert reports[me]["curvature"] >= got[name]["own_sweeps"]
            assert all(r["gradients"] >= 0 and r["scoring"] >= 0 for r in reports)
    if len(ranks) == 2 and "gpt2-sparsegpt" in ranks[0]:
        # rank 0 owns each block's mlp.c_proj, rank 1 the three others: both sweep
        assert all(got["gpt2-sparsegpt"]["own_sweeps"] > 0 for got in ranks)


def test_queries_gather_every_owners_layers(ranks, reference):
    ref = reference["queries"]
    world = len(ranks)
    for me, got in enumerate(ranks):
        q = got["queries"]
        torch.testing.assert_close(q["diagonal"], ref["diagonal"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(q["ihvp"], ref["ihvp"], rtol=1e-10, atol=1e-12)
        assert q["num_samples"] == ref["num_samples"] == 48
        assert q["owners"] == ranks[0]["queries"]["owners"]  # the same on every rank
        # each rank keeps the Hessians of its own layers only
        assert q["held"] == [owner == me for owner in q["owners"]]
    owned = {o for got in ranks for o in got["queries"]["owners"]}
    assert owned == set(range(min(world, 4)))  # 4 layers: every rank owns one up to 3 ranks


def test_reduce_sum_to_sums_on_the_destination_only(ranks):
    world = len(ranks)
    expected = torch.full((3,), world * (world + 1) / 2, dtype=F64)
    for me, got in enumerate(ranks):
        if me == world - 1:
            assert torch.equal(got["reduce"]["sum"], expected)
        else:
            assert got["reduce"]["sum"] is None
        assert got["reduce"]["refused"] == f"reduce_sum_to_: dst {world} is not a rank of {world}"


def test_a_failing_owner_makes_every_rank_raise(ranks):
    """The poisoned sample reaches the first layer's Hessian on its owner (rank 0: one layer
    per stage); ranks owning nothing raise that another rank failed, nobody hangs."""
    messages = [got["failure"] for got in ranks]
    assert messages[0].startswith("HessianError: the layer Hessian has non-finite entries")
    for message in messages[1:]:
        assert message.startswith("NumericalError: another rank failed on the layers it owns")


def test_reduce_sum_to_outside_a_group_is_the_identity():
    assert not distributed.is_distributed()
    tensor = torch.arange(4.0)
    assert distributed.reduce_sum_to_(tensor, 0) is tensor
    assert torch.equal(tensor, torch.arange(4.0))
    assert distributed.reduce_sum_to_(tensor, 3) is tensor  # no ranks to check alone


# -- the assignment -----------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.floats(min_value=0, max_value=1e12, allow_nan=False), max_size=40),
    parts=st.integers(min_value=1, max_value=9),
)
def test_assignment_owns_each_layer_once_and_is_balanced(costs, parts):
    owners = balanced_owners(costs, parts)
    assert len(owners) == len(costs) and all(0 <= o < parts for o in owners)
    assert balanced_owners(list(costs), parts) == owners  # deterministic
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(parts)]
    largest = max(costs, default=0.0)
    assert max(loads) <= min(loads) + largest + 1e-9 * max(loads, default=0.0)


def test_assignment_ties_and_idle_ranks():
    assert balanced_owners([1.0, 1.0, 1.0], 2) == [0, 1, 0]  # ties: lower index, lower rank
    assert balanced_owners([5.0, 1.0], 4) == [0, 1]  # ranks 2 and 3 idle
    assert balanced_owners([], 3) == []
    # the largest first: one big layer alone, the small ones together
    assert balanced_owners([1.0, 10.0, 2.0, 3.0], 2) == [1, 0, 1, 1]


def test_assignment_refuses_bad_input():
    with pytest.raises(ValueError, match="parts must be at least 1, got 0"):
        balanced_owners([1.0], 0)
    with pytest.raises(ValueError, match="finite and non-negative, got -1.0"):
        balanced_owners([1.0, -1.0], 2)
    with pytest.raises(ValueError, match="finite and non-negative, got nan"):
        balanced_owners([float("nan")], 2)
    with pytest.raises(ValueError, match="algorithm must be"):
        sweep_costs([(2, 2)], "obs")


def test_costs_follow_the_sweeps_flops():
    # SparseGPT: rows·d² + d³; OBC-exact: rows·d³
    assert sweep_costs([(2304, 768), (768, 3072)], "sparsegpt") == [
        2304 * 768**2 + 768**3, 768 * 3072**2 + 3072**3]
    assert sweep_costs([(4, 8)], "exact") == [4 * 8**3]


def test_plan_counts_the_largest_owners_share():
    """At W ranks a GPT-2 block's four layers are split: the plan's estimator part is the
    busiest rank's (its layers' H, factors, transient and sweep), not the stage's, and at
    least the stage's Hessians every rank holds while they accumulate; the gathered results
    are counted, and each rank's slice of the cached block inputs."""
    model = _gpt2()
    pipeline = _pipeline("sparsegpt", "auto", 24)
    example = _gpt2_data()[0]
    one = pipeline.plan(model, world_size=1, example=example)
    layout = select_parameters(model).subset(range(4))  # the first block
    cfg = pipeline.estimator.config
    for world in (2, 3):
        plan = pipeline.plan(model, world_size=world, example=example)
        owners = SparseGPTEstimator.layer_owners(layout, cfg, world)
        shares = [SparseGPTEstimator.plan_memory_bytes(
            layout.subset([i for i, o in enumerate(owners) if o == r]), cfg)
            for r in range(world) if r in owners]
        held = SparseGPTEstimator.plan_held_bytes(layout, cfg)
        assert plan.memory["estimator"] == max(max(shares), held) < one.memory["estimator"]
        assert plan.estimator_held == held
        assert plan.memory["results"] > 0 and "results" not in one.memory
        # each rank caches the block inputs of its slice of the 24 samples
        assert plan.memory["calibration"] * world == one.memory["calibration"] > 0
