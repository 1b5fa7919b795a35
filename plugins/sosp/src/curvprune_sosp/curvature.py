"""Gradient and Gauss-Newton quantities in gate space, accumulated over mini-batches.

Notation (memo §4.2, gate form). Gates m ∈ ℝˢ, m = 𝟙 at the trained point; fₙ = f(xₙ; m) ∈ ℝᶜ;
Aₙ = ∂fₙ/∂m ∈ ℝᶜˣˢ; rₙ = ∂ℓₙ/∂fₙ; Λₙ = ∂²ℓₙ/∂fₙ² (:mod:`curvprune_sosp.losses`). Over N samples

    g = ∂L/∂m = (1/N)·Σₙ Aₙᵀrₙ,        G = (1/N)·Σₙ AₙᵀΛₙAₙ   (the gate-space Gauss-Newton matrix).

Removing a set M is the step δm = −e_M, so the second-order model of the loss change is

    ΔL(M) ≈ −gᵀe_M + ½·e_MᵀGe_M = Σ_{s∈M} qₛ + ½·Σ_{s,s'∈M} Q_{ss'},   q = −g, Q = G   (memo Eq. 2).

* :func:`gradient_and_ggn_vector` (SOSP-H) gets g and G·t for one direction t without any S×S
  object: per batch one forward-mode pass with tangent t gives uₙ = Aₙt (a dual-number forward,
  ``torch.autograd.forward_ad``: the memo measured ``torch.func.jvp`` ~8× slower on this CPU
  build), wₙ = Λₙuₙ costs O(C), and two reverse passes from the same graph give Σₙ Aₙᵀwₙ and
  Σₙ Aₙᵀrₙ. Memory is that of one forward and backward: O(parameters + activations).
* :func:`gradient_and_hessian_vector` (SOSP-H as the paper's abstract describes it: products
  with the whole Hessian) gets g and the exact H·t, H = ∂²L/∂m², by double backward.
* :func:`quadratic_form` gets tᵀGt = (1/N)·Σₙ uₙᵀΛₙuₙ from forward passes only.
* :func:`structure_ggn` (SOSP-I) forms every Aₙ (reverse mode: C vector-Jacobian products per
  sample; forward mode: S Jacobian-vector products per batch) and accumulates G and g.

Every accumulator also keeps the sums of the even and of the odd batches separately, for the
split-half stability check, and is summed over ranks under ``torch.distributed``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import attrs
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from curvprune import ConfigError
from curvprune_sosp.gates import GateSpace
from curvprune_sosp.losses import OutputCurvature

__all__ = [
    "GateStatistics",
    "StructureGGN",
    "choose_jacobian_mode",
    "evaluation",
    "gradient_and_ggn_vector",
    "gradient_and_hessian_vector",
    "quadratic_form",
    "structure_ggn",
    "take_samples",
]

#: Builds the :class:`OutputCurvature` from the first batch's outputs and targets.
CurvatureFactory = Callable[[Tensor, Tensor], OutputCurvature]


@contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode (BatchNorm uses its running statistics), then restore;
    meanwhile attention runs on its math path.

    Saliencies need BN in eval mode: in train mode the batch statistics would renormalise a
    gated channel and corrupt both g and G (memo §4.4). The fused attention kernels (flash,
    memory-efficient, ``nn.MultiheadAttention``'s inference fast path) implement neither
    forward-mode AD nor double backward, which SOSP's Hessian- and GGN-vector products need;
    the math path (matmul, softmax) computes the same function with both.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with _math_attention():
            yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def _math_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` on its math backend and no MHA fast path, then restore."""
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if hasattr(mha, "get_fastpath_enabled") else None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the math path is chosen per call
        kernel = nullcontext()
    else:
        kernel = sdpa_kernel(SDPBackend.MATH)
    if fastpath is not None:
        mha.set_fastpath_enabled(False)
    try:
        with kernel:
            yield
    finally:
        if fastpath is not None:
            mha.set_fastpath_enabled(fastpath)


def take_samples(
    batches: Iterable[Any], num_samples: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor, int]]:
    """Yield ``(inputs, targets, half)`` on ``device`` until ``num_samples`` samples were seen.

    The last batch is cut to size; ``half`` alternates 0, 1, 0, ... over the batches (by the
    batch's index, so under ``torch.distributed`` every rank's slice of a batch lands in the same
    half). Empty batches (a rank's empty slice) are skipped.
    """
    seen = 0
    for index, batch in enumerate(batches):
        if seen >= num_samples:
            break
        x, y = batch[0], batch[1]
        take = min(num_samples - seen, int(x.shape[0]))
        if take > 0:
            yield x[:take].to(device), y[:take].to(device), index % 2
        seen += take


