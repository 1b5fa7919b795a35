"""SparseGPT at GPT-2-small size on this machine: time and peak memory of a 50 % sequential prune.

GPT-2 small's dimensions (12 blocks, width 768, 12 heads, vocabulary 50,257: 124 M parameters),
built locally from ``transformers.GPT2Config()`` with random weights (nothing is downloaded), is
pruned through the pipeline to 50 % unstructured (``layerwise``) with the ``sparsegpt``
estimator and the ``obs`` scorer, sequential calibration over the 12 blocks (the default),
on 128 calibration sequences of 512 tokens (random token ids; the cost does not depend on them).

Measured: wall time of ``Pipeline.prune`` and the process's peak resident memory during it (the
run's own measure, :func:`curvprune.run.measure.peak_memory`), next to what ``plan`` predicts
for the step on top of the model. Run it from the repository root on a quiet machine::

    python benchmarks/sparsegpt_scale.py            # GPT-2 small (several minutes on two cores)
    python benchmarks/sparsegpt_scale.py --quick    # a 2-block toy (smoke run)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from _machine import describe

HEADLINE = r"^ratio\b.*$"
GiB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--tensor-peak", action="store_true",
                        help="also measure the tensors' peak (torch.profiler; slower)")
    args = parser.parse_args(argv)
    import transformers

    from curvprune import Pipeline
    from curvprune.run.measure import peak_memory, reset_peak_rss

    if args.quick:
        cfg = transformers.GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=1000,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
        samples, seq = 8, 64
    else:
        cfg = transformers.GPT2Config()
        samples, seq = args.samples, args.seq
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(
        0, cfg.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(0)
    )
    batches = [(ids[i : i + 8], ids[i : i + 8]) for i in range(0, samples, 8)]
    pipeline = Pipeline.from_config(
        {
            "estimator": {"name": "sparsegpt", "num_grads": samples},
            "scorer": {"name": "obs"},
            "schedule": {"name": "oneshot"},
            "mask": {"name": "layerwise"},
            "prune": {"sparsity": 0.5, "loss_samples": 0},
        }
    )
    plan = pipeline.plan(model, example=batches[0])  # probes the first block on one batch
    print(f"machine: {describe()}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"model: GPT-2 {cfg.n_layer} blocks, width {cfg.n_embd}, {params / 1e6:.1f} M parameters "
        f"({plan.layout.d / 1e6:.1f} M selected); {samples} sequences of {seq} tokens"
    )
    rss_reset = reset_peak_rss()
    before, _ = peak_memory(torch.device("cpu"), rss_reset)
    started = time.perf_counter()
    tensor_peak = None
    if args.tensor_peak:
        from curvprune.pipeline.memprobe import peak_allocated

        result, tensor_peak = peak_allocated(lambda: pipeline.prune(model, batches))
    else:
        result = pipeline.prune(model, batches)
    seconds = time.perf_counter() - started
    peak, how = peak_memory(torch.device("cpu"), rss_reset)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step = result.steps[-1]
    print()
    print("| measure | value |")
    print("|---|---:|")
    print(f"| prune wall time | {seconds:.0f} s |")
    print(
        f"| of which fitting H / sweeps / writing and propagating | {step.times['gradients']:.0f} / "
        f"{step.times['scores']:.0f} / {step.times['update']:.0f} s |"
    )
    print(f"| peak memory ({how}) | {peak / GiB:.2f} GiB |")
    print(f"| model parameters (float32) | {model_bytes / GiB:.2f} GiB |")
    print(f"| plan: step on top of the model | {plan.total_bytes / GiB:.2f} GiB |")
    for part, size in plan.memory.items():
        print(f"| plan part: {part} | {size / GiB:.3f} GiB |")
    if tensor_peak is not None:
        print(f"| tensors' peak during the prune (torch.profiler) | {tensor_peak / GiB:.2f} GiB |")
    print(f"| sparsity reached | {step.sparsity:.4f} |")
    print()
    print(
        f"ratio peak memory / 4 GiB budget: {peak / (4 * GiB):.2f}; wall time / 15 min: "
        f"{seconds / 900:.2f} (before the prune the process held {before / GiB:.2f} GiB)"
    )
    if tensor_peak is not None:
        print(f"ratio tensors' peak / plan: {tensor_peak / plan.total_bytes:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
