"""Queries on the inverse of damped Kronecker products, F_l = λI + G_l ⊗ A_l, batched over layers.

For a weight W_l of shape ``[o, i]`` (a Conv2d weight ``[o, c, kh, kw]`` read as ``[o, c·kh·kw]``)
flattened row-major, as curvprune's layout does, K-FAC's block is G_l ⊗ A_l: G_l (o×o) is the
covariance of the gradients w.r.t. the layer's outputs, A_l (i×i) that of its inputs (Martens &
Grosse, ICML 2015, Eq. 1-2; curvlinops writes A⊗G for the column-stacked vec). A bias is the case
i = 1, A_l = [1]. With the eigendecompositions A = U_a diag(s_a) U_aᵀ and G = U_g diag(s_g) U_gᵀ,

    (λI + G⊗A)⁻¹ = (U_g⊗U_a) diag(1/(s_g⊗s_a + λ)) (U_g⊗U_a)ᵀ

(the damped inverse in the Kronecker-factored eigenbasis, Grosse et al. 2023, Eq. 21), so with
R[j, k] = 1/(s_g[j]·s_a[k] + λ):

* product: F_l⁻¹ vec(V) = vec(U_g (R ∘ (U_gᵀ V U_a)) U_aᵀ), four GEMMs;
* diagonal: [F_l⁻¹]_(p,q),(p,q) = Σ_jk U_g[p,j]² R[j,k] U_a[q,k]², i.e. (U_g∘U_g) R (U_a∘U_a)ᵀ;
* entries: [F_l⁻¹]_(p,q),(p',q') = Σ_jk U_g[p,j] U_g[p',j] R[j,k] U_a[q,k] U_a[q',k].

With ``split = "pi"`` (Martens & Grosse, ICML 2015, Sec. 6.3; WoodFisher's K-FAC baseline,
``utils/kfac_fisher_utils.py`` ``inv_covs``) the damping goes into the factors instead,
(G + √λ/π·I) ⊗ (A + π√λ·I) with π = sqrt((tr A/dim A)/(tr G/dim G)) per layer, so
R[j, k] = 1/((s_g[j] + √λ/π)(s_a[k] + π√λ)): the same eigenvectors, another scale. A layer
whose A or G has zero trace gets π = 1 (the reference divides by zero there).

Layers with the same factor shapes are stacked and handled by one batched call; the only Python
loop runs over the distinct shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

__all__ = ["KroneckerGroup", "KroneckerInverse", "pi_correction"]


@attrs.frozen(eq=False)
class KroneckerGroup:
    """Layers whose factors have the same shapes, stacked.

    Attributes:
        params: the parameter indices (in layout order) of the stacked layers, ``[L]``.
        index: flat coordinates of each layer's weights, row-major ``[L, o·i]``.
        u_g: eigenvectors of the G factors, ``[L, o, o]``.
        u_a: eigenvectors of the A factors, ``[L, i, i]``.
        scale: R = 1/(s_g ⊗ s_a + λ), ``[L, o, i]``.
    """

    params: Tensor
    index: Tensor
    u_g: Tensor
    u_a: Tensor
    scale: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(o, i)."""
        return int(self.u_g.shape[-1]), int(self.u_a.shape[-1])