def _all_reduce_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place when ``torch.distributed`` is initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@attrs.define
class GateStatistics:
    """Sums over samples of ∂ℓₙ/∂m and of AₙᵀΛₙAₙt, per half of the batches.

    Attributes:
        grad: ``[2, S]`` float64, Σₙ Aₙᵀrₙ over the even (row 0) and odd (row 1) batches.
        ggn_vector: ``[2, S]`` float64, Σₙ AₙᵀΛₙAₙt over the same halves.
        count: ``[2]`` float64, samples in each half.

    """

    grad: Tensor
    ggn_vector: Tensor
    count: Tensor

    @property
    def num_samples(self) -> int:
        """N, all samples seen (over all ranks)."""
        return int(self.count.sum())

    def mean_grad(self) -> Tensor:
        """G = ∂L/∂m, ``[S]``."""
        return self.grad.sum(0) / self.count.sum()

    def mean_ggn_vector(self) -> Tensor:
        """G·t, ``[S]``."""
        return self.ggn_vector.sum(0) / self.count.sum()

    def half_saliencies(self) -> Tensor | None:
        """−g + ½·G·t from each half alone, ``[2, S]`` (None if a half is empty)."""
        if bool((self.count == 0).any()):
            return None
        count = self.count[:, None]
        return -self.grad / count + 0.5 * self.ggn_vector / count


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()


def _no_samples(num_samples: int) -> ConfigError:
    return ConfigError(
        f"SOSP saw no samples (asked for {num_samples}): the data yielded no batch @ data"
    )


def gradient_and_ggn_vector(
    space: GateSpace,
    model: nn.Module,
    batches: Iterable[Any],
    curvature: CurvatureFactory,
    tangent: Tensor,
    num_samples: int,
) -> tuple[GateStatistics, OutputCurvature | None]:
    """Accumulate g and G·t (the SOSP-H quantities) over ``num_samples`` samples.

    Per batch: one dual-number forward with tangent t gives the outputs f and u = A·t; then
    w = Λu and two vector-Jacobian products from the same graph give Σₙ Aₙᵀwₙ and Σₙ Aₙᵀrₙ.

    Args:
        space: the gate space (the model as a function of its gates).
        model: the model (its modes are set to eval for the duration, then restored).
        batches: ``(inputs, targets)`` batches.
        curvature: builds the loss's :class:`OutputCurvature` from the first batch.
        tangent: t, ``[S]``.
        num_samples: N.

    Returns:
        The per-half sums (summed over ranks) and the output curvature used (None on a rank
        whose data slices were all empty).

    """
    device = tangent.device
    dtype = _model_dtype(model)
    size = space.size
    grad = torch.zeros(2, size, dtype=torch.float64, device=device)
    ggn = torch.zeros(2, size, dtype=torch.float64, device=device)
    count = torch.zeros(2, dtype=torch.float64, device=device)
    lam: OutputCurvature | None = None
    t = tangent.to(dtype)
    with evaluation(model):
        for x, y, half in take_samples(batches, num_samples, device):
            gates = torch.ones(size, dtype=dtype, device=device, requires_grad=True)
            with fwAD.dual_level():
                out = space.forward(_make_dual(gates, t), x)
                primal, jvp = fwAD.unpack_dual(out)
            if jvp is None:  # the outputs do not depend on the gates
                jvp = torch.zeros_like(primal)
            if lam is None:
                lam = curvature(primal.detach(), y)
            w = lam.apply(primal.detach(), y, jvp.detach())
            r = lam.residual(primal.detach(), y)
            if primal.requires_grad:
                gw = torch.autograd.grad(primal, gates, (w,), retain_graph=True)[0]
                gr = torch.autograd.grad(primal, gates, (r,))[0]
            else:
                gw = gr = torch.zeros(size, dtype=dtype, device=device)
            ggn[half] += gw.double()
            grad[half] += gr.double()
            count[half] += x.shape[0]
    return _reduced(grad, ggn, count, num_samples), lam


def _reduced(grad: Tensor, product: Tensor, count: Tensor, num_samples: int) -> GateStatistics:
    """Per-half sums ``[2, S]`` of g and a curvature-vector product, summed over ranks in one
    all-reduce.

    Raises:
        ConfigError: no rank saw a sample.
    """
    size = grad.shape[1]
    packed = _all_reduce_(torch.cat([grad.reshape(-1), product.reshape(-1), count]))
    grad, product, count = packed[: 2 * size], packed[2 * size : 4 * size], packed[4 * size :]
    if float(count.sum()) == 0:
        raise _no_samples(num_samples)
    return GateStatistics(grad.reshape(2, size), product.reshape(2, size), count)


