"""Gradients of the selected parameters, as rows of a ``[k, d]`` matrix.

Per-sample gradients come from ``torch.func``: ``vmap(grad(functional_call))`` over chunks of
samples, so one chunk costs about one batched backward pass instead of k separate ones. When
every selected parameter is the weight or bias of an ``nn.Linear`` in a model made of torch.nn's
own modules (an MLP as ``nn.Sequential``), the rows come in closed form instead: one batched
forward and backward give each layer's inputs x and output gradients g, and row r of W is
Σₜ gᵣₜ ⊗ xᵣₜ, written by one batched GEMM straight into the parameter's columns of the ``[k, d]``
buffer (no per-parameter gradients to flatten; the same rows as ``vmap`` up to round-off, about
2× faster on an MLP 784-300-100-10, docs/benchmarks.md "Peers"). With
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

That deferred check is the only finiteness check of a chunk on the pipeline's path. Every chunk
:meth:`GradientSource.iter_grads` yields is tagged with its source, and an estimator's
``update`` asks :meth:`GradientSource.covering` whether a chunk is covered: if so it skips its own
pass over the chunk and runs the source's :meth:`~GradientSource.check_finite` (O(d), one host
sync) before its first query instead; chunks from anywhere else (a user calling ``update``
directly, a dtype or device conversion, a slice) carry no tag and are checked by the estimator
when fed. The pipeline calls :meth:`~GradientSource.check_finite` itself after collecting, so a
NaN or Inf still ends the step with the one-line error naming the parameter, before any query
and with the model untouched.

Under torch.distributed (:mod:`curvprune.distributed`) every rank reads the same samples and
regroups them into the same chunks; rank r computes chunks r, r + W, r + 2W, … (W ranks). With
``gather=True`` the chunks are all-gathered so that every rank yields every chunk in the
single-process order; otherwise each rank yields its own chunks and :meth:`synchronize` sums the
running sums. Sampled labels (true Fisher) use one generator per chunk, seeded from the given
generator and the chunk's index, so they do not depend on which rank computes the chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from curvprune.errors import ConfigError, CurvpruneError, NumericalError
from curvprune.tensors import distributed
from curvprune.tensors.gradient_rounds import COVERED_BY, RoundExchange
from curvprune.tensors.layout import ParamLayout
from curvprune.tensors.linear_rows import (
    LinearFactors,
    NotClosedForm,
    linear_factors,
    linear_owners,
)
from curvprune.tensors.sample_chunks import sample_chunks

__all__ = ["GradientSource", "LossFn", "default_chunk_size", "default_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Gradient bytes one chunk may hold at most when no chunk size is given (the rows and their
#: work: two copies of the rows, docs/benchmarks.md plan accuracy).
DEFAULT_CHUNK_BYTES = 256 * 2**20
#: Bytes of gradient rows a default chunk aims for: per-sample gradients are memory-bound, and
#: chunks that stay in cache are ~1.5× faster than larger ones (docs/benchmarks.md).
CACHE_CHUNK_BYTES = 8 * 2**20


def default_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Mean cross-entropy, for classifiers and causal language models.

    * Classification: ``outputs`` ``[N, C]`` (or an object with ``.logits``), targets ``[N]``.
    * Causal language models (Hugging Face ``...ForCausalLM``): ``outputs.logits`` ``[N, T, V]``
      and token ids ``[N, T]`` as targets (the inputs themselves): the next-token loss, the
      logits at position t scored against token t + 1, averaged over the N·(T − 1) positions.

    Raises:
        ConfigError: the outputs hold no tensor of logits (pass ``loss_fn`` reading them).
    """
    logits = getattr(outputs, "logits", outputs)
    if not isinstance(logits, Tensor):
        raise ConfigError(
            f"the model returns a {type(outputs).__name__} without logits; pass "
            "loss_fn=lambda outputs, targets: ... reading it @ loss_fn"
        )
    if logits.dim() == 3 and targets.dim() == 2 and tuple(targets.shape) == logits.shape[:2]:
        vocab = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets[:, 1:].reshape(-1))
    return F.cross_entropy(logits, targets)


