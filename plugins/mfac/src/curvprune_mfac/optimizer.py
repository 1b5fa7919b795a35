"""The M-FAC optimizer: gradient steps preconditioned by the sliding-window inverse Fisher.

Frantar, Kurtic & Alistarh (NeurIPS 2021), Sec. 3.2 and the reference ``MFAC`` optimizer. One
window of the last ``ngrads`` gradients over all parameters (flattened and concatenated in
``param_groups`` order), F = λI + (1/m)·Σ ggᵀ. Each :meth:`MFAC.step`:

1. g ← ∇L + weight_decay·w (L2 added before preconditioning, not decoupled);
2. push g into the window, evicting the oldest gradient;
3. u ← F⁻¹g with the new window (g included), O(d·m + m³), reusing Gg from the push;
4. with momentum μ > 0, an exponential average: v ← μv + (1 − μ)u, u ← v;
5. w ← w − lr·u.

The window starts as m zero gradients, as in the reference, and F is scaled by 1/m from the first
step: with one gradient in it, u = g/(λ + ‖g‖²/m), a step of length ≈ m/‖g‖ (use a small lr).

No host sync per step: the window's next slot and count are device tensors, and the two checks
a step needs (the gradient is finite; the m×m Cholesky factor exists) become one device flag that
guards every write, so a refused step leaves window, momentum and parameters as they were. The
flag is read by :meth:`MFAC.check`: at the end of the step on the CPU (where reading it costs
nothing), at the start of the next step on an accelerator (after a non-blocking copy, waiting
only for that step's own work). Accepted steps are bit for bit those of the synchronous form.

Masks: if every gradient in the window is zero at coordinate q, then F e_q = λ e_q, so
u_q = g_q/λ, which is exactly 0 when the weight and its gradient are (pruned weight, masked
gradient). Gradients taken before q was pruned still couple q to the kept weights: for the next
m steps u_q ≠ 0 in general, and the kept weights' steps still see the pruned coordinates' old
gradients. :meth:`MFAC.apply_masks` (curvprune's :class:`curvprune.MaskAwareOptimizer`
protocol, which a :class:`curvprune.PruningSession` calls after every pruning step) zeroes the
pruned coordinates of every window gradient and of the momentum at once, after which pruned
weights stay exactly zero. On the kept coordinates F is then the Fisher of the held gradients
restricted to them, the matrix the reference's ``sparse=True`` mode forms (it drops the
coordinates whose weight is zero when the optimizer is built, and never updates them). The
reference cannot mask a running optimizer: a new mask there means a new optimizer with an empty
(zero-filled) window, whereas here the last m gradients, restricted, are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvprune import ConfigError, NumericalError
from curvprune_mfac.dynamic import SlidingWindow

__all__ = ["MFAC"]


class MFAC(torch.optim.Optimizer):
    """M-FAC: SGD preconditioned by the inverse empirical Fisher of the last ``ngrads`` gradients.

    Args:
        params: parameters or parameter groups (groups may set ``lr``, ``momentum``,
            ``weight_decay``; the window and damping are shared by all parameters).
        lr: learning rate. Default 1e-3 (reference).
        momentum: μ of the exponential average of preconditioned steps, in [0, 1). Default 0.
        weight_decay: L2 coefficient added to the gradient before preconditioning. Default 0.
        ngrads: the window size m. Default 1024 (reference).
        damping: λ > 0. Default 1e-5 (reference).

    Memory: m·d numbers at the parameters' dtype for the window, plus float64 m×m matrices.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ngrads: int = 1024,
        damping: float = 1e-5,
    ) -> None:
        _check("lr", lr, lr >= 0, ">= 0")
        _check("momentum", momentum, 0 <= momentum < 1, "in [0, 1)")
        _check("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        _check("ngrads", ngrads, ngrads >= 1, ">= 1")
        _check("damping", damping, damping > 0, "> 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        flat = self._params()
        first = flat[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in flat):
            raise ConfigError("MFAC needs all parameters on one device with one dtype")
        self.ngrads, self.damping = int(ngrads), float(damping)
        self._window = SlidingWindow(
            1, self.ngrads, sum(p.numel() for p in flat), damping=self.damping,
            dtype=first.dtype, device=first.device, zero_padded=True,
        )
        # the window's next slot and gradient count live on the device (no host sync per
        # step); the window's own host-side copies are refreshed by state_dict
        self._slot = torch.zeros(1, dtype=torch.long, device=first.device)
        self._seen = torch.zeros((), dtype=torch.long, device=first.device)
        self._flag: Tensor | None = None  # the last step's outcome, not yet read
        self._flag_host: Tensor | None = None
        self._flag_event: Any = None

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One M-FAC step (see the module docstring); returns the closure's loss, if any.

        No host sync: whether the gradient is finite and whether the m×m factorization exists
        is decided on the device, and every write (window, Gram matrix, momentum, parameters)
        is guarded by that flag, so a refused step changes nothing. On the CPU the flag is
        read at once (reading it costs nothing there); on an accelerator it is copied to the
        host without blocking and read at the start of the next :meth:`step` (or by
        :meth:`state_dict` / :meth:`check`), which waits only for this step's work.

        Raises:
            NumericalError: a gradient holds NaN or Inf (parameters, window and momentum
                unchanged), or the window's capacitance lost definiteness (parameters and
                momentum unchanged); on an accelerator, from the step after.

        """
        self.check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pieces = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                pieces.append(g.reshape(-1))
        g = torch.cat(pieces)
        window = self._window
        finite = torch.isfinite(g).all()
        # push g into the slot of the oldest gradient (unless g is not finite)
        slot = self._slot
        row = torch.where(finite, g, window.grads[0].index_select(0, slot)[0])
        window.grads[0].index_copy_(0, slot, row[None])
        projections = window.grads @ row[None, :, None]  # G_new·g, [1, m, 1]
        cross = projections[0, :, 0].to(torch.float64)
        cross = torch.where(finite, cross, window.gram[0].index_select(1, slot)[:, 0])
        window.gram[0].index_copy_(1, slot, cross[:, None])
        window.gram[0].index_copy_(0, slot, cross[None, :])
        self._slot = (slot + finite.long()) % self.ngrads
        self._seen = self._seen + finite.long()
        factor, info = window.factor_ex()
        ok = finite & (info == 0).all()
        x = g[None, None, :]  # [n = 1, b = 1, d]
        update = window.ihvp(x, projections, factor=factor)[0, 0]
        update = torch.where(ok, update, torch.zeros((), dtype=update.dtype, device=update.device))
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                u = update[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    moved = buf.mul(group["momentum"]).add_(u, alpha=1 - group["momentum"])
                    buf.copy_(torch.where(ok, moved, buf))
                    u = torch.where(ok, buf, torch.zeros((), dtype=buf.dtype, device=buf.device))
                p.add_(u, alpha=-group["lr"])
        # 1: not finite, 2: no factorization (only looked at when finite)
        self._flag = torch.where(finite, torch.where(ok, 0, 2), 1)
        if self._flag.device.type == "cuda":
            if self._flag_host is None:
                self._flag_host = torch.empty((), dtype=self._flag.dtype, pin_memory=True)
            self._flag_host.copy_(self._flag, non_blocking=True)
            self._flag_event = torch.cuda.Event()
            self._flag_event.record()
        else:
            self.check()
        return loss

    def check(self) -> None:
        """Raise the error of the last :meth:`step` if it refused its gradient.

        :meth:`step` calls it first thing (and at its end off accelerators), so it only needs
        calling by hand to learn of a refused last step on an accelerator before the next one.

        Raises:
            NumericalError: see :meth:`step`.

        """
        flag = self._flag
        if flag is None:
            return
        if self._flag_event is not None:
            self._flag_event.synchronize()  # this step's work only, not what came after it
            flag, self._flag_event = self._flag_host.clone(), None
        self._flag = None
        code = int(flag)
        if code == 1:
            raise NumericalError("MFAC.step: the gradient holds NaN or Inf; nothing was updated")
        if code == 2:
            gram = self._window.gram
            raise NumericalError(
                f"mfac: the m×m capacitance m·I + GGᵀ/λ lost definiteness (damping="
                f"{self.damping:g} is too small for gradients with ‖GGᵀ‖ ≈ "
                f"{float(gram.abs().amax()):.3g}); raise damping or use float64 parameters; "
                "the parameters were not updated"
            )

    @torch.no_grad()
    def apply_masks(self, masks: Mapping[Tensor, Tensor]) -> None:
        """Remove pruned coordinates from the window (and their momentum): O(d·m²).

        Every gradient in the window is zeroed where a mask is False and the window's Gram
        matrix is recomputed, so F = blockdiag(F_kept, λI): F_kept is the Fisher of the window
        restricted to the kept coordinates, as the reference's sparse mode builds it.

        Args:
            masks: keep-mask (bool, the parameter's shape) of each masked parameter; parameters
                not in the mapping are kept whole.

        Raises:
            ValueError: a parameter this optimizer does not optimize, or a mask of another
                shape (nothing changed).
        """
        known = {id(p) for p in self._params()}
        unknown = [tuple(p.shape) for p in masks if id(p) not in known]
        if unknown:
            raise ValueError(
                f"MFAC.apply_masks: parameters of shapes {unknown} are not optimized here"
            )
        wrong = [(tuple(p.shape), tuple(m.shape)) for p, m in masks.items()
                 if m.numel() != p.numel()]
        if wrong:
            raise ValueError(f"MFAC.apply_masks: (parameter, mask) shapes differ: {wrong}")
        by_id = {id(p): mask for p, mask in masks.items()}
        keep = torch.cat([
            by_id[id(p)].reshape(-1).to(device=p.device, dtype=torch.bool) if id(p) in by_id
            else torch.ones(p.numel(), dtype=torch.bool, device=p.device)
            for p in self._params()
        ])
        self._window.mask_columns_(keep[None, :])
        for p in self._params():
            buf = self.state.get(p, {}).get("momentum_buffer")
            if buf is not None and id(p) in by_id:
                buf.mul_(by_id[id(p)].reshape(buf.shape).to(device=buf.device, dtype=buf.dtype))

    #: The former name of :meth:`apply_masks`.
    mask_ = apply_masks

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state (momentum, groups) plus the window under ``"mfac"``."""
        self.check()
        state = super().state_dict()
        self._window.position, self._window.seen = int(self._slot), int(self._seen)
        state["mfac"] = {**self._window.state_dict(), "ngrads": self.ngrads,
                         "damping": self.damping}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the window must have the same ``ngrads`` and d."""
        state = dict(state_dict)
        window = state.pop("mfac", None)
        if window is None:
            raise ValueError("MFAC.load_state_dict: no 'mfac' window state in this state dict")
        if int(window["ngrads"]) != self.ngrads or float(window["damping"]) != self.damping:
            raise ValueError(
                f"MFAC.load_state_dict: saved ngrads={window['ngrads']}, damping="
                f"{window['damping']} but this optimizer has ngrads={self.ngrads}, "
                f"damping={self.damping}"
            )
        super().load_state_dict(state)
        self._window.load_state_dict(window)
        self._slot.fill_(self._window.position)
        self._seen.fill_(self._window.seen)


def _check(name: str, value: float, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value}")
