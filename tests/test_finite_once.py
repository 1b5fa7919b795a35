"""Issue 19: one finiteness check per gradient chunk, in one place.

Chunks from a :class:`curvprune.GradientSource` are covered by the source's own running-sum
check (:meth:`~curvprune.GradientSource.covering`), so the ``mfac`` and ``woodfisher`` estimators
do not scan them again; tensors fed to ``update`` by hand are still refused when fed. NaN or Inf
through the pipeline still ends with the one-line error naming the parameter, model untouched.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvprune
from curvprune import GradientSource, NumericalError, Pipeline, create, select_parameters

ESTIMATORS = [
    ("mfac", {"fisher_mini_batch": 1, "algorithm": "static", "num_grads": 32}),
    ("mfac", {"fisher_mini_batch": 1, "algorithm": "dynamic", "window": 8, "num_grads": 32}),
    ("mfac", {"fisher_mini_batch": 1, "algorithm": "static", "num_grads": 32, "block_size": 16,
              "blocks": "fixed"}),
    ("woodfisher", {"algorithm": "gram", "num_grads": 32, "block_size": 16}),
    ("woodfisher", {"algorithm": "woodbury", "num_grads": 32, "block_size": 16}),
]
IDS = ["mfac-static", "mfac-dynamic", "mfac-fixed", "woodfisher-gram", "woodfisher-woodbury"]


def model_and_data(nan: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    if nan:
        x[5, 2] = float("nan")
    return model, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]


def make(name: str, cfg: dict, d_sizes):
    est = create("estimator", name, dtype="float64", damping=1e-2, **cfg)
    est.setup(d_sizes)
    return est


@pytest.fixture
def isfinite_calls(monkeypatch):
    """Shapes of every torch.isfinite / torch.aminmax argument while the fixture is active."""
    shapes: list[tuple[int, ...]] = []
    isfinite, aminmax = torch.isfinite, torch.aminmax

    def counting_isfinite(t, *a, **k):
        shapes.append(tuple(t.shape))
        return isfinite(t, *a, **k)

    def counting_aminmax(t, *a, **k):
        shapes.append(tuple(t.shape))
        return aminmax(t, *a, **k)

    monkeypatch.setattr(torch, "isfinite", counting_isfinite)
    monkeypatch.setattr(torch, "aminmax", counting_aminmax)
    return shapes


def test_source_chunks_are_covered_and_nothing_else_is():
    model, data = model_and_data()
    source = GradientSource(model, select_parameters(model), chunk_size=8)
    chunks = list(source.iter_grads(data, 16))
    assert all(GradientSource.covering(c) is source for c in chunks)
    for other in (chunks[0][:4], chunks[0].clone(), chunks[0].float(), torch.zeros(2, 3)):
        assert GradientSource.covering(other) is None


@pytest.mark.parametrize(("name", "cfg"), ESTIMATORS, ids=IDS)
def test_source_chunks_are_not_scanned_again(name, cfg, isfinite_calls):
    model, data = model_and_data()
    layout = select_parameters(model)
    source = GradientSource(model, layout, chunk_size=8)
    est = make(name, cfg, layout.sizes)
    for chunk in source.iter_grads(data, 32):
        est.update(chunk)
    assert not [s for s in isfinite_calls if len(s) == 2 and s[0] == 8], isfinite_calls
    # the same rows fed by hand are scanned, one pass per chunk
    isfinite_calls.clear()
    again = make(name, cfg, layout.sizes)
    for chunk in source.iter_grads(data, 32):
        again.update(chunk.clone())
    assert [s for s in isfinite_calls if s == (8, layout.d)], isfinite_calls
    diag = est.inverse_diagonal()
    assert torch.equal(diag, again.inverse_diagonal())


@pytest.mark.parametrize(("name", "cfg"), ESTIMATORS, ids=IDS)
def test_non_finite_source_chunks_refuse_every_query(name, cfg):
    """Fed straight from a source without calling check_finite: the first query raises the
    source's error naming the parameter, and so does the next one."""
    model, data = model_and_data(nan=True)
    layout = select_parameters(model)
    source = GradientSource(model, layout, chunk_size=8)
    est = make(name, cfg, layout.sizes)
    with pytest.raises(NumericalError, match=r"non-finite gradients in '0\.weight'"):
        for chunk in source.iter_grads(data, 32):
            est.update(chunk)  # woodbury: the PD check asks the source first
        est.inverse_diagonal()
    for query in (est.inverse_diagonal, lambda: est.ihvp(torch.ones(layout.d))):
        with pytest.raises(NumericalError, match=r"non-finite gradients in '0\.weight'"):
            query()


@pytest.mark.parametrize(("name", "cfg"), ESTIMATORS, ids=IDS)
def test_hand_fed_non_finite_rows_are_refused_when_fed(name, cfg):
    est = make(name, cfg, [20, 5])
    good = torch.randn(4, 25, dtype=torch.float64)
    est.update(good)
    bad = good.clone()
    bad[2, 21] = float("inf")
    with pytest.raises(NumericalError, match=r"rows \[2\]|parameter 1 .*row 2"):
        est.update(bad)
    assert est.num_samples == 4


@pytest.mark.parametrize(("name", "cfg"), ESTIMATORS, ids=IDS)
def test_pipeline_nan_names_the_parameter_and_leaves_the_model(name, cfg):
    model, data = model_and_data(nan=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0, "gradient_chunk": 8},
        "estimator": {"name": name, "dtype": "float64", "damping": 1e-2, **cfg},
        "scorer": {"name": "obs"},
    })
    with pytest.raises(NumericalError, match=r"non-finite gradients in '0\.weight'") as info:
        pipe.prune(model, data)
    assert "\n" not in str(info.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert curvprune.GradientSource is GradientSource
