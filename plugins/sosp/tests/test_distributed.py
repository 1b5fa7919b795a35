"""Two gloo processes, each scoring its shard of every batch, give the one-process scores.

The scorer all-reduces its sums (g, G𝟙, the half sums, Q) and the sample count; the data
source is the pipeline's (``curvprune.distributed.shard``, cutting ``num_samples`` over all
ranks). Spawning two processes costs a few seconds, so the test is marked slow.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SCRIPT_SEED = 11


def _context():
    import torch.nn.functional as F

    from curvprune import PruneContext, StructureGraph, distributed, select_parameters
    from curvprune.testing import DigitsCNN

    torch.manual_seed(SCRIPT_SEED)
    model = DigitsCNN(width=4).double().eval()
    layout = select_parameters(model)
    layout = layout.with_structures(StructureGraph.trace(model).structures(layout))
    gen = torch.Generator().manual_seed(SCRIPT_SEED)
    x = torch.randn(40, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (40,), generator=gen)
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 40, 7)]  # uneven shards
    mask = torch.ones(layout.d, dtype=torch.bool)
    return PruneContext(model=model, layout=layout, weights=layout.gather(model), mask=mask,
                        target_sparsity=0.5, loss_fn=F.cross_entropy,
                        batches=lambda n=None: distributed.shard(batches, n))


def _scores(name: str) -> list[torch.Tensor]:
    import curvprune

    ctx = _context()
    scorer = curvprune.create("scorer", name, num_samples=33, min_rank_correlation=0.0)
    scores = scorer.score(ctx)
    keep = curvprune.create("mask", "channel").select(scores, ctx.mask, 0.5, ctx.layout)
    predicted = scorer.predicted_loss_change(ctx, ctx.mask & ~keep)
    return [scores, predicted.reshape(1)]


def _worker(rank: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        result = {name: _scores(name) for name in ("sosp-h", "sosp-i")}
        local = torch.tensor([float(sum(len(b[0]) for b in _context().batches(33)))])
        counts = [torch.zeros(1), torch.zeros(1)]
        dist.all_gather(counts, local)
        result["counts"] = torch.cat(counts)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_score_like_one_process(tmp_path) -> None:
    out = str(tmp_path / "scores.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    two = torch.load(out)
    # rank r scored samples [⌊r·n/2⌋, ⌊(r+1)·n/2⌋) of each batch, 33 in all
    assert two["counts"].tolist() == [14.0, 19.0]
    for name in ("sosp-h", "sosp-i"):
        one = _scores(name)
        for a, b in zip(two[name], one, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
