"""The M-FAC optimizer: exact steps, momentum, state round trip, masks, speed on a quadratic."""

from __future__ import annotations

import copy

import pytest
import torch

import curvprune
from curvprune import ConfigError, NumericalError, Pipeline
from curvprune_mfac import MFAC

from .conftest import dense_fisher


def steps_with_grads(opt, params, grads):
    for g in grads:
        offset = 0
        for p in params:
            p.grad = g[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()


def test_each_step_is_minus_lr_times_window_inverse():
    torch.manual_seed(0)
    a, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    params = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    opt = MFAC(params, lr=0.3, ngrads=3, damping=0.5, weight_decay=0.1)
    grads = torch.randn(6, 10, dtype=torch.float64)
    seen = []
    for t, g in enumerate(grads):
        before = torch.cat([p.detach().reshape(-1) for p in params])
        steps_with_grads(opt, params, g[None])
        after = torch.cat([p.detach().reshape(-1) for p in params])
        seen.append(g + 0.1 * before)  # L2 weight decay enters the gradient (and the window)
        window = torch.stack(seen[-3:])
        # The zero-filled window: F = λI + (1/ngrads)·Σ over the real gradients held.
        fisher = dense_fisher(window, (10,), None, 0.5, scale=3)
        expected = before - 0.3 * torch.linalg.solve(fisher, seen[-1])
        torch.testing.assert_close(after, expected, rtol=1e-12, atol=1e-12, msg=f"step {t}")


def test_momentum_is_an_exponential_average_of_preconditioned_steps():
    torch.manual_seed(1)
    grads = torch.randn(4, 5, dtype=torch.float64)
    plain_w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    plain = MFAC([plain_w], lr=1.0, ngrads=2, damping=0.2)
    heavy_w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    heavy = MFAC([heavy_w], lr=1.0, ngrads=2, damping=0.2, momentum=0.9)
    v = torch.zeros(5, dtype=torch.float64)
    for g in grads:
        before = plain_w.detach().clone()
        steps_with_grads(plain, [plain_w], g[None])
        u = before - plain_w.detach()
        v = 0.9 * v + 0.1 * u
        h_before = heavy_w.detach().clone()
        steps_with_grads(heavy, [heavy_w], g[None])
        torch.testing.assert_close(h_before - heavy_w.detach(), v, rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def train(m, opt, n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    opt = MFAC(model.parameters(), lr=1e-3, momentum=0.5, ngrads=4, weight_decay=1e-3)
    train(model, opt, 6)  # window wrapped once
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 5)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = MFAC(resumed.parameters(), lr=1e-3, momentum=0.5, ngrads=4, weight_decay=1e-3)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 5)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="ngrads=4"):
        MFAC(resumed.parameters(), ngrads=8).load_state_dict(saved_opt)


def test_masked_coordinates_stay_exactly_zero_once_the_window_is_masked():
    torch.manual_seed(3)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    opt = MFAC([w], lr=0.1, ngrads=3, damping=0.1)
    steps_with_grads(opt, [w], torch.randn(3, 6, dtype=torch.float64))  # pre-pruning window
    keep = torch.tensor([True, False, True, True, False, True])
    with torch.no_grad():
        w.mul_(keep)
    masked = torch.randn(1, 6, dtype=torch.float64) * keep
    steps_with_grads(opt, [w], masked)
    # Older, unmasked gradients couple pruned and kept coordinates: F⁻¹ mixes them in.
    assert bool((w.detach()[~keep] != 0).all())
    with torch.no_grad():
        w.mul_(keep)  # what the pruning session does after every step
    opt.apply_masks({w: keep})
    steps_with_grads(opt, [w], torch.randn(5, 6, dtype=torch.float64) * keep)
    assert bool((w.detach()[~keep] == 0).all())  # exactly zero: F e_q = λ e_q there
    # Without apply_masks, the window forgets the coupling after ngrads masked steps.
    v = torch.randn(6, dtype=torch.float64).mul(keep).requires_grad_(True)
    fresh = MFAC([v], lr=0.1, ngrads=3, damping=0.1)
    steps_with_grads(fresh, [v], torch.randn(3, 6, dtype=torch.float64))
    with torch.no_grad():
        v.mul_(keep)
    steps_with_grads(fresh, [v], torch.randn(3, 6, dtype=torch.float64) * keep)
    with torch.no_grad():
        v.mul_(keep)
    steps_with_grads(fresh, [v], torch.randn(4, 6, dtype=torch.float64) * keep)
    assert bool((v.detach()[~keep] == 0).all())


def _flat_keep(model, masks):
    """Keep-mask over every parameter of ``model`` in order (unmasked ones all True)."""
    tensors = masks.tensors()
    return torch.cat([tensors[n].reshape(-1) if n in tensors
                      else torch.ones(p.numel(), dtype=torch.bool)
                      for n, p in model.named_parameters()])