def symmetric_eigh(stack: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of a batch of symmetric matrices, in ``stack``'s dtype.

    LAPACK's float32 ``syevd`` can fail to converge on the factors of a few samples: an input
    factor A of a wide conv layer (i = C·k² in the thousands) from 32 images has rank ≪ i and a
    cluster of eigenvalues at 0 (``torch.linalg.eigh`` raises "ill-conditioned or has too many
    repeated eigenvalues", seen on resnet18 at m = 32). Then each matrix of the batch is redone
    alone, and one that fails again in float64, which resolves such clusters: one float64
    matrix at a time, so the fallback adds at most the largest factor in float64 (on resnet18,
    m = 32, the whole step's peak stayed within 3 % of ``plan``). A matrix that fails even there is shifted by ε·‖A‖_F·I (ε the float64 machine
    epsilon; eigenvectors unchanged, the shift subtracted from the eigenvalues).
    """
    try:
        return torch.linalg.eigh(stack)
    except torch.linalg.LinAlgError:
        pass
    values, vectors = torch.empty_like(stack[..., 0]), torch.empty_like(stack)
    for k, matrix in enumerate(stack):  # the rare failure path: one matrix at a time
        try:
            values[k], vectors[k] = torch.linalg.eigh(matrix)
            continue
        except torch.linalg.LinAlgError:
            pass
        wide = matrix.double()
        try:
            s, u = torch.linalg.eigh(wide)
        except torch.linalg.LinAlgError:
            shift = torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(wide).clamp_min(1.0))
            eye = torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
            s, u = torch.linalg.eigh(wide + shift * eye)  # not in place: wide may be the input
            s = s - shift
        values[k], vectors[k] = s.to(stack.dtype), u.to(stack.dtype)
        del wide, s, u
    return values, vectors


def pi_correction(g_stack: Tensor, a_stack: Tensor) -> Tensor:
    """π = sqrt((tr A/dim A)/(tr G/dim G)) per layer of ``[n, o, o]``, ``[n, i, i]`` stacks.

    1 where either trace is not positive (a dead layer): the split is then √λ to each factor.
    """
    mean_a = torch.diagonal(a_stack, dim1=-2, dim2=-1).mean(-1)
    mean_g = torch.diagonal(g_stack, dim1=-2, dim2=-1).mean(-1)
    ok = (mean_a > 0) & (mean_g > 0)
    ratio = torch.where(ok, mean_a / torch.where(ok, mean_g, 1.0), 1.0)
    return ratio.sqrt()


class KroneckerInverse:
    """(λI + blockdiag_l(G_l ⊗ A_l))⁻¹ over a flat vector of d weights.

    Args:
        factors: ``(G_l, A_l)`` per parameter in layout order; G_l ``[o, o]``, A_l ``[i, i]``
            with o·i the parameter's size (A_l = ``[[1]]`` for a bias). Symmetric PSD.
        damping: λ > 0.
        dtype: the dtype of the eigendecompositions and every query.
        split: ``"exact"``: λI added to the Kronecker product; ``"pi"``: the π-corrected
            split into the factors (module docstring).
    """

    def __init__(
        self, factors: Sequence[tuple[Tensor, Tensor]], damping: float, dtype: torch.dtype,
        split: str = "exact",
    ) -> None:
        if split not in ("exact", "pi"):
            raise ValueError(f"split must be 'exact' or 'pi', got {split!r}")
        if not factors:
            raise ValueError("KroneckerInverse needs at least one (G, A) pair")
        self.damping = float(damping)
        self.sizes = tuple(int(g.shape[0]) * int(a.shape[0]) for g, a in factors)
        self.d = sum(self.sizes)
        offsets = torch.tensor([0, *self.sizes]).cumsum(0)[:-1].tolist()
        by_shape: dict[tuple[int, int], list[int]] = {}
        for p, (g, a) in enumerate(factors):
            by_shape.setdefault((int(g.shape[0]), int(a.shape[0])), []).append(p)
        self.groups: list[KroneckerGroup] = []
        for (o, i), members in by_shape.items():
            g_stack = torch.stack([factors[p][0] for p in members]).to(dtype)
            a_stack = torch.stack([factors[p][1] for p in members]).to(dtype)
            device = g_stack.device
            s_g, u_g = symmetric_eigh(g_stack)
            s_a, u_a = symmetric_eigh(a_stack)
            # The factors are PSD; clamp the round-off below zero so every s_g·s_a + λ ≥ λ.
            s_g, s_a = s_g.clamp_min(0), s_a.clamp_min(0)
            if split == "exact":
                scale = (s_g[:, :, None] * s_a[:, None, :] + self.damping).reciprocal()
            else:
                pi = pi_correction(g_stack, a_stack)[:, None]
                root = self.damping**0.5
                scale = ((s_g + root / pi)[:, :, None] * (s_a + root * pi)[:, None, :]).reciprocal()
            starts = torch.tensor([offsets[p] for p in members], device=device)
            index = starts[:, None] + torch.arange(o * i, device=device)
            self.groups.append(KroneckerGroup(
                params=torch.tensor(members, device=device), index=index, u_g=u_g, u_a=u_a,
                scale=scale,
            ))
        self.device = self.groups[0].u_g.device
        self.dtype = dtype
        self.param_of = torch.repeat_interleave(
            torch.arange(len(self.sizes), device=self.device),
            torch.tensor(self.sizes, device=self.device),
        )
        # For every parameter: its group and its row in that group.
        self._group_of = torch.empty(len(self.sizes), dtype=torch.long, device=self.device)
        self._row_of = torch.empty_like(self._group_of)
        for number, group in enumerate(self.groups):
            self._group_of[group.params] = number
            self._row_of[group.params] = torch.arange(group.params.numel(), device=self.device)

    def memory_bytes(self) -> int:
        """Bytes held: eigenvectors and the scale R of every layer."""
        return sum(
            (g.u_g.numel() + g.u_a.numel() + g.scale.numel()) * g.u_g.element_size()
            + g.index.numel() * g.index.element_size()
            for g in self.groups
        )

    def solve(self, v: Tensor) -> Tensor:
        """F⁻¹v for ``v`` ``[n, d]``: U_g (R ∘ (U_gᵀ V U_a)) U_aᵀ per layer."""
        out = torch.empty_like(v)
        for group in self.groups:
            o, i = group.shape
            x = v[:, group.index].reshape(v.shape[0], -1, o, i).transpose(0, 1)  # [L, n, o, i]
            u_g, u_a = group.u_g[:, None], group.u_a[:, None]
            y = u_g.transpose(-1, -2) @ x @ u_a
            y = y * group.scale[:, None]
            z = u_g @ y @ u_a.transpose(-1, -2)
            out[:, group.index] = z.transpose(0, 1).reshape(v.shape[0], -1, o * i)
        return out

    def diagonal(self) -> Tensor:
        """diag(F⁻¹) ``[d]``: (U_g∘U_g) R (U_a∘U_a)ᵀ per layer."""
        out = torch.empty(self.d, device=self.device, dtype=self.dtype)
        for group in self.groups:
            diag = group.u_g.square() @ group.scale @ group.u_a.square().transpose(-1, -2)
            out[group.index] = diag.reshape(group.index.shape)
        return out

    def entries(self, idx: Tensor) -> Tensor:
        """[F⁻¹]_ab for each row of ``idx`` ``[n, k]`` (flat indices of one parameter per row).

        Entries at ``-1`` padding are left arbitrary (finite). Cost O(n·k²·o·i) work and
        O(n·k²·max(o, i)) memory per group of rows: meant for small groups.

        Raises:
            ValueError: a row mixes coordinates of different parameters.
        """
        n, k = idx.shape
        out = torch.zeros(n, k, k, device=self.device, dtype=self.dtype)
        if n == 0 or k == 0:
            return out
        valid = idx >= 0
        first = torch.where(valid.any(1), idx.masked_fill(~valid, self.d).min(1).values, 0)
        filled = torch.where(valid, idx, first[:, None])  # padding reads the row's first entry
        param = self.param_of[filled]
        if bool((param != param[:, :1]).any()):
            raise ValueError(
                "kfac's blocks are whole parameters: each row of idx must hold coordinates of "
                "one parameter"
            )
        row_param = param[:, 0]
        row_group = self._group_of[row_param]
        offsets = torch.tensor([0, *self.sizes], device=self.device).cumsum(0)
        for number, group in enumerate(self.groups):
            rows = (row_group == number).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            o, i = group.shape
            layer = self._row_of[row_param[rows]]  # [r]
            local = filled[rows] - offsets[row_param[rows]][:, None]  # [r, k]
            p, q = local // i, local % i
            u_g = group.u_g[layer[:, None], p]  # [r, k, o]: rows U_g[p, :]
            u_a = group.u_a[layer[:, None], q]  # [r, k, i]: rows U_a[q, :]
            pair_a = (u_a[:, :, None, :] * u_a[:, None, :, :]).reshape(rows.numel(), k * k, i)
            pair_g = (u_g[:, :, None, :] * u_g[:, None, :, :]).reshape(rows.numel(), k * k, o)
            weighted = pair_a @ group.scale[layer].transpose(-1, -2)  # [r, k², o]
            out[rows] = (weighted * pair_g).sum(-1).reshape(rows.numel(), k, k)
        return out