def gradient_and_hessian_vector(
    space: GateSpace,
    model: nn.Module,
    batches: Iterable[Any],
    curvature: CurvatureFactory,
    tangent: Tensor,
    num_samples: int,
) -> tuple[GateStatistics, OutputCurvature | None]:
    """Accumulate g and the exact H·t, H = ∂²L/∂m² (SOSP-H with the full Hessian).

    Per batch: a forward with the gates as leaves, rₙ = ∂ℓₙ/∂fₙ kept in the graph, the
    gradient Σₙ Aₙᵀrₙ with ``create_graph``, and one more reverse pass with cotangent t
    (double backward). H·t = G·t + (1/N)·Σₙ Σ_c rₙ,c ∇²fₙ,c·t: unlike
    :func:`gradient_and_ggn_vector` it keeps the residual term the Gauss-Newton matrix drops.
    The returned :class:`GateStatistics` holds H·t in its ``ggn_vector`` field.
    """
    device = tangent.device
    dtype = _model_dtype(model)
    size = space.size
    grad = torch.zeros(2, size, dtype=torch.float64, device=device)
    hvp = torch.zeros(2, size, dtype=torch.float64, device=device)
    count = torch.zeros(2, dtype=torch.float64, device=device)
    lam: OutputCurvature | None = None
    t = tangent.to(dtype)
    with evaluation(model):
        for x, y, half in take_samples(batches, num_samples, device):
            gates = torch.ones(size, dtype=dtype, device=device, requires_grad=True)
            with torch.enable_grad():
                out = space.forward(gates, x)
                if lam is None:
                    lam = curvature(out.detach(), y)
                if out.requires_grad:
                    r = lam.residual(out, y)
                    gr = torch.autograd.grad(out, gates, (r,), create_graph=True)[0]
                    if gr.requires_grad:
                        hv = torch.autograd.grad(gr, gates, (t,), allow_unused=True)[0]
                    else:
                        hv = None
                    hv = torch.zeros_like(gr) if hv is None else hv
                else:
                    gr = hv = torch.zeros(size, dtype=dtype, device=device)
            hvp[half] += hv.detach().double()
            grad[half] += gr.detach().double()
            count[half] += x.shape[0]
    return _reduced(grad, hvp, count, num_samples), lam


def quadratic_form(
    space: GateSpace,
    model: nn.Module,
    batches: Iterable[Any],
    curvature: OutputCurvature | None,
    direction: Tensor,
    num_samples: int,
) -> Tensor:
    """tᵀGt = (1/N)·Σₙ (Aₙt)ᵀΛₙ(Aₙt) from forward-mode passes only (float64, 0-dim)."""
    device = direction.device
    dtype = _model_dtype(model)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    t = direction.to(dtype)
    with evaluation(model), torch.no_grad():
        for x, y, _ in take_samples(batches, num_samples, device):
            with fwAD.dual_level():
                out = space.forward(_make_dual(torch.ones_like(t), t), x)
                primal, jvp = fwAD.unpack_dual(out)
            if jvp is not None and curvature is not None:
                total[0] += (jvp * curvature.apply(primal, y, jvp)).sum().double()
            total[1] += x.shape[0]
    _all_reduce_(total)
    if total[1] == 0:
        raise _no_samples(num_samples)
    return total[0] / total[1]


@attrs.define
class StructureGGN:
    """The explicit gate-space quantities of SOSP-I.

    Attributes:
        matrix: Q = G = (1/N)·Σₙ AₙᵀΛₙAₙ, ``[S, S]``.
        grad: g = ∂L/∂m, ``[S]`` float64 (q = −g).
        halves: G𝟙 and g from each half of the batches, ``[2, 2, S]`` float64 (sums, not
            means: ``halves[h, 0]`` = Σ AᵀΛA𝟙, ``halves[h, 1]`` = Σ Aᵀr), for the stability check.
        count: samples per half, ``[2]`` float64.
        mode: ``"reverse"`` or ``"forward"``, how the Jacobians were formed.

    """

    matrix: Tensor
    grad: Tensor
    halves: Tensor
    count: Tensor
    mode: str

    def half_saliencies(self) -> Tensor | None:
        """−g + ½·G𝟙 from each half alone, ``[2, S]`` (None if a half is empty)."""
        if bool((self.count == 0).any()):
            return None
        count = self.count[:, None]
        return -self.halves[:, 1] / count + 0.5 * self.halves[:, 0] / count


def choose_jacobian_mode(choice: str, num_outputs: int, size: int) -> str:
    """``reverse`` (C VJPs per sample) or ``forward`` (S JVPs per batch): the fewer passes."""
    if choice != "auto":
        return choice
    return "reverse" if num_outputs <= size else "forward"


