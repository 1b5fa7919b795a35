"""``plan`` against reality: its estimator numbers are the estimators' ``memory_bytes``, and
those match the tensors the estimators hold and (where the plan is right) the peak they allocate.

Measured with :mod:`curvprune.pipeline.memprobe` (torch profiler allocation events on CPU). Sizes are
small but chosen so that each estimator's state (≥ 0.5 MiB) dominates the O(d) vectors that
``memory_bytes`` leaves out by design; benchmarks/plan_accuracy.py gives the figures at
ResNet-20 size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvprune
from curvprune import Pipeline, select_parameters
from curvprune.pipeline.memprobe import peak_allocated, tensor_bytes

SIZES = (1024, 2048, 1024)  # d = 4096
M = 64
CASES = {
    "woodfisher-gram": ("woodfisher", {"block_size": 64, "num_grads": M, "algorithm": "gram"}),
    "woodfisher-woodbury": ("woodfisher", {"block_size": 64, "num_grads": 8, "algorithm": "woodbury"}),
    "mfac-static": ("mfac", {"num_grads": M, "algorithm": "static", "fisher_mini_batch": 1,
                            "block_size": None}),
    "mfac-dynamic": ("mfac", {"num_grads": M, "algorithm": "dynamic", "window": 32,
                             "fisher_mini_batch": 1, "block_size": None}),
    "diagfisher": ("diagfisher", {"num_grads": M}),
    "dense": ("dense", {"block_size": 64, "num_grads": M}),
}


def life_cycle(name, cfg):
    est = curvprune.create("estimator", name, **cfg)
    g = torch.Generator().manual_seed(0)
    d = sum(SIZES)
    chunks = [1e-3 * torch.randn(8, d, generator=g) for _ in range(est.num_grads // 8)]
    probe = torch.randn(d, generator=g)

    def run():
        est.setup(SIZES)
        for chunk in chunks:
            est.update(chunk)
        est.inverse_diagonal()
        est.ihvp(probe)

    _, peak = peak_allocated(run)
    return est, peak


class Model(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("case", list(CASES))
def test_plan_reports_the_estimators_memory_bytes(case):
    name, cfg = CASES[case]
    pipeline = Pipeline.from_config({"estimator": {"name": name, **cfg}, "scorer": {"name": "obs"}})
    model = Model()
    plan = pipeline.plan(model)
    layout = select_parameters(model, ("Conv2d", "Linear"), ())
    assert plan.memory["estimator"] == type(pipeline.estimator).memory_bytes(layout.sizes,
                                                                              pipeline.estimator.config)


@pytest.mark.parametrize("case", list(CASES))
def test_held_state_matches_memory_bytes_within_20_percent(case):
    name, cfg = CASES[case]
    est, _ = life_cycle(name, cfg)
    planned = type(est).memory_bytes(SIZES, est.config)
    held = tensor_bytes(est)
    if case == "woodfisher-gram":
        # memory_bytes plans the inversion (the batch and, at this size, a second batch of
        # work); afterwards only the inverse is held, in place of the Gram batch
        planned //= 2
    if case == "diagfisher":
        # memory_bytes plans a query (the damped diagonal and the answer beside Σ g²)
        planned //= 3
    if case == "dense":
        # memory_bytes plans the inversion (Gram, factor, inverse of the factor); afterwards the
        # Gram and the inverse are held
        planned = planned * 2 // 3
    assert held == pytest.approx(planned, rel=0.2)


def test_woodbury_peak_matches_memory_bytes_within_20_percent():
    est, peak = life_cycle(*CASES["woodfisher-woodbury"])
    assert peak == pytest.approx(type(est).memory_bytes(SIZES, est.config), rel=0.2)


def test_gram_peak_matches_memory_bytes_within_20_percent():
    est, peak = life_cycle(*CASES["woodfisher-gram"])
    assert peak == pytest.approx(type(est).memory_bytes(SIZES, est.config), rel=0.2)


def test_dynamic_mfac_peak_matches_memory_bytes_within_20_percent():
    est, peak = life_cycle(*CASES["mfac-dynamic"])
    assert peak == pytest.approx(type(est).memory_bytes(SIZES, est.config), rel=0.2)


def test_peak_probe_sees_what_torch_allocates():
    def work():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 19)  # 2 MiB, peak 6 MiB
        del a
        return b

    b, peak = peak_allocated(work)
    assert peak == 6 * 2**20 and b.numel() == 1 << 19
    view = b[:10]
    assert tensor_bytes({"x": b, "y": [view, b]}) == 2 * 2**20, "shared storage counted once"


#: One pruning step on the digits CNN (d = 38,160; m = 32), as benchmarks/plan_accuracy.py
#: --quick: the gradient chunk (C = 32 rows, 4.7 MiB) and the estimator dominate the step.
STEP_CASES = {
    "woodfisher-gram": ("woodfisher", {"block_size": 128, "num_grads": 32, "algorithm": "gram"}),
    "woodfisher-woodbury": ("woodfisher", {"block_size": 128, "num_grads": 8, "algorithm": "woodbury"}),
    "mfac-static": ("mfac", {"num_grads": 32, "algorithm": "static", "fisher_mini_batch": 1}),
    "mfac-static-unblocked": ("mfac", {"num_grads": 32, "algorithm": "static",
                                       "fisher_mini_batch": 1, "block_size": None}),
    "mfac-dynamic": ("mfac", {"num_grads": 32, "algorithm": "dynamic", "window": 8,
                              "fisher_mini_batch": 1, "block_size": None}),
    "diagfisher": ("diagfisher", {"num_grads": 32}),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_whole_step_peak_matches_the_plan_within_20_percent(case):
    """The plan's total (the larger of the accumulating and the answering phase, plus weights)."""
    name, cfg = STEP_CASES[case]
    _, plan, peak = _digits_cnn_step({"name": name, **cfg}, given_batch=False)
    assert peak == pytest.approx(plan.total_bytes, rel=0.2), plan.memory