def _gradual_session(model, opt, step=2):
    pipe = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0},
        "scorer": {"name": "magnitude"},
        "schedule": {"name": "gradual", "start": step, "end": step},
        "mask": {"name": "global"},
    })
    return pipe.attach(model, opt)


def test_mfac_is_a_mask_aware_optimizer():
    assert isinstance(MFAC([torch.zeros(2, requires_grad=True)], ngrads=2),
                      curvprune.MaskAwareOptimizer)
    assert not isinstance(torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1),
                          curvprune.MaskAwareOptimizer)


def test_session_masks_the_window_after_a_pruning_step_and_pruned_weights_stay_zero():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    lr, mu, damping, m = 0.05, 0.5, 0.1, 4
    opt = MFAC(model.parameters(), lr=lr, momentum=mu, ngrads=m, damping=damping)
    session = _gradual_session(model, opt, step=2)
    seen, keep = [], None
    for t in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        session.before_optimizer_step()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        seen.append(g.clone())
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        buf = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) if p in opt.state
                         else torch.zeros(p.numel(), dtype=torch.float64)
                         for p in model.parameters()])
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if t >= 3:  # after the pruning step: checked before the session re-zeroes anything
            assert bool((after[~keep] == 0).all()), f"step {t} moved pruned weights"
            # The same dense check as above: F = λI + (1/m)·Σ over the window, whose gradients
            # from before the pruning step are restricted to the kept coordinates.
            window = torch.stack([h * keep for h in seen[-m:]])
            u = torch.linalg.solve(dense_fisher(window, (g.numel(),), None, damping, scale=m), g)
            expected = before - lr * (mu * buf + (1 - mu) * u)
            torch.testing.assert_close(after, expected, rtol=1e-10, atol=1e-12)
        session.step()
        if t == 2:
            assert len(session.reports) == 1
            keep = _flat_keep(model, session.masks)
            assert int((~keep).sum()) > 0
            grads = opt._window.grads  # [1, m, d]: the window rows
            assert bool((grads[..., ~keep] == 0).all()), "window rows not masked"
            assert bool((grads[..., keep] != 0).any())
            for p, k in zip(model.parameters(), torch.split(keep, [q.numel() for q in
                                                                    model.parameters()]),
                            strict=True):
                assert bool((opt.state[p]["momentum_buffer"].reshape(-1)[~k] == 0).all())
    session.close()


def test_attach_with_masks_masks_a_window_filled_before_pruning():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    opt = MFAC(model.parameters(), lr=0.01, ngrads=3, damping=0.1)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    for _ in range(3):  # dense training fills the window
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pipe = Pipeline.from_config({"prune": {"sparsity": 0.5, "loss_samples": 0},
                                 "scorer": {"name": "magnitude"}})
    result = pipe.prune(model, None)
    pipe.attach(model, opt, masks=result.masks)
    keep = _flat_keep(model, result.masks)
    assert bool((opt._window.grads[..., ~keep] == 0).all())


def steps_to_target(make_optimizer, h, target, max_steps, seed=0):
    """Noisy quadratic ½(w−w*)ᵀH(w−w*), gradients H(w−w*) + ξ with ξ ~ N(0, H)."""
    g = torch.Generator().manual_seed(seed)
    w = (1 / h.sqrt()).requires_grad_(True)  # every eigen-direction starts at loss ½
    opt = make_optimizer([w])
    for t in range(max_steps):
        w.grad = h * w.detach() + h.sqrt() * torch.randn(h.shape, generator=g, dtype=h.dtype)
        opt.step()
        if float(0.5 * (h * w.detach() ** 2).sum()) <= target:
            return t + 1
    return max_steps + 1


def test_fewer_steps_than_sgd_on_an_ill_conditioned_quadratic():
    # cond(H) = 1e4. SGD is stable for lr < 2/h_max = 2e-4 and then needs ~κ steps; the
    # empirical Fisher of these gradients is H·δδᵀ·H + H, so M-FAC's step is close to a scaled
    # Newton step whatever κ is.
    h = torch.logspace(0, 4, 10, dtype=torch.float64)
    target = 0.1 * float(0.5 * h.numel())
    sgd = min(steps_to_target(lambda p, lr=lr: torch.optim.SGD(p, lr=lr), h, target, 3000)
              for lr in (3e-5, 1e-4, 1.5e-4, 1.9e-4))
    mfac = steps_to_target(lambda p: MFAC(p, lr=0.05, ngrads=16, damping=1e-5), h, target, 3000)
    assert mfac < sgd / 2, (mfac, sgd)