def structure_ggn(
    space: GateSpace,
    model: nn.Module,
    batches: Iterable[Any],
    curvature: CurvatureFactory,
    num_samples: int,
    *,
    device: torch.device,
    mode: str = "auto",
    dtype: torch.dtype = torch.float32,
    max_jacobian_elements: int = 1 << 22,
) -> tuple[StructureGGN, OutputCurvature]:
    """Accumulate the S×S gate-space Gauss-Newton matrix and the gradient (SOSP-I).

    The per-sample Jacobians Aₙ ``[B, C, S]`` come from ``torch.func.jacrev`` (the B·C output
    rows, each one reverse pass, vectorised) or ``torch.func.jacfwd`` (the S gate directions,
    each one forward-mode pass over the whole batch), whichever needs fewer passes
    (:func:`choose_jacobian_mode`); batches are split so a chunk's Jacobian holds at most
    ``max_jacobian_elements`` numbers. Then ΛA is applied per sample and
    Q += Σₙ AₙᵀΛₙAₙ, g += Σₙ Aₙᵀrₙ, as batched contractions.
    """
    mdtype = _model_dtype(model)
    size = space.size
    q = torch.zeros(size, size, dtype=dtype, device=device)
    halves = torch.zeros(2, 2, size, dtype=torch.float64, device=device)
    count = torch.zeros(2, dtype=torch.float64, device=device)
    lam: OutputCurvature | None = None
    chosen = "reverse"
    rows = 1
    ones = torch.ones(size, dtype=mdtype, device=device)
    with evaluation(model):
        for x, y, half in take_samples(batches, num_samples, device):
            if lam is None:
                with torch.no_grad():
                    probe = space.forward(ones, x[:1])
                lam = curvature(probe, y[:1])
                chosen = choose_jacobian_mode(mode, probe.shape[1], size)
                rows = max(1, max_jacobian_elements // (probe.shape[1] * size))
            for start in range(0, x.shape[0], rows):
                xs, ys = x[start : start + rows], y[start : start + rows]
                jac, out = _jacobian(space, xs, ones, chosen)  # [B, C, S], [B, C]
                la = lam.apply(out, ys, jac)
                q += torch.einsum("bcs,bct->st", jac, la).to(dtype)
                r = lam.residual(out, ys)
                halves[half, 0] += torch.einsum("bcs,bc->s", la, jac.sum(2)).double()
                halves[half, 1] += torch.einsum("bc,bcs->s", r, jac).double()
            count[half] += x.shape[0]
    _all_reduce_(q)
    packed = _all_reduce_(torch.cat([halves.reshape(-1), count]))
    halves, count = packed[: 4 * size].reshape(2, 2, size), packed[4 * size :]
    n = count.sum()
    if float(n) == 0:
        raise _no_samples(num_samples)
    result = StructureGGN(
        matrix=q / n.to(dtype), grad=halves[:, 1].sum(0) / n, halves=halves, count=count,
        mode=chosen,
    )
    return result, lam  # type: ignore[return-value]  # None only on a rank without samples


def _jacobian(space: GateSpace, x: Tensor, ones: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Per-sample gate Jacobians ``[B, C, S]`` and the outputs ``[B, C]`` of the chunk ``x``.

    Reverse mode vectorises C vector-Jacobian products per sample over the samples
    (``vmap`` of ``jacrev`` on single-sample batches), so each pass touches one sample's
    activations; forward mode pushes the S gate directions through the whole batch at once
    (``jacfwd``), each pass giving every sample's column.
    """
    if mode == "reverse":
        def single(gates: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
            out = space.forward(gates, sample.unsqueeze(0)).squeeze(0)
            return out, out.detach()

        per_sample = torch.func.jacrev(single, has_aux=True)
        jac, out = torch.func.vmap(per_sample, in_dims=(None, 0))(ones, x)
        return jac.detach(), out

    def batch(gates: Tensor) -> tuple[Tensor, Tensor]:
        out = space.forward(gates, x)
        return out, out.detach()

    jac, out = torch.func.jacfwd(batch, has_aux=True)(ones)
    return jac.detach(), out


def _make_dual(primal: Tensor, tangent: Tensor) -> Tensor:
    """``fwAD.make_dual``, without the FutureWarning torch's first call prints.

    The first dual tensor makes torch register its forward-mode decompositions with
    ``torch.jit.script``, which warns that it is deprecated: torch's own business, not the
    user's, so that one warning is silenced here (others pass through).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
        )
        return fwAD.make_dual(primal, tangent)

