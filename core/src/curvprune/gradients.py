"""Gradients of the selected parameters, as rows of a ``[k, d]`` matrix.

Per-sample gradients come from ``torch.func``: ``vmap(grad(functional_call))`` over chunks of
samples, so one chunk costs about one batched backward pass instead of k separate ones. With
``fisher_mini_batch = b > 1`` every row is the gradient of the mean loss over b samples (the
reference codes' "mini-batch Fisher"), still vectorised over rows.

Labels come from the data (empirical Fisher) or are sampled from the model's predictive
distribution (true Fisher, ``fisher = "true"``). The model runs in eval mode (BatchNorm uses its
running statistics; Dropout is off) and its mode is restored afterwards. Gradients of pruned
weights are multiplied by the mask, so a pruned coordinate has g = 0.

The source keeps the running column sum of the rows it yielded (the mean gradient, which
first-order terms need); non-finite values are tracked through it and the per-row losses on the
device, without a host sync per chunk: call :meth:`GradientSource.check_finite` once after
collection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from curvprune.errors import ConfigError, NumericalError
from curvprune.layout import ParamLayout

__all__ = ["GradientSource", "LossFn", "default_chunk_size", "default_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Gradient bytes one chunk may hold at most when no chunk size is given (~3 copies of the rows).
DEFAULT_CHUNK_BYTES = 256 * 2**20
#: Bytes of gradient rows a default chunk aims for: per-sample gradients are memory-bound, and
#: chunks that stay in cache are ~1.5× faster than larger ones (docs/benchmarks.md).
CACHE_CHUNK_BYTES = 8 * 2**20


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy: the loss of classification models."""
    return F.cross_entropy(outputs, targets)