def test_bad_arguments_and_non_finite_gradients():
    w = torch.zeros(3, requires_grad=True)
    for kwargs, message in [({"ngrads": 0}, "ngrads must be >= 1, got 0"),
                            ({"damping": 0.0}, "damping must be > 0, got 0.0"),
                            ({"momentum": 1.0}, "momentum must be in"),
                            ({"lr": -1.0}, "lr must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            MFAC([w], **kwargs)
    opt = MFAC([w], ngrads=2)
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(NumericalError, match="NaN or Inf"):
        opt.step()
    assert torch.equal(w.detach(), torch.zeros(3)) and opt.state_dict()["mfac"]["seen"] == 0


# -- issue 19: no host sync per step ---------------------------------------------------------
def _reference_steps(params, grads, *, lr, momentum, weight_decay, ngrads, damping):
    """The step before issue 19, written out: SlidingWindow.push, its checked factor, ihvp."""
    from curvprune_mfac.dynamic import SlidingWindow

    d = sum(p.numel() for p in params)
    window = SlidingWindow(1, ngrads, d, damping=damping, dtype=params[0].dtype,
                           zero_padded=True)
    bufs = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        for g in grads:
            g = torch.cat([piece.add(p.reshape(-1), alpha=weight_decay) for piece, p in
                           zip(g.split([p.numel() for p in params]), params, strict=True)])
            x = g[None, None, :]
            projections = window.push(x.transpose(0, 1))
            update = window.ihvp(x, projections)[0, 0]
            offset = 0
            for p, buf in zip(params, bufs, strict=True):
                u = update[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if momentum:
                    buf.mul_(momentum).add_(u, alpha=1 - momentum)
                    u = buf
                p.add_(u, alpha=-lr)
    return window


@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_steps_equal_the_previous_algorithm_bit_for_bit(momentum):
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(4, 3, generator=gen, dtype=torch.float64),
            torch.randn(5, generator=gen, dtype=torch.float64)]
    grads = torch.randn(11, 17, generator=gen, dtype=torch.float64)  # wraps a window of 4 twice
    kw = {"lr": 0.05, "momentum": momentum, "weight_decay": 0.01, "ngrads": 4, "damping": 0.3}
    ref = [p.clone() for p in init]
    window = _reference_steps(ref, grads, **kw)
    params = [p.clone().requires_grad_(True) for p in init]
    opt = MFAC(params, **kw)
    steps_with_grads(opt, params, grads)
    for mine, theirs in zip(params, ref, strict=True):
        assert torch.equal(mine.detach(), theirs)
    state = opt.state_dict()["mfac"]
    assert torch.equal(state["grads"], window.grads) and torch.equal(state["gram"], window.gram)
    assert (state["position"], state["seen"]) == (window.position, window.seen)


def test_a_step_reads_nothing_back_from_the_device(monkeypatch):
    """Every device-to-host read of a step goes through MFAC.check (on the CPU it runs at the
    end of the step; on an accelerator at the start of the next). With check silenced, a
    step, even a refused one, must not convert any tensor to a Python value."""
    torch.manual_seed(3)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    opt = MFAC([w], lr=0.1, momentum=0.5, ngrads=3, damping=0.2)
    grads = torch.randn(5, 6, dtype=torch.float64)
    grads[2, 1] = float("nan")
    monkeypatch.setattr(MFAC, "check", lambda self: None)

    def no_sync(*_args, **_kwargs):
        raise AssertionError("host sync inside MFAC.step")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    steps_with_grads(opt, [w], grads)
    monkeypatch.undo()
    assert torch.isfinite(w).all()


def test_a_refused_step_leaves_no_trace():
    """A NaN gradient mid-run raises, and the run then continues exactly as if that step had
    never been taken (window slot, Gram matrix, momentum and parameters untouched)."""
    torch.manual_seed(4)
    init = torch.randn(7, dtype=torch.float64)
    grads = torch.randn(8, 7, dtype=torch.float64)
    clean_w = init.clone().requires_grad_(True)
    clean = MFAC([clean_w], lr=0.1, momentum=0.5, ngrads=3, damping=0.2)
    steps_with_grads(clean, [clean_w], grads)
    w = init.clone().requires_grad_(True)
    opt = MFAC([w], lr=0.1, momentum=0.5, ngrads=3, damping=0.2)
    steps_with_grads(opt, [w], grads[:5])
    bad = grads[5].clone()
    bad[3] = float("inf")
    with pytest.raises(NumericalError, match="NaN or Inf; nothing was updated"):
        steps_with_grads(opt, [w], bad[None])
    steps_with_grads(opt, [w], grads[5:])
    assert torch.equal(w.detach(), clean_w.detach())
    assert torch.equal(opt.state_dict()["mfac"]["gram"], clean.state_dict()["mfac"]["gram"])
