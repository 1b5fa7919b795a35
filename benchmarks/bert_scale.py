"""BERT one-shot M-FAC (static, bfloat16 storage) on one machine: one process against two ranks.

``transformers.BertForSequenceClassification`` built from a config (random weights, no
download; ``--layers`` encoder layers of BERT-base width, 768 hidden, 12 heads, 3072 MLP),
every ``nn.Linear`` weight and bias selected, M-FAC static unblocked (``block_size = None``:
coupled sharding, the m×m Gram an all-reduce of per-shard Grams) with ``storage_dtype =
"bfloat16"``, ``--num-grads`` gradients of ``--mini-batch`` random token sequences each (M-FAC's
default 32), one step to 50 %
with a global OBS mask, through ``curvprune.Pipeline``:

* **one process** with ``--threads`` torch threads;
* **two gloo processes** with one thread each and ``[prune] shard = "auto"``: each rank holds
  its columns of G, and scores, selects and updates its own columns (scoring on the owners,
  ``curvprune.pipeline.owned``).

For each it prints the plan's per-rank total against the measured growth of the resident set
over the prune (``VmHWM`` reset before it, minus the resident set before it), and the wall
time. BERT-base itself (12 layers) plans 11.79 GiB per rank at 2 ranks, which two ranks on
one 24 GiB machine cannot hold beside each other; the default here is 4 layers (d = 29 M)::

    python benchmarks/bert_scale.py --only two       # 4 layers, m = 128, two ranks
    python benchmarks/bert_scale.py --only one       # the same, one process
    python benchmarks/bert_scale.py --quick          # 1 layer, m = 8, 32 tokens: smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from curvprune import Pipeline

from _machine import describe
from _scale import measure_prune, run_sides

HEADLINE = r"^ratio .*$"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=4, help="encoder layers (BERT-base: 12)")
    parser.add_argument("--num-grads", type=int, default=128, help="per-sample gradients m")
    parser.add_argument("--tokens", type=int, default=64, help="sequence length")
    parser.add_argument("--mini-batch", type=int, default=32,
                        help="samples per gradient (M-FAC's fisher_mini_batch)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process")
    parser.add_argument("--chunk", type=int, default=2, help="[prune] gradient_chunk")
    parser.add_argument("--only", choices=("one", "two"), help="run one side only")
    parser.add_argument("--quick", action="store_true",
                        help="1 layer, m = 8 gradients of 2 samples, 32 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.num_grads, args.tokens, args.mini_batch = 1, 8, 32, 2
    return args


class RandomTokens:
    """``n`` random token sequences in batches of 16, the same on every pass and rank."""

    def __init__(self, n: int, tokens: int, vocab: int) -> None:
        self.n, self.tokens, self.vocab = n, tokens, vocab

    def __iter__(self):
        gen = torch.Generator().manual_seed(1)
        for start in range(0, self.n, 16):
            k = min(16, self.n - start)
            yield (torch.randint(0, self.vocab, (k, self.tokens), generator=gen),
                   torch.randint(0, 2, (k,), generator=gen))


def _model(layers: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=layers, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


def _prune(args: argparse.Namespace, world: int) -> dict[str, Any]:
    model = _model(args.layers)
    data = RandomTokens(args.num_grads * args.mini_batch, args.tokens, model.config.vocab_size)
    pipeline = Pipeline.from_config({
        "estimator": {"name": "mfac", "algorithm": "static", "block_size": None,
                      "num_grads": args.num_grads, "fisher_mini_batch": args.mini_batch,
                      "storage_dtype": "bfloat16", "damping": 1e-4},
        "scorer": {"name": "obs"}, "schedule": {"name": "oneshot"}, "mask": {"name": "global"},
        "prune": {"sparsity": 0.5, "loss_samples": 0, "gradient_chunk": args.chunk,
                  "targets": ["Linear"]},
    })
    return measure_prune(pipeline, model, data, world)


def _worker(rank: int, world_size: int, argv: list[str]) -> dict[str, Any]:
    return _prune(parse_args(argv), world_size)


def main(argv: Sequence[str] | None = None) -> int:
    import transformers

    args = parse_args(argv)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; BERT "
          f"{args.layers} layers × 768, m = {args.num_grads}, {args.tokens} tokens, chunks of "
          f"{args.chunk}, mfac static unblocked bfloat16 (gradients of {args.mini_batch} "
          "samples), 50 % global")
    print()
    return run_sides(args, argv, _prune, _worker)


if __name__ == "__main__":
    sys.exit(main())