def default_chunk_size(d: int, fisher_mini_batch: int = 1) -> int:
    """Rows per chunk: about :data:`CACHE_CHUNK_BYTES` of float32 rows, 8 to 256 of them, and
    never more than :data:`DEFAULT_CHUNK_BYTES` of work space nor 4096 samples."""
    d = max(d, 1)
    rows = min(max(8, CACHE_CHUNK_BYTES // (4 * d)), 256)
    rows = min(rows, DEFAULT_CHUNK_BYTES // (12 * d), 4096 // fisher_mini_batch)
    return max(1, rows)


class GradientSource:
    """Yields gradients of the selected parameters in ``[k, d]`` chunks.

    Args:
        model: the model (its parameters are read, never modified).
        layout: the selected parameters; rows are flattened in this layout.
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss over a batch (default: cross
            entropy). It must be a pure tensor function (it runs under ``vmap``).
        fisher_mini_batch: samples averaged into one gradient row (1: per-sample gradients).
        fisher: ``"empirical"`` (labels from the data) or ``"true"`` (labels sampled from the
            model's softmax output).
        mask: bool ``[d]`` keep-mask; pruned coordinates of every row are zeroed.
        chunk_size: rows per vectorised chunk (None: :func:`default_chunk_size`).
        generator: random generator for sampled labels (on the model's device).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        loss_fn: LossFn | None = None,
        *,
        fisher_mini_batch: int = 1,
        fisher: Literal["empirical", "true"] = "empirical",
        mask: Tensor | None = None,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if fisher_mini_batch < 1:
            raise ConfigError(f"fisher_mini_batch must be >= 1, got {fisher_mini_batch}")
        if fisher not in ("empirical", "true"):
            raise ConfigError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.layout = layout
        self.loss_fn = loss_fn or default_loss
        self.fisher_mini_batch = fisher_mini_batch
        self.fisher = fisher
        self.mask = mask
        self.generator = generator
        if chunk_size is None:
            chunk_size = default_chunk_size(layout.d, fisher_mini_batch)
        self.chunk_size = chunk_size
        self.samples_used = 0
        self.rows = 0
        self._sum: Tensor | None = None
        self._loss_sum: Tensor | None = None

    # -- main entry point ------------------------------------------------------------------------
    def iter_grads(self, batches: Iterable[Any], num_grads: int) -> Iterator[Tensor]:
        """Yield chunks ``[k, d]`` (the parameters' dtype and device), ``num_grads`` rows in all.

        Args:
            batches: an iterable of ``(inputs, targets)`` batches; re-iterated from the start if
                it runs out (a DataLoader), or an error if it cannot be (an iterator).
            num_grads: total number of gradient rows.

        Raises:
            ConfigError: the data holds no sample, or runs out and cannot be restarted.
        """
        if num_grads < 1:
            return
        params = dict(self.model.named_parameters())
        selected = {n: params[n].detach() for n in self.layout.names}
        frozen = {n: p.detach() for n, p in params.items() if n not in selected}
        frozen.update(dict(self.model.named_buffers()))
        device = next(iter(selected.values())).device
        per_chunk = self.chunk_size * self.fisher_mini_batch
        compute = self._vectorised(frozen)
        was_training = self.model.training
        self.model.eval()
        try:
            produced = 0
            for xs, ys in self._sample_chunks(batches, num_grads * self.fisher_mini_batch, per_chunk):
                xs, ys = xs.to(device), ys.to(device)
                if self.fisher == "true":
                    ys = self._sample_labels(xs, selected, frozen)
                rows = xs.shape[0] // self.fisher_mini_batch
                xs = xs.reshape(rows, self.fisher_mini_batch, *xs.shape[1:])
                ys = ys.reshape(rows, self.fisher_mini_batch, *ys.shape[1:])
                grads, losses = compute(selected, xs, ys)
                flat = self.layout.flatten([grads[n] for n in self.layout.names])
                if self.mask is not None:
                    flat.masked_fill_(~self.mask.to(flat.device), 0)
                self._track(flat, losses)
                produced += rows
                yield flat
        finally:
            self.model.train(was_training)

    def mean(self) -> Tensor:
        """The mean of all rows yielded so far, ``[d]`` (the mean gradient)."""
        if self._sum is None:
            raise ConfigError("no gradient was computed yet")
        return self._sum / self.rows

    def check_finite(self) -> None:
        """Raise :class:`NumericalError` if any gradient or loss seen so far was NaN or infinite.

        One host sync; the message names the first parameters with non-finite gradients.
        A non-finite entry makes its column sum non-finite (NaN propagates, ±inf stays or
        becomes NaN), so the running sum is all that needs checking.
        """
        if self._sum is not None:
            bad_coords = ~torch.isfinite(self._sum)
            if bool(bad_coords.any()):
                index = self.layout.param_index(bad_coords.device)
                bad_params = torch.unique(index[bad_coords]).tolist()
                names = ", ".join(repr(self.layout.names[i]) for i in bad_params[:3])
                raise NumericalError(
                    f"non-finite gradients in {names}; check the inputs, the weights and loss_fn"
                )
        if self._loss_sum is not None and not bool(torch.isfinite(self._loss_sum)):
            raise NumericalError(
                "non-finite loss while collecting gradients; check the inputs, the model's "
                "outputs and loss_fn"
            )

    # -- internals ---------------------------------------------------------------------------------
    def _vectorised(self, frozen: dict[str, Tensor]) -> Callable[..., tuple[dict, Tensor]]:
        model, loss_fn = self.model, self.loss_fn

        def loss_of(selected: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            outputs = functional_call(model, ({**frozen, **selected},), (x,), strict=False)
            return loss_fn(outputs, y)

        return vmap(grad_and_value(loss_of), in_dims=(None, 0, 0))

    def _sample_labels(
        self, xs: Tensor, selected: dict[str, Tensor], frozen: dict[str, Tensor]
    ) -> Tensor:
        with torch.no_grad():
            logits = functional_call(self.model, ({**frozen, **selected},), (xs,), strict=False)
            probs = torch.softmax(logits.float(), dim=-1)
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def _track(self, flat: Tensor, losses: Tensor) -> None:
        column_sum, loss_sum = flat.sum(dim=0), losses.sum()
        if self._sum is None:
            self._sum, self._loss_sum = column_sum, loss_sum
        else:
            self._sum += column_sum
            self._loss_sum += loss_sum
        self.rows += flat.shape[0]

    def _sample_chunks(
        self, batches: Iterable[Any], total: int, per_chunk: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Regroup ``batches`` into chunks of ``per_chunk`` samples, ``total`` samples in all."""
        pending_x: list[Tensor] = []
        pending_y: list[Tensor] = []
        have = 0
        remaining = total
        restartable = not isinstance(batches, Iterator)
        passes = 0
        while remaining > 0:
            seen_in_pass = 0
            for batch in batches:
                x, y = _split_batch(batch)
                seen_in_pass += x.shape[0]
                pending_x.append(x)
                pending_y.append(y)
                have += x.shape[0]
                while have >= min(per_chunk, remaining) and remaining > 0:
                    take = min(per_chunk, remaining)
                    xs, ys = torch.cat(pending_x), torch.cat(pending_y)
                    yield xs[:take], ys[:take]
                    self.samples_used += take
                    pending_x, pending_y = [xs[take:]], [ys[take:]]
                    have -= take
                    remaining -= take
                if remaining <= 0:
                    return
            passes += 1
            if seen_in_pass == 0:
                raise ConfigError("the data holds no sample to compute gradients on @ data")
            if not restartable:
                raise ConfigError(
                    f"the data ran out after {self.samples_used + have} samples; gradients need "
                    f"{total} (num_grads × fisher_mini_batch): pass a re-iterable DataLoader "
                    "or lower num_grads"
                )


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigError(
        f"each batch must be an (inputs, targets) pair, got {type(batch).__name__} @ data"
    )
