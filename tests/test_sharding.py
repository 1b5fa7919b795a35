"""Estimators sharded over torch.distributed ranks by weights prune exactly like one process.

Each estimator that can be sharded (:attr:`curvprune.CurvatureEstimator.sharding`) is run in
1, 2 and 3 gloo processes, where every rank holds only its columns of the gradients and its
share of the curvature (:mod:`curvprune.pipeline.sharding`), against one process without a
process group: the masks must be identical and the weights equal within float round-off. The
queries themselves (inverse diagonal, IHVP, entries of F⁻¹) are compared with the unsharded
estimator fed the same float64 rows.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvprune
from curvprune import Pipeline, distributed
from curvprune.errors import ConfigError, NumericalError
from curvprune.pipeline.sharding import ShardedEstimator, column_shares, piece_sizes
from curvprune.testing.distributed import run_distributed

#: one worker spawns this module's ranks once (module-scoped fixtures; --dist loadgroup)
pytestmark = pytest.mark.xdist_group("sharding")

N_SAMPLES = 96


def _estimator(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "damping": 1e-3, "dtype": "float64", **extra}


SCENARIOS: dict[str, dict[str, Any]] = {
    "woodfisher-gram": {
        "estimator": _estimator("woodfisher", algorithm="gram", block_size=16, num_grads=40),
        "scorer": {"name": "obs"},
        "schedule": {"name": "oneshot", "steps": 2},
    },
    "woodfisher-woodbury": {
        "estimator": _estimator("woodfisher", algorithm="woodbury", block_size=16, num_grads=20),
        "scorer": {"name": "obs"},
    },
    "mfac-static-unblocked": {
        "estimator": _estimator("mfac", algorithm="static", num_grads=20, fisher_mini_batch=2,
                                block_size=None),
        "scorer": {"name": "obs"},
        "schedule": {"name": "oneshot", "steps": 2},
    },
    "mfac-static-fixed": {
        "estimator": _estimator("mfac", algorithm="static", num_grads=20, fisher_mini_batch=2,
                                block_size=16, blocks="fixed"),
        "scorer": {"name": "obs"},
    },
    "mfac-dynamic-fixed": {
        "estimator": _estimator("mfac", algorithm="dynamic", num_grads=20, window=12,
                                block_size=16, fisher_mini_batch=2),
        "scorer": {"name": "obs"},
    },
    "dense": {"estimator": _estimator("dense", block_size=32, num_grads=40),
              "scorer": {"name": "obs"}},
    "kfac": {"estimator": _estimator("kfac", num_grads=40), "scorer": {"name": "obs"}},
    "diagfisher": {"estimator": _estimator("diagfisher", num_grads=40), "scorer": {"name": "obs"}},
    "woodtaylor": {
        "estimator": _estimator("woodfisher", algorithm="gram", block_size=16, num_grads=40),
        "scorer": {"name": "woodtaylor"},
    },
    # the owners' per-layer selection, a layer cut between two ranks
    "mfac-static-unblocked-layerwise": {
        "estimator": _estimator("mfac", algorithm="static", num_grads=20, fisher_mini_batch=2,
                                block_size=None),
        "scorer": {"name": "obs"},
        "mask": {"name": "layerwise"},
    },
    # joint OBS solves per block over the pruned set: scored on the gathered vectors
    "woodfisher-gram-joint": {
        "estimator": _estimator("woodfisher", algorithm="gram", block_size=16, num_grads=40),
        "scorer": {"name": "obs", "joint": True},
    },
}
#: scored on the gathered vectors, not on the owners (owned.py): joint OBS, WoodTaylor (its
#: prediction couples all weights through ḡᵀF⁻¹ḡ), and diagfisher, which is not sharded (its
#: state, one d-vector, is summed over the ranks)
GATHERED = {"woodfisher-gram-joint", "woodtaylor", "diagfisher"}
#: the mean gradient (woodtaylor's first-order term) sums float32 rows in another order
LOOSE = {"woodtaylor"}
#: on an all-Linear model the ranks exchange each layer's inputs and output gradients and form
#: their own columns (closed form, ``LinearFactors``), not the rows: the same prunes must follow
MLP_SCENARIOS = ("woodfisher-gram", "mfac-static-unblocked", "mfac-static-fixed", "woodtaylor")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
    )


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))


def _data(poison: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (N_SAMPLES,), generator=gen)
    if poison:
        x[35] = float("nan")  # past the audit samples; chunk 4: rank 0 of 2, rank 1 of 3
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _prune_config(scenario: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(scenario)
    cfg["prune"] = {"sparsity": 0.6, "loss_samples": 32, "gradient_chunk": 8}
    cfg.setdefault("schedule", {"name": "oneshot"})
    cfg.setdefault("mask", {"name": "global"})
    return cfg


def _prune(
    scenario: dict[str, Any], data: DataLoader | None = None, make=_model
) -> dict[str, Any]:
    model = make()
    result = Pipeline.from_config(_prune_config(scenario)).prune(model, data or _data())
    return {
        "mask": result.masks.flat.clone(),
        "weights": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
    }


# -- queries of the sharded estimator against the whole one -----------------------------------
SIZES = [36, 4, 300, 10, 50]


def _estimator_of(name: str, **options: Any):
    return curvprune.create("estimator", name, damping=1e-2, dtype="float64", num_grads=24,
                            **options)


QUERY_CASES = {
    "woodfisher": ("woodfisher", {"block_size": 16, "algorithm": "gram"}),
    "mfac-unblocked": ("mfac", {"block_size": None, "fisher_mini_batch": 1}),
    "mfac-fixed": ("mfac", {"block_size": 16, "blocks": "fixed", "fisher_mini_batch": 1}),
    "dense": ("dense", {"block_size": 16}),
}


def _queries(name: str, sharded: bool) -> dict[str, torch.Tensor]:
    kind, options = QUERY_CASES[name]
    estimator = _estimator_of(kind, **options)
    gen = torch.Generator().manual_seed(7)
    d = sum(SIZES)
    rows = torch.randn(24, d, generator=gen, dtype=torch.float64)
    probe = torch.randn(3, d, generator=gen, dtype=torch.float64)
    if sharded:
        estimator = ShardedEstimator(estimator)
    estimator.setup(SIZES)
    if sharded:
        lo, hi = estimator.columns
        estimator.update(rows[:8, lo:hi])
        estimator.update(rows[8:, lo:hi])
    else:
        estimator.update(rows[:8])
        estimator.update(rows[8:])
    blocks = estimator.block_layout
    # groups inside blocks, with padding; for the unblocked estimator also across parameters
    starts = blocks.starts.tolist()
    mid = starts[len(starts) // 2]
    idx = torch.tensor([[starts[0], starts[0] + 3, -1], [mid, mid + 1, mid + 2],
                        [starts[-1], -1, -1]])
    if name == "mfac-unblocked":
        idx = torch.cat([idx, torch.tensor([[1, 200, 390], [-1, 5, 389]])])
    rhs = torch.where(idx >= 0, probe[0, idx.clamp_min(0)], torch.zeros((), dtype=probe.dtype))
    return {
        "diagonal": estimator.inverse_diagonal(),
        "ihvp": estimator.ihvp(probe),
        "columns": estimator.inverse_columns(idx),
        "block_solve": estimator.inverse_block_solve(idx, rhs),
    }


def _selections(columns_of) -> list[torch.Tensor]:
    """The builtin selection over scores split by columns, on seeded problems with ties,
    signed zeros and dead weights; ``columns_of(d)`` is this rank's ``(lo, hi)``."""
    from curvprune.builtin.lowest import AcrossRanks, prune_lowest_in_runs

    gen, cut_gen = torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)
    out = []
    for _ in range(60):
        sizes = torch.randint(1, 40, (int(torch.randint(1, 7, (), generator=gen)),),
                              generator=gen).tolist()
        d = sum(sizes)
        values = torch.randint(-4, 5, (d,), generator=gen).float() * 0.5  # many ties, ±0
        alive = torch.rand(d, generator=gen) < 0.8
        quota = torch.randint(0, 30, (len(sizes),), generator=gen)
        total = None if bool(torch.rand((), generator=gen) < 0.4) else \
            torch.randint(0, d + 3, (), generator=gen)
        if columns_of is None:
            out.append(prune_lowest_in_runs(values, alive, sizes, quota, total))
            continue
        lo, hi = columns_of(d, cut_gen)
        out.append(prune_lowest_in_runs(values[lo:hi], alive[lo:hi], sizes, quota, total,
                                        columns=(lo, hi), ranks=AcrossRanks()))
    return out


