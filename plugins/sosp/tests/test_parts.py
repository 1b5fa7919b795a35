"""Loss curvatures, rank correlation and the bottleneck report, each against its definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune import ConfigError
from curvprune_sosp import BottleneckReport, bottleneck_report, plot_bottlenecks, spearman
from curvprune_sosp.losses import OutputCurvature, resolve_output_curvature
from curvprune_sosp.stability import average_ranks


def brute_force(loss_fn, out, y):
    """rₙ and Λₙ of ℓ(fₙ, yₙ) = loss_fn(fₙ[None], yₙ[None]) by autograd, one sample at a time."""
    res, lam = [], []
    for i in range(out.shape[0]):
        f = out[i].clone().requires_grad_(True)
        res.append(torch.autograd.grad(loss_fn(f[None], y[i : i + 1]), f)[0])
        lam.append(torch.autograd.functional.hessian(lambda v, i=i: loss_fn(v[None], y[i : i + 1]),
                                                     out[i]))
    return torch.stack(res), torch.stack(lam)


CASES = {
    "cross_entropy": (F.cross_entropy, lambda g, n, c: torch.randint(0, c, (n,), generator=g)),
    "soft_targets": (F.cross_entropy, lambda g, n, c: torch.softmax(
        torch.randn(n, c, generator=g, dtype=torch.float64), 1)),
    "mse": (F.mse_loss, lambda g, n, c: torch.randn(n, c, generator=g, dtype=torch.float64)),
}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), case=st.sampled_from(sorted(CASES)), classes=st.integers(2, 6))
def test_closed_forms_equal_autograd(seed, case, classes) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss_fn, target = CASES[case]
    out = torch.randn(5, classes, generator=gen, dtype=torch.float64)
    y = target(gen, 5, classes)
    curv = resolve_output_curvature("auto", loss_fn, out, y)
    assert curv.kind == ("mse" if case == "mse" else "cross_entropy")
    res, lam = brute_force(loss_fn, out, y)
    torch.testing.assert_close(curv.residual(out, y), res, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(curv.matrix(out, y), lam, rtol=1e-12, atol=1e-12)
    u = torch.randn(5, classes, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(curv.apply(out, y, u), lam @ u, rtol=1e-12, atol=1e-12)
    generic = OutputCurvature("autograd", loss_fn)
    torch.testing.assert_close(generic.residual(out, y), res, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(generic.apply(out, y, u[..., 0]), (lam @ u)[..., 0],
                               rtol=1e-12, atol=1e-12)


def test_unrecognised_losses_and_outputs_are_refused() -> None:
    out, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ConfigError, match="cannot identify the loss:.*@ scorer.loss"):
        resolve_output_curvature("auto", lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1),
                                 out, y)
    with pytest.raises(ConfigError, match=r"outputs of shape \[batch, classes\]"):
        resolve_output_curvature("auto", F.cross_entropy, torch.randn(4, 3, 2), y)
    assert resolve_output_curvature("auto", None, out, y).kind == "cross_entropy"


@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.integers(-3, 3), min_size=2, max_size=12), seed=st.integers(0, 99))
def test_spearman_equals_pearson_of_average_ranks(values, seed) -> None:
    a = torch.tensor(values, dtype=torch.float64)
    b = a[torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))]
    ra = average_ranks(a)
    # average ranks: entry i ranks (#smaller) + (#equal − 1)/2
    expected = (a[None, :] < a[:, None]).sum(1) + ((a[None, :] == a[:, None]).sum(1) - 1) / 2
    torch.testing.assert_close(ra, expected.double())
    rb = average_ranks(b)
    if ra.std() > 0 and rb.std() > 0:
        ref = torch.corrcoef(torch.stack([ra, rb]))[0, 1]
        assert spearman(a, b) == pytest.approx(float(ref), abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0) or float(ra.std()) == 0


def test_bottleneck_flags_and_widths(tmp_path) -> None:
    group = torch.tensor([0] * 4 + [1] * 10 + [2] * 3)
    alive = torch.tensor([1, 1, 1, 1] + [1] * 9 + [0] + [1, 0, 0], dtype=torch.bool)
    report = bottleneck_report(("a", "b", "c"), group, alive, threshold=0.9, width_multiplier=2.0)
    rows = [(g.name, g.size, g.kept, g.bottleneck, g.suggested_width) for g in report.groups]
    assert rows == [("a", 4, 4, True, 8), ("b", 10, 9, True, 20), ("c", 3, 1, False, 3)]
    assert [g.name for g in report.bottlenecks] == ["a", "b"]
    assert report.to_dict()["bottlenecks"] == ["a", "b"]
    assert "| b | 10 | 9 | 90% | yes | 20 |" in report.to_markdown()
    assert BottleneckReport.from_dict(report.to_dict()) == report
    plot_bottlenecks(report, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="threshold"):
        bottleneck_report(("a",), group[:4], alive[:4], threshold=1.5)