def _digits_cnn_step(estimator: dict, *, given_batch: bool):
    """The plan of one OBS step to 50 % on the digits CNN (two random batches of 64), and the
    step's measured tensor peak; ``given_batch``: the plan gets the first batch, as
    ``curvprune plan`` and ``Pipeline.prune`` give it."""
    from curvprune.run.models import build_model

    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
               for _ in range(2)]
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10)
    pipeline = Pipeline.from_config({"prune": {"sparsity": 0.5, "loss_samples": 64},
                                     "estimator": estimator, "scorer": {"name": "obs"}})
    plan = pipeline.plan(model, example=batches[0] if given_batch else None)
    _, peak = peak_allocated(lambda: pipeline.prune(model, batches))
    return pipeline, plan, peak


def test_plan_total_takes_the_larger_phase():
    pipeline = Pipeline.from_config({"estimator": {"name": "woodfisher", "block_size": 64,
                                                   "algorithm": "gram"}, "scorer": {"name": "obs"}})
    plan = pipeline.plan(Model())
    memory = plan.memory
    assert plan.estimator_held == memory["estimator"] // 2  # the Gram batch, not the inversion's two
    accumulating = plan.estimator_held + memory["gradients"]
    assert plan.total_bytes == memory["weights"] + max(accumulating, memory["estimator"])
    assert plan.total_bytes < sum(memory.values())


@pytest.mark.parametrize("case", ["diagfisher", "woodfisher-gram", "mfac-static"])
def test_whole_step_peak_of_a_closed_form_linear_model_matches_the_plan(case):
    """An nn.Sequential MLP takes GradientSource's closed form (rows written directly, no
    per-parameter copy): the plan counts one chunk of rows plus the update, within 20 %."""
    name, cfg = STEP_CASES[case]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g))
               for _ in range(2)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    pipeline = Pipeline.from_config({"prune": {"sparsity": 0.5, "loss_samples": 64},
                                     "estimator": {"name": name, **cfg}, "scorer": {"name": "obs"}})
    plan = pipeline.plan(model)
    _, peak = peak_allocated(lambda: pipeline.prune(model, batches))
    assert peak == pytest.approx(plan.total_bytes, rel=0.2), (peak, plan.memory)


def test_sequential_sparsegpt_step_matches_the_plan_within_20_percent():
    """Sequential SparseGPT on a GPT-2 built from a config: the plan, given one batch, counts
    the stage's Hessians and factorization, the cached block inputs and one block's measured
    activations; the prune's tensor peak is within 20 % of it."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=1000,
                                  n_positions=128, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 1000, (32, 128), generator=torch.Generator().manual_seed(0))
    batches = [(ids[i : i + 8], ids[i : i + 8]) for i in range(0, 32, 8)]
    pipeline = Pipeline.from_config({
        "estimator": {"name": "sparsegpt", "num_grads": 32}, "scorer": {"name": "obs"},
        "mask": {"name": "layerwise"}, "prune": {"sparsity": 0.5, "loss_samples": 0},
    })
    plan = pipeline.plan(model, example=batches[0])
    assert {"calibration", "activations", "estimator", "weights"} <= set(plan.memory)
    assert plan.memory["calibration"] == 32 * 128 * 256 * 4  # one block's inputs, float32
    _, peak = peak_allocated(lambda: pipeline.prune(model, batches))
    assert peak == pytest.approx(plan.total_bytes, rel=0.2), (peak, plan.memory)


@pytest.mark.parametrize("num_grads", [32, 128])
def test_kfac_step_matches_the_plan_within_20_percent(num_grads):
    """K-FAC fits curvlinops' factors on the model. Given one batch the plan measures the fit's
    passes over it (`fit_passes`: the forward and backward pass, the unfolded patches, the
    batch's covariances) and, when the fit spans more than one batch, counts the factor sums
    held meanwhile. One batch (32 of 64) and two batches (128): the digits CNN's step peaks
    within 20 % of the plan either way (before fit_passes the one-batch case read 0.80)."""
    pytest.importorskip("curvprune_kfac")
    pipeline, plan, peak = _digits_cnn_step({"name": "kfac", "num_grads": num_grads},
                                            given_batch=True)
    held = pipeline.estimator.plan_held_bytes(plan.layout, pipeline.estimator.config)
    assert plan.estimator_held == (held if num_grads > 64 else 0)
    assert peak == pytest.approx(plan.total_bytes, rel=0.2), (peak, plan.memory)