def _random_columns(d: int, gen: torch.Generator) -> tuple[int, int]:
    """Every rank draws the same cuts (same seed, same draws); pieces may be empty."""
    size = distributed.world_size()
    cuts = sorted(torch.randint(0, d + 1, (size - 1,), generator=gen).tolist())
    bounds = list(zip([0, *cuts], [*cuts, d], strict=True))
    return bounds[distributed.rank()]


def _nan_scores() -> str:
    """NaN in the last rank's scores: every rank raises, naming the layer."""
    from curvprune.builtin.masks import GlobalMask
    from curvprune.tensors.layout import select_parameters

    layout = select_parameters(_model())
    size, me = distributed.world_size(), distributed.rank()
    bounds = [(layout.d * r // size, layout.d * (r + 1) // size) for r in range(size)]
    lo, hi = bounds[me]
    scores = torch.arange(lo, hi, dtype=torch.float32)
    if me == size - 1:
        scores[-1] = float("nan")
    try:
        GlobalMask().select_columns(scores, torch.ones(layout.d, dtype=torch.bool), 0.5,
                                    layout, (lo, hi))
    except NumericalError as exc:
        return str(exc)
    return "no error"


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    import curvprune.pipeline.steps as steps

    out: dict[str, Any] = {"rank": rank, "world_size": world_size}
    original, calls = steps.prune_on_owners, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    steps.prune_on_owners = counted
    for name, scenario in SCENARIOS.items():
        calls.clear()
        out[name] = _prune(scenario)
        out[name]["owners"] = len(calls)
    steps.prune_on_owners = original
    out["selections"] = _selections(_random_columns)
    out["nan-scores"] = _nan_scores()
    for name in MLP_SCENARIOS:
        out[f"mlp-{name}"] = _prune(SCENARIOS[name], make=_mlp)
    for name in QUERY_CASES:
        out[f"queries-{name}"] = _queries(name, sharded=True)
    out["factor-columns"] = _factor_columns()
    for key, make in (("poisoned", _model), ("poisoned-mlp", _mlp)):
        try:
            _prune(SCENARIOS["woodfisher-gram"], _data(poison=True), make=make)
            out[key] = "no error"
        except NumericalError as exc:
            out[key] = str(exc)
    out["installs"] = _installs_refused(rank)
    return out


def _installs_refused(rank: int) -> str:
    """Rank 1 pretends to run another version of the woodfisher plugin."""
    from curvprune.plugin.manager import PluginHost

    original = PluginHost.installs

    def installs(self: PluginHost) -> dict[str, str]:
        out = original(self)
        if rank == 1:
            out["curvprune-woodfisher"] = "0.0.0-other"
        return out

    PluginHost.installs = installs  # type: ignore[method-assign]
    try:
        _prune(SCENARIOS["woodfisher-gram"])
    except ConfigError as exc:
        return str(exc)
    finally:
        PluginHost.installs = original  # type: ignore[method-assign]
    return "no error"


def _factor_columns() -> dict[str, Any]:
    """This rank's columns of every row, at bounds that cut W's rows and a bias, with a mask
    and mini-batch rows, and the synchronized sums."""
    from curvprune.tensors.gradients import GradientSource
    from curvprune.tensors.layout import select_parameters

    model = _mlp().double()
    layout = select_parameters(model, targets=["Linear"])
    mask = torch.ones(layout.d, dtype=torch.bool)
    mask[::7] = False
    source = GradientSource(model, layout, mask=mask, chunk_size=5, fisher_mini_batch=2)
    d, size = layout.d, distributed.world_size()
    # d = 1536 + 24 + 240 + 10: a cut inside W₁'s first row, one inside W₂'s rows
    cuts = {1: [0, d], 2: [0, 37, d], 3: [0, 37, 1536 + 24 + 100, d]}[size]
    bounds = list(zip(cuts[:-1], cuts[1:], strict=True))
    x, y = (t.double() if t.is_floating_point() else t for t in _data().dataset.tensors)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, N_SAMPLES, 16)]
    if size == 1:
        pieces = list(source.iter_grads(batches, 22))
    else:
        pieces = list(source.iter_grads(batches, 22, columns=bounds))
        source.synchronize()
    return {"rows": torch.cat(pieces), "bounds": bounds, "mean": source.mean(),
            "count": source.rows}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {name: _prune(scenario) for name, scenario in SCENARIOS.items()}
        for name in MLP_SCENARIOS:
            out[f"mlp-{name}"] = _prune(SCENARIOS[name], make=_mlp)
        out["factor-columns"] = _factor_columns()
        for name in QUERY_CASES:
            out[f"queries-{name}"] = _queries(name, sharded=False)
        out["selections"] = _selections(None)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}-ranks")
