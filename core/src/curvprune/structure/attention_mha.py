"""``nn.MultiheadAttention`` whose heads' inner width is not ``embed_dim``.

PyTorch's ``nn.MultiheadAttention`` ties the inner width of its heads to ``embed_dim`` (its
functional form asserts ``head_dim * num_heads == embed_dim``), so a module that lost heads, or
whose input and output width (the residual stream it reads and writes) narrowed, cannot run
through it. :class:`HeadPrunedMultiheadAttention` is the same module (same parameters, same
state-dict keys, ``embed_dim`` the width of its input and output) with a forward that reads the
inner width from ``num_heads * head_dim`` and never from ``embed_dim``: the packed
``in_proj_weight`` is ``[3 * num_heads * head_dim, embed_dim]`` and ``out_proj`` maps
``num_heads * head_dim`` features to ``embed_dim``. Head removal
(:mod:`curvprune.structure.attention`) and stream removal (:func:`narrow_embed`, called by
:mod:`curvprune.structure.removal`) swap a module's class to it in place, each independently of
the other; the computation is the stock one (scaled dot product per head,
``attn_mask`` and ``key_padding_mask`` as boolean "not allowed" or additive float masks,
``batch_first`` either way, unbatched inputs, dropout on the attention weights in training).

It also carries an optional per-head gate (``_head_gate``, ``[num_heads]``) multiplying each
head's output before the output projection: :meth:`curvprune.Structures.gates` uses it for
the loss sensitivity of heads (a gate of 0 is the head removed).

Variants with per-head extra parameters (``add_bias_kv``), ``add_zero_attn`` or separate
``kdim``/``vdim`` projections are refused before a module is ever swapped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HeadPrunedMultiheadAttention", "narrow_embed", "swap_in"]


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose inner width is ``num_heads * head_dim``.

    Never built directly: :func:`curvprune.remove_structures` turns a stock module into one
    (``module.__class__`` swapped, parameters sliced) when it removes heads.
    """

    _head_gate: Tensor | None = None

    def forward(  # noqa: PLR0913 - the stock signature
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention over the kept heads; the stock signature and return value.

        The returned attention weights (``need_weights``) are those of the kept heads (their
        mean over them with ``average_attn_weights``).
        """
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        source = key.shape[1]
        heads, dim = self.num_heads, self.head_dim
        inner = heads * dim
        bias = self.in_proj_bias
        w_q, w_k, w_v = self.in_proj_weight.split(inner)
        b_q, b_k, b_v = bias.split(inner) if bias is not None else (None, None, None)

        def split(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return F.linear(x, w, b).view(x.shape[0], x.shape[1], heads, dim).transpose(1, 2)

        q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
        mask = _merged_mask(attn_mask, key_padding_mask, is_causal, (n, heads, length, source),
                            q.dtype, q.device)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * dim ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, p=dropout) @ v if dropout else weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if self._head_gate is not None:
            out = out * self._head_gate.to(out.dtype).view(1, heads, 1, 1)
        out = out.transpose(1, 2).reshape(n, length, inner)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
                 shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device) -> Tensor | None:
    """One additive float mask broadcastable to ``[N, H, L, S]`` (None without any mask).

    Boolean masks mark positions that may not be attended (True), as in the stock module;
    ``attn_mask`` is ``[L, S]`` or ``[N * H, L, S]``; ``key_padding_mask`` is ``[N, S]``.
    ``is_causal`` without ``attn_mask`` builds the causal mask (with one, it is a hint).
    """
    n, heads, length, source = shape
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=device).triu(1)
    out = None
    for mask, view in ((attn_mask, None), (key_padding_mask, (n, 1, 1, source))):
        if mask is None:
            continue
        mask = _additive(mask, dtype)
        if view is None:
            view = (1, 1, length, source) if mask.dim() == 2 else (n, heads, length, source)
        mask = mask.reshape(view)
        out = mask if out is None else out + mask
    return out


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def swap_in(module: nn.MultiheadAttention) -> Any:
    """Turn ``module`` into a :class:`HeadPrunedMultiheadAttention` in place; its old class."""
    old = type(module)
    if not isinstance(module, HeadPrunedMultiheadAttention):
        module.__class__ = HeadPrunedMultiheadAttention
    return old


def narrow_embed(module: nn.MultiheadAttention, index: Tensor) -> None:
    """Keep the input columns ``index`` of ``module``'s packed in-projection, in place.

    Its input width (``embed_dim``, ``kdim``, ``vdim``) becomes ``len(index)``; the heads, their
    width and ``out_proj`` (sliced as a producer of the stream) are left to their own rules. The
    module becomes a :class:`HeadPrunedMultiheadAttention`, whose forward does not tie
    ``embed_dim`` to ``num_heads * head_dim``; ``_qkv_same_embed_dim`` stays True.
    """
    weight = module.in_proj_weight
    kept = weight.detach().index_select(1, index.to(weight.device)).clone()
    module.in_proj_weight = nn.Parameter(kept, requires_grad=weight.requires_grad)
    module.embed_dim = module.kdim = module.vdim = int(index.numel())
    swap_in(module)
