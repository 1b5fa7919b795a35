"""Issue 19: buffers that are fully overwritten are allocated with ``torch.empty``, not zeroed.

Each test poisons every fresh ``torch.empty`` / ``new_empty`` float buffer with NaN (what
uninitialised memory may hold): if any element were read before being written, NaN would reach
the result. The results must equal the dense float64 ground truth.
"""

from __future__ import annotations

import pytest
import torch

from curvprune import create
from curvprune.testing.dense import damped_fisher


@pytest.fixture
def nan_empty(monkeypatch):
    empty, new_empty = torch.empty, torch.Tensor.new_empty
    poisoned = []

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
            poisoned.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(
        new_empty(self, *a, **k)))
    return poisoned


CASES = [
    ("woodfisher", {"algorithm": "gram", "block_size": 4}),
    ("woodfisher", {"algorithm": "gram", "block_size": None}),
    ("mfac", {"algorithm": "static", "block_size": 4, "blocks": "fixed"}),
    ("mfac", {"algorithm": "static", "block_size": 4, "blocks": "alive"}),
    ("mfac", {"algorithm": "static", "block_size": None}),
]


@pytest.mark.parametrize(("name", "cfg"), CASES,
                         ids=["wf-gram-blocked", "wf-gram", "mfac-fixed", "mfac-alive", "mfac"])
def test_uninitialised_buffers_are_never_read(name, cfg, nan_empty):
    sizes = (7, 6)  # short last blocks in both parameters
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(6, 13, generator=gen, dtype=torch.float64)
    grads[:, 9] = 0  # a dead coordinate ("alive" blocks skip it)
    est = create("estimator", name, dtype="float64", damping=0.1, num_grads=8, **cfg)
    est.setup(list(sizes))
    est.update(grads[:4])
    est.update(grads[4:])  # fewer than num_grads: the unused rows of G stay unwritten
    assert nan_empty, "the buffers under test come from torch.empty"
    if cfg.get("blocks") == "alive":  # blocks of 4 live coordinates across parameters
        live = grads.ne(0).any(0).nonzero().squeeze(1)
        dense = torch.eye(13, dtype=torch.float64) / 0.1
        inner = torch.linalg.inv(damped_fisher(grads[:, live], (live.numel(),), 4, 0.1))
        dense[live[:, None], live] = inner
    else:
        dense = torch.linalg.inv(damped_fisher(grads, sizes, cfg["block_size"], 0.1))
    v = torch.randn(2, 13, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(est.inverse_diagonal(), dense.diagonal(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(est.ihvp(v), v @ dense, rtol=1e-9, atol=1e-9)