def ranks(request) -> list[dict[str, Any]]:
    return run_distributed(_worker, (), world_size=request.param, timeout=400)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_prune_equals_one_process(name, ranks, reference):
    ref = reference[name]
    for got in ranks:
        assert torch.equal(got[name]["mask"], ref["mask"]), f"{name}: masks differ"
        # float64 curvature, float32 weights: the updates agree to float32 round-off
        tol = 1e-5 if name in LOOSE else 1e-6
        torch.testing.assert_close(got[name]["weights"], ref["weights"], rtol=tol, atol=tol)
    for got in ranks[1:]:  # every rank ends with the same model, bit for bit
        assert torch.equal(got[name]["weights"], ranks[0][name]["weights"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_columns_local_scorers_score_on_the_owners(name, ranks):
    """OBS with the summed update under the global or layerwise mask scores on each rank's
    own columns (owned.py), every step; joint OBS and WoodTaylor on the gathered vectors."""
    from curvprune.pipeline.sharding import share_layouts

    pipeline = Pipeline.from_config(_prune_config(SCENARIOS[name]))
    shares = share_layouts(pipeline.select(_model()), pipeline.estimator, len(ranks)) \
        if name not in GATHERED else []
    idle = any(share.d == 0 for share in shares)  # kfac at 3 ranks: whole parameters only
    steps = SCENARIOS[name].get("schedule", {}).get("steps", 1)
    for got in ranks:
        assert got[name]["owners"] == (0 if name in GATHERED or idle else steps), name


def test_split_selection_equals_one_process(ranks, reference):
    """The k lowest per layer and overall, with the counts summed over the ranks and ties to
    the lower ranks: each rank's piece is the one-process selection's (random cuts, inside
    layers and empty pieces included; scores with many ties and signed zeros)."""
    for index in range(len(reference["selections"])):
        whole = torch.cat([got["selections"][index] for got in ranks])
        assert torch.equal(whole, reference["selections"][index]), index


def test_nan_scores_on_one_rank_fail_on_every_rank_naming_the_layer(ranks):
    for got in ranks:
        assert got["nan-scores"].startswith("mask 'global': scores are NaN for kept weights "
                                            "(first in '"), got["nan-scores"]
    assert len({got["nan-scores"] for got in ranks}) == 1


@pytest.mark.parametrize("name", MLP_SCENARIOS)
def test_sharded_closed_form_prune_equals_one_process(name, ranks, reference):
    """The same, on an all-Linear model, whose ranks exchange x and g instead of rows."""
    ref = reference[f"mlp-{name}"]
    for got in ranks:
        assert torch.equal(got[f"mlp-{name}"]["mask"], ref["mask"]), f"{name}: masks differ"
        tol = 1e-5 if name in LOOSE else 1e-6
        torch.testing.assert_close(got[f"mlp-{name}"]["weights"], ref["weights"], rtol=tol,
                                   atol=tol)


def test_closed_form_ranks_form_exactly_their_columns(ranks, reference):
    """float64 rows formed from exchanged factors equal one process's rows, column for column
    (cuts inside W's rows and between a weight and its bias), masked; the synchronized mean
    and row count are one process's."""
    ref = reference["factor-columns"]
    for got in ranks:
        lo, hi = got["factor-columns"]["bounds"][got["rank"]]
        torch.testing.assert_close(got["factor-columns"]["rows"], ref["rows"][:, lo:hi],
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["factor-columns"]["mean"], ref["mean"], rtol=1e-12,
                                   atol=1e-14)
        assert got["factor-columns"]["count"] == ref["count"] == 22


@pytest.mark.parametrize("name", list(QUERY_CASES))
def test_sharded_queries_equal_the_whole_estimator(name, ranks, reference):
    """float64 rows, damping 1e-2: condition numbers ≲ 1e4, so 1e-10 relative is ample."""
    ref = reference[f"queries-{name}"]
    for got in ranks:
        for query, value in got[f"queries-{name}"].items():
            torch.testing.assert_close(value, ref[query], rtol=1e-10, atol=1e-10, msg=query)


def test_different_plugin_versions_on_the_ranks_are_refused_at_start(ranks):
    if len(ranks) == 1:
        assert ranks[0]["installs"] == "no error"
        return
    for got in ranks:
        assert got["installs"].startswith(
            "the ranks run different installs: curvprune-woodfisher is 0.0.0-other on rank 1"
        ), got["installs"]


def test_non_finite_gradients_fail_on_every_rank_naming_the_parameter(ranks):
    for got in ranks:
        assert got["poisoned"].startswith("non-finite gradients in '0.weight'"), got["poisoned"]
        # closed form: the NaN sample's columns reach their owners only; the sums meet
        assert got["poisoned-mlp"].startswith("non-finite gradients in '1.weight'"), (
            got["poisoned-mlp"]
        )


# -- shares ------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=12),
    alignment=st.sampled_from([None, 1, 16, 128]),
    parts=st.integers(1, 6),
)
def test_shares_tile_the_weights_and_cut_only_where_allowed(sizes, alignment, parts):
    costs = [float(s) for s in sizes]
    shares = column_shares(sizes, costs, alignment, parts)
    assert len(shares) == parts
    assert shares[0][0] == 0 and shares[-1][1] == sum(sizes)
    assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(shares, shares[1:], strict=False))
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    for lo, _ in shares[1:]:
        if lo in offsets:
            continue
        assert alignment is not None, "a cut inside a parameter without alignment"
        start = max(o for o in offsets if o <= lo)
        assert (lo - start) % alignment == 0
    # balance: no share exceeds its fair part by more than one indivisible unit on each side
    unit = max(sizes) if alignment is None else alignment
    for lo, hi in shares:
        assert hi - lo <= sum(sizes) / parts + 2 * unit


