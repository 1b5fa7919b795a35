"""SOSP's gates already cover the whole coupled group, consumers included: no extra terms.

Removing structure s deletes its producers' rows, biases and BatchNorm γ, β **and** its
consumers' input columns. SOSP scores s through one gate mₛ on the post-BN output of every
producer of the group (shared by the coupled producers of a residual stream). With m = 𝟙 + t·eₛ:

* producer side: the gated output mₛ·(γₛx̂ₛ + βₛ) is the output with γₛ, βₛ scaled by mₛ (or,
  without BN, the producer's row and bias scaled by mₛ), so ∂L/∂mₛ = Σ_gate points θ·∂L/∂θ over
  those parameters (chain rule);
* consumer side: every op between the gates and the consumers is channel-wise and positively
  homogeneous (ReLU, max/avg pooling, flatten, and the residual add of two inputs carrying the
  same gate), so each consumer reads mₛ·(its dense input channel s), which is the dense input
  read with its columns of s scaled by mₛ: ∂L/∂mₛ = Σ_consumers Σ W_c[:, s]·∂L/∂W_c[:, s].

So the first-order term of the deleted producer parameters and that of the deleted consumer
columns are *the same number*, the gate's sensitivity; adding both (as a group-summed first-order
Taylor score does) would count it twice. At mₛ = 0 the consumers read zeros, so deleting their
columns changes nothing more: the gate path from 1 to 0 reaches exactly the physically removed
model, and SOSP's quadratic model in m is the loss change of the whole group's removal.
The tests check both identities and the end point on a Linear MLP (no BN) and on a residual
conv net with BatchNorms, in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvprune import StructureGraph, remove_structures, select_parameters
from curvprune.testing.nets import TinyResNet, randomize_, sequential_cnn


def _setup(name: str):
    gen = torch.Generator().manual_seed(7)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                              nn.Linear(4, 3))
        x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    elif name == "resnet":
        model = TinyResNet("basic", widths=(2, 3), blocks=2, stem=2)
        x = torch.randn(16, 3, 6, 6, generator=gen, dtype=torch.float64)
    else:
        model = sequential_cnn([3, 2], hidden=[4], pool=True)
        x = torch.randn(16, 1, 4, 4, generator=gen, dtype=torch.float64)
    model = randomize_(model.double(), gen).eval()
    y = torch.randint(0, 3, (16,), generator=gen)
    layout = select_parameters(model)
    layout = layout.with_structures(StructureGraph.trace(model).structures(layout))
    return model, x, y, layout


@pytest.mark.parametrize("name", ["mlp", "resnet", "cnn-flatten"])
def test_gate_sensitivity_equals_producer_and_consumer_terms(name):
    model, x, y, layout = _setup(name)
    structures = layout.structures
    gates = torch.ones(layout.n_structures, dtype=torch.float64, requires_grad=True)
    with structures.gates(model, gates):
        loss = F.cross_entropy(model(x), y)
    params = dict(model.named_parameters())
    g_gate, *rest = torch.autograd.grad(loss, [gates, *params.values()])
    grads = dict(zip(params, rest, strict=True))
    producer = torch.zeros_like(g_gate)
    consumer = torch.zeros_like(g_gate)
    for g, first in zip(structures.groups, structures.offsets, strict=True):
        sid = torch.arange(first, first + g.size).repeat(g.copies)
        for gate, at, lo, hi in g.placed("gates"):
            # θ·∂L/∂θ per channel over the parameters that scale the gated output (a BN's
            # γ and β, or the producer's row and bias when no BN follows it)
            for suffix in ("weight", "bias"):
                key = f"{gate}.{suffix}"
                if key not in params:
                    continue
                term = (params[key] * grads[key]).detach()
                per_row = term.reshape(term.shape[0], -1).sum(1)[at : at + hi - lo]
                producer.index_add_(0, sid[lo:hi], per_row)
        for (m, per), at, lo, hi in g.placed("consumers"):
            term = (params[f"{m}.weight"] * grads[f"{m}.weight"]).detach()
            cols = term.transpose(0, 1).reshape(term.shape[1], -1).sum(1)
            cols = cols[at * per : (at + hi - lo) * per].reshape(hi - lo, per).sum(1)
            consumer.index_add_(0, sid[lo:hi], cols)
    torch.testing.assert_close(producer, g_gate, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(consumer, g_gate, rtol=1e-10, atol=1e-12)
    assert float(g_gate.abs().max()) > 1e-6  # the identity is not 0 = 0


def _gated(model, structures, gates, x):
    with structures.gates(model, gates):
        return model(x)


@pytest.mark.parametrize("name", ["mlp", "resnet", "cnn-flatten"])
def test_closed_gate_is_the_physical_removal_of_the_whole_group(name):
    """L(mₛ = 0) equals the loss of the model with s removed (its consumers' columns too)."""
    model, x, y, layout = _setup(name)
    structures = layout.structures
    group = layout.structure_group()
    for s in range(layout.n_structures):
        if int((group == group[s]).sum()) < 2:
            continue
        values = torch.ones(layout.n_structures, dtype=torch.float64)
        values[s] = 0.0
        with torch.no_grad():
            gated = _gated(model, structures, values, x)
            smaller = copy.deepcopy(model)
            keep = values.bool()
            remove_structures(smaller, structures, keep)
            torch.testing.assert_close(smaller(x), gated, rtol=1e-10, atol=1e-12)