def default_chunk_size(d: int, fisher_mini_batch: int = 1) -> int:
    """Rows per chunk: about :data:`CACHE_CHUNK_BYTES` of float32 rows, 32 to 256 of them, and
    never more than :data:`DEFAULT_CHUNK_BYTES` of work space nor 4096 samples.

    The floor of 32 rows matters for conv nets with d in the hundreds of thousands: vmap over
    8-sample chunks ran ResNet-20's per-sample gradients ~5× slower than over 64 (measured,
    docs/benchmarks.md, one-shot prune against one epoch)."""
    d = max(d, 1)
    rows = min(max(32, CACHE_CHUNK_BYTES // (4 * d)), 256)
    rows = min(rows, DEFAULT_CHUNK_BYTES // (12 * d), 4096 // fisher_mini_batch)
    return max(1, rows)


class GradientSource(RoundExchange):
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
        chunk_size: rows per vectorised chunk (None: :func:`default_chunk_size`; under
            torch.distributed also at most ⌈num_grads / W⌉, so that every rank gets work).
        micro_batch: with ``fisher_mini_batch`` > 1, run at most this many samples of each
            row's mini-batch through the model at a time and average the micro-batches'
            gradients, weighted by their sizes (None: the whole mini-batch at once). Bounds a
            chunk's activations to ``chunk_size × micro_batch`` samples; exact when the model
            treats samples independently (eval mode: no batch statistics).
        generator: random generator for sampled labels (on the model's device); one draw from
            it seeds the per-chunk generators.
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
        micro_batch: int | None = None,
    ) -> None:
        if fisher_mini_batch < 1:
            raise ConfigError(f"fisher_mini_batch must be >= 1, got {fisher_mini_batch}")
        if fisher not in ("empirical", "true"):
            raise ConfigError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        if micro_batch is not None and micro_batch < 1:
            raise ConfigError(f"micro_batch must be >= 1, got {micro_batch}")
        self.micro_batch = micro_batch
        self.model = model
        self.layout = layout
        self.loss_fn = loss_fn or default_loss
        self.fisher_mini_batch = fisher_mini_batch
        self.fisher = fisher
        self.mask = mask
        # the coordinates to zero in every row, decided once (one host sync here, none per
        # chunk); None while nothing is pruned, so a dense step makes no masking pass at all
        self._pruned = None if mask is None or bool(mask.all()) else ~mask.bool()
        self.generator = generator
        self._chunk_given = chunk_size is not None
        if chunk_size is None:
            chunk_size = default_chunk_size(layout.d, fisher_mini_batch)
        self.chunk_size = chunk_size
        self.samples_used = 0
        self.rows = 0
        self._sum: Tensor | None = None
        self._loss_sum: Tensor | None = None
        self._local = False  # running sums cover this rank's rows only (synchronize pending)
        # (module, "weight" | "bias") per selected parameter when rows come in closed form
        self._closed_form: list[tuple[nn.Linear, str]] | None = None

    # -- main entry point ------------------------------------------------------------------------
    def iter_grads(
        self,
        batches: Iterable[Any],
        num_grads: int,
        *,
        gather: bool = False,
        columns: Sequence[tuple[int, int]] | None = None,
    ) -> Iterator[Tensor]:
        """Yield chunks ``[k, d]`` (the parameters' dtype and device), ``num_grads`` rows in all.

        Args:
            batches: an iterable of ``(inputs, targets)`` batches; re-iterated from the start if
                it runs out (a DataLoader), or an error if it cannot be (an iterator). Under
                torch.distributed every rank must pass the same, unsharded batches (checked on
                the first chunk).
            num_grads: total number of gradient rows (over all ranks).
            gather: under torch.distributed, yield every rank's chunks on every rank, in the
                single-process order (``num_grads`` rows on each rank). False: yield only this
                rank's chunks (about ``num_grads / W`` rows), then call :meth:`synchronize`.
                Ignored in a single process.
            columns: under torch.distributed, every rank's column range (tiling ``[0, d)``):
                each round's chunks are exchanged so that this rank gets its columns of all of
                them (``[rows, hi − lo]`` in the single-process order, one all-to-all per round;
                :class:`curvprune.pipeline.sharding.ShardedEstimator`); the running sums cover
                this rank's own rows (call :meth:`synchronize`). Ignored in a single process.

        Raises:
            ConfigError: the data holds no sample, or runs out and cannot be restarted, or
                differs between ranks.
            CurvpruneError: another rank failed computing its gradients (``gather=True``).
        """
        if num_grads < 1:
            return
        params = dict(self.model.named_parameters())
        selected = {n: params[n].detach() for n in self.layout.names}
        frozen = {n: p.detach() for n, p in params.items() if n not in selected}
        frozen.update(dict(self.model.named_buffers()))
        device = next(iter(selected.values())).device
        size, me = distributed.world_size(), distributed.rank()
        rows_per_chunk = self.chunk_size
        if size > 1 and not self._chunk_given:
            rows_per_chunk = max(1, min(rows_per_chunk, -(-num_grads // size)))
        n_chunks = -(-num_grads // rows_per_chunk)
        label_seed = self._label_seed() if self.fisher == "true" else 0
        compute = self._vectorised(frozen)
        self._closed_form = linear_owners(self.model, self.layout)
        exchange = size > 1 and (gather or columns is not None)
        self._local = size > 1 and (columns is not None or not gather)
        # sharded closed-form rows: ranks exchange each layer's x and g, not the rows
        factors = columns is not None and size > 1 and self._closed_form is not None
        was_training = self.model.training
        self.model.eval()
        try:
            per = self.fisher_mini_batch
            stream = sample_chunks(batches, num_grads * per, rows_per_chunk * per, self._took)
            mine: tuple[Tensor, Tensor, Tensor | None] | None = None
            failure: Exception | None = None
            for j, (xs, ys) in enumerate(stream):
                if size > 1 and j == 0:
                    distributed.check_same_across_ranks(
                        (xs, ys), "the samples for gradients", error=ConfigError, where="data"
                    )
                if j % size == me:
                    try:
                        mine = self._chunk_grads(compute, selected, frozen, xs, ys, device,
                                                 label_seed + j, factors=factors)
                    except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
                        if not exchange:
                            raise
                        failure, mine = exc, None
                if not exchange:
                    if j % size == me:
                        assert mine is not None
                        self._track(*mine)
                        rows, mine = mine[0], None
                        setattr(rows, COVERED_BY, self)
                        yield rows
                        # free this chunk before the next is computed: two copies at the peak
                        # (the next chunk's per-parameter gradients and its rows), not three
                        del rows
                    continue
                if j % size == size - 1 or j == n_chunks - 1:  # end of a round: gather it
                    first = j - j % size
                    counts = [
                        min(rows_per_chunk, num_grads - c * rows_per_chunk) if c < n_chunks else 0
                        for c in range(first, first + size)
                    ]
                    failed, positions = self._agree(failure is not None, mine, factors)
                    if failed:
                        if failure is not None:
                            raise failure
                        raise CurvpruneError(
                            "another rank failed while computing gradients; see its error"
                        )
                    if factors and positions is None:  # a rank fell back to vmap: rows travel
                        if isinstance(mine, LinearFactors):
                            mine = mine.full_rows(self.layout, self._owners)
                        factors, self._closed_form = False, None
                    if factors:
                        assert positions is not None and columns is not None
                        yield from self._factor_round(mine, counts, columns, positions, device)
                    elif columns is not None:  # chunk by chunk, as one process feeds them
                        yield from self._exchange_round(mine, counts, columns, device)
                    else:
                        for flat, losses in self._gather_round(mine, counts, device):
                            self._track(flat, losses)
                            setattr(flat, COVERED_BY, self)
                            yield flat
                    mine = None
        finally:
            self.model.train(was_training)

    @property
    def rows_are_local(self) -> bool:
        """Whether the last :meth:`iter_grads` yielded this rank's rows only (sums not yet
        combined: call :meth:`synchronize`)."""
        return self._local

    def synchronize(self) -> None:
        """Sum the running sums (mean gradient, loss, row count) over all ranks, in place.

        Call it on every rank after iterating :meth:`iter_grads` with ``gather=False`` under
        torch.distributed; then :meth:`mean` and :meth:`check_finite` cover every rank's rows.
        A no-op in a single process, after ``gather=True``, and when called twice.
        """
        if not self._local:
            return
        self._local = False
        d = self.layout.d
        params = self.layout.parameters(self.model)
        dtype, device = params[0].dtype, params[0].device
        column_sum = self._sum
        if column_sum is None:  # this rank computed no chunk
            column_sum = torch.zeros(d, dtype=dtype, device=device)
        loss_sum = self._loss_sum
        if loss_sum is None:
            loss_sum = torch.zeros((), dtype=dtype, device=device)
        packed = torch.cat([
            column_sum.double(), loss_sum.double().reshape(1),
            torch.tensor([float(self.rows)], dtype=torch.float64, device=device),
        ])
        distributed.all_reduce_sum_(packed)
        self._sum = packed[:d].to(column_sum.dtype)
        self._loss_sum = packed[d].to(loss_sum.dtype)
        self.rows = int(packed[d + 1])

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

    @staticmethod
    def covering(chunk: Tensor) -> GradientSource | None:
        """Return the source whose :meth:`check_finite` covers ``chunk``, or None.

        A chunk yielded by :meth:`iter_grads` (the tensor object itself, not a view, slice or
        conversion of it) is covered: its rows are in the running sums that
        :meth:`check_finite` inspects. An estimator fed such a chunk may skip its own
        finiteness pass and call the source's :meth:`check_finite` before answering a query
        (one O(d) check for all chunks instead of one O(k·d) pass per chunk); any other tensor
        gives None and must be checked where it is fed.
        """
        return getattr(chunk, COVERED_BY, None)

    # -- internals ---------------------------------------------------------------------------------
    def _chunk_grads(
        self,
        compute: Callable[..., tuple[dict, Tensor]],
        selected: dict[str, Tensor],
        frozen: dict[str, Tensor],
        xs: Tensor,
        ys: Tensor,
        device: torch.device,
        seed: int,
        *,
        factors: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None] | LinearFactors:
        """Rows ``[k, d]``, per-row losses ``[k]`` and, if already known, the rows' sum ``[d]``.

        With ``factors`` (and the closed form applying) the layers' x and g instead.
        """
        xs, ys = xs.to(device), ys.to(device)
        if self.fisher == "true":
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
            ys = self._sample_labels(xs, selected, frozen, generator)
        b, micro = self.fisher_mini_batch, self.micro_batch
        rows = xs.shape[0] // b
        xs = xs.reshape(rows, b, *xs.shape[1:])
        ys = ys.reshape(rows, b, *ys.shape[1:])
        if factors or micro is None or micro >= b:
            return self._rows_of(compute, selected, frozen, xs, ys, factors=factors)
        # a mini-batch's mean-loss gradient as the weighted mean of its micro-batches' (the
        # activations of rows × micro samples at a time; exact for a sample-wise forward)
        flat = losses = column_sum = None
        sums = True
        for start in range(0, b, micro):
            weight = (min(b, start + micro) - start) / b
            part = slice(start, start + micro)
            f, loss, c = self._rows_of(compute, selected, frozen, xs[:, part], ys[:, part])
            flat = f.mul_(weight) if flat is None else flat.add_(f, alpha=weight)
            losses = loss * weight if losses is None else losses.add_(loss, alpha=weight)
            sums = sums and c is not None
            if sums:
                column_sum = c.mul_(weight) if column_sum is None else column_sum.add_(
                    c, alpha=weight)
            del f, c
        return flat, losses, column_sum if sums else None

    def _rows_of(
        self,
        compute: Callable[..., tuple[dict, Tensor]],
        selected: dict[str, Tensor],
        frozen: dict[str, Tensor],
        xs: Tensor,
        ys: Tensor,
        *,
        factors: bool = False,
    ) -> Any:
        """Rows of the mini-batches ``xs`` ``[rows, b, ...]`` (masked), as :meth:`_chunk_grads`."""
        flat, column_sum = None, None
        if self._closed_form is not None:
            try:
                made = linear_factors(self.model, self.loss_fn, self._closed_form, selected,
                                      frozen, xs, ys)
            except NotClosedForm:  # outputs that are not a tensor: vmap from now on
                self._closed_form = None
            else:
                if factors:
                    return made  # masked when its columns are formed (_factor_round)
                flat, losses, column_sum = made.full_rows(self.layout, self._closed_form)
        if flat is None:
            grads, losses = compute(selected, xs, ys)
            flat = self.layout.flatten([grads[n] for n in self.layout.names])
        if self._pruned is not None:
            if self._pruned.device != flat.device:
                self._pruned = self._pruned.to(flat.device)
            flat.masked_fill_(self._pruned, 0)
            if column_sum is not None:
                column_sum.masked_fill_(self._pruned, 0)
        return flat, losses, column_sum

    def _label_seed(self) -> int:
        """One draw from the generator (the same on every rank: rank 0's is broadcast)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator,
                                 device=self.generator.device if self.generator else "cpu"))
        return int(distributed.broadcast_object(seed))

    def _vectorised(self, frozen: dict[str, Tensor]) -> Callable[..., tuple[dict, Tensor]]:
        model, loss_fn = self.model, self.loss_fn

        def loss_of(selected: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            outputs = functional_call(model, ({**frozen, **selected},), (x,), strict=False)
            return loss_fn(outputs, y)

        return vmap(grad_and_value(loss_of), in_dims=(None, 0, 0))

    def _sample_labels(
        self,
        xs: Tensor,
        selected: dict[str, Tensor],
        frozen: dict[str, Tensor],
        generator: torch.Generator,
    ) -> Tensor:
        with torch.no_grad():
            logits = functional_call(self.model, ({**frozen, **selected},), (xs,), strict=False)
            probs = torch.softmax(logits.float(), dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _took(self, samples: int) -> None:
        self.samples_used += samples

    def _track_losses(self, losses: Tensor) -> None:
        loss_sum = losses.sum()
        if self._loss_sum is None:
            self._loss_sum = loss_sum
        else:
            self._loss_sum += loss_sum
        self.rows += losses.shape[0]

    def _track_columns(self, piece: Tensor, lo: int) -> None:
        if self._sum is None:
            self._sum = torch.zeros(self.layout.d, dtype=piece.dtype, device=piece.device)
        self._sum[lo : lo + piece.shape[1]] += piece.sum(dim=0)

    def _track(self, flat: Tensor, losses: Tensor, column_sum: Tensor | None = None) -> None:
        if column_sum is None:
            column_sum = flat.sum(dim=0)
        if self._sum is None:
            self._sum = column_sum
        else:
            self._sum += column_sum
        self._track_losses(losses)