def test_pieces_split_parameters_at_the_share_bounds():
    assert piece_sizes([10, 20, 30], 5, 45) == ([5, 20, 15], [0, 1, 2])
    assert piece_sizes([10, 20, 30], 10, 30) == ([20], [1])
    assert piece_sizes([10, 20, 30], 7, 7) == ([], [])


def test_an_unshardable_estimator_is_refused_by_the_wrapper():
    with pytest.raises(Exception, match="cannot be sharded"):
        ShardedEstimator(_estimator_of("mfac", block_size=128))  # alive blocks cross parameters


def test_one_process_without_a_group_is_not_sharded():
    assert not distributed.is_distributed()
    from curvprune.pipeline.sharding import maybe_shard

    estimator = _estimator_of("woodfisher", block_size=16)
    assert maybe_shard(estimator, "auto") is estimator


def test_plan_counts_the_largest_share_per_rank():
    """At N ranks a sharded estimator's planned state is its largest share's, plus the exchange;
    with ``shard = "off"`` every rank plans the whole state."""
    from curvprune.pipeline.sharding import share_layouts

    model = _model()
    config = _prune_config(SCENARIOS["woodfisher-gram"])
    whole = Pipeline.from_config(config).plan(model, world_size=1)
    for world in (2, 3):
        pipeline = Pipeline.from_config(config)
        plan = pipeline.plan(model, world_size=world)
        shares = share_layouts(pipeline.select(model), pipeline.estimator, world)
        largest = max(type(pipeline.estimator).memory_bytes(s.sizes, pipeline.estimator.config)
                      for s in shares)
        assert plan.memory["estimator"] == largest < whole.memory["estimator"]
        assert plan.memory["exchange"] > 0
    config["prune"]["shard"] = "off"
    off = Pipeline.from_config(config).plan(model, world_size=2)
    assert off.memory["estimator"] == whole.memory["estimator"] and "exchange" not in off.memory


def test_more_ranks_than_places_to_cut_leave_ranks_idle():
    """K-FAC cuts only between parameters: the test model's two weights over three ranks leave
    one rank without a share; it idles through the collectives (the 3-rank runs above prune
    like one process), it never hangs."""
    from curvprune.pipeline.sharding import estimator_shares

    estimator = _estimator_of("kfac")
    shares = estimator_shares(estimator, [36, 2560], 3)
    assert sorted(hi - lo for lo, hi in shares) == [0, 36, 2560]
