"""Layer-wise pruning of a small GPT-2 trained here: held-out perplexity of SparseGPT, WANDA, magnitude.

A GPT-2-style model (4 blocks, width 128, 4 heads, context 128) is trained from scratch on a
text corpus found on the machine: the Vim user manual (``/usr/share/vim/vim*/doc/usr_*.txt``,
English prose by Bram Moolenaar, about 1.5 MB), or, where Vim is not installed, the Python
standard library's ``.py`` sources. A byte-level BPE tokenizer (1,024 tokens) is trained on the
training text with ``tokenizers`` (shipped with transformers; no download). The token stream is
split 90 / 10: training sequences from the first part, held-out perplexity on the last.

The trained model is then pruned through the pipeline (``Pipeline.from_config(...).prune``) at
50 % unstructured (``layerwise`` mask) and 2:4 (``nm`` mask), every Linear/Conv1D of the blocks,
on 64 calibration sequences of the training part:

* ``magnitude``: |w| (no data);
* ``wanda``: |w|·‖x‖ with the dense model's inputs, compared within each output row (the
  paper's defaults: one pass, ``[mask] scope = "row"``);
* ``sparsegpt``: the ``sparsegpt`` estimator with the ``obs`` scorer, sequential calibration
  (the paper's setting).

Run it from the repository root::

    python benchmarks/sparsegpt_lm.py            # full (a few minutes on two cores)
    python benchmarks/sparsegpt_lm.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

from _machine import describe

HEADLINE = r"^ratio\b.*$"


def corpus() -> tuple[str, str]:
    """The training text and where it came from."""
    manuals = sorted(Path("/usr/share/vim").glob("vim*/doc/usr_*.txt"))
    if manuals:
        return "\n".join(
            p.read_text(errors="replace") for p in manuals
        ), f"Vim user manual ({len(manuals)} files)"
    stdlib = (
        Path(torch.__file__).resolve().parents[1].parent
    )  # site-packages' parent: lib/python3.x
    sources = sorted(p for p in stdlib.glob("*.py"))[:200]
    return "\n".join(
        p.read_text(errors="replace") for p in sources
    ), f"Python stdlib sources ({len(sources)} files)"


def tokenize(text: str, vocab: int) -> tuple[torch.Tensor, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    cut = int(len(text) * 0.9)  # the tokenizer never sees the held-out text
    tok.train_from_iterator([text[:cut]], trainer)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    return ids, tok.get_vocab_size()


def sequences(ids: torch.Tensor, seq: int) -> torch.Tensor:
    n = ids.numel() // seq
    return ids[: n * seq].view(n, seq)


def perplexity(model: torch.nn.Module, held: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, held.shape[0], batch):
            x = held[i : i + batch]
            logits = model(x).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += x[:, 1:].numel()
    return math.exp(total / count)


def train(
    model: torch.nn.Module, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        out = model(data[idx], labels=data[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


def prune(model: torch.nn.Module, method: str, pattern: str, calib: torch.Tensor) -> float:
    from curvprune import Pipeline

    # WANDA compares within each output row (its paper's default), magnitude and SparseGPT
    # within each layer (theirs)
    row = method == "wanda"
    config: dict = {
        "schedule": {"name": "oneshot"},
        "mask": ({"name": "layerwise", "scope": "row" if row else "layer"} if pattern == "50%"
                 else {"name": "nm", "n_m": "2:4"}),
        "prune": {"sparsity": 0.5, "loss_samples": 0, "ignore": ["lm_head"]},
    }
    n = calib.shape[0]
    if method == "sparsegpt":
        config["estimator"] = {"name": "sparsegpt", "num_grads": n}
        config["scorer"] = {"name": "obs"}
    elif method == "wanda":
        config["scorer"] = {"name": "wanda", "num_samples": n}
    else:
        config["scorer"] = {"name": "magnitude"}
    batches = [(calib[i : i + 8], calib[i : i + 8]) for i in range(0, n, 8)]
    started = time.perf_counter()
    Pipeline.from_config(config).prune(model, batches)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import transformers

    torch.manual_seed(args.seed)
    text, source = corpus()
    layers, width, seq, vocab, steps, calib_n = 4, 128, 128, 1024, args.steps, 64
    if args.quick:
        text, layers, width, seq, vocab, steps, calib_n = text[:200_000], 2, 32, 64, 300, 20, 16
    ids, vocab = tokenize(text, vocab)
    cut = int(ids.numel() * 0.9)
    train_seqs, held = sequences(ids[:cut], seq), sequences(ids[cut:], seq)
    cfg = transformers.GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=4,
        n_positions=seq,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    print(f"machine: {describe()}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"corpus: {source}, {ids.numel():,} tokens (vocab {vocab}); {train_seqs.shape[0]} training and "
        f"{held.shape[0]} held-out sequences of {seq}; model {sum(p.numel() for p in model.parameters()):,} "
        f"parameters ({layers} blocks, width {width}); {steps} training steps of 32 sequences"
    )
    started = time.perf_counter()
    cache = Path.home() / ".cache" / "curvprune-bench" / (
        f"sparsegpt_lm-{layers}x{width}-{seq}-{vocab}-{steps}-{args.seed}-{ids.numel()}.pt")
    if cache.is_file():  # the same corpus, sizes and seed: the same trained weights
        model.load_state_dict(torch.load(cache, weights_only=True))
        print(f"trained weights reused from {cache}")
    else:
        train(model, train_seqs, steps, 32, 3e-3, args.seed)
        print(f"trained in {time.perf_counter() - started:.0f} s")
        if not args.quick:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cache)
    dense = perplexity(model, held)
    calib = train_seqs[
        torch.randperm(train_seqs.shape[0], generator=torch.Generator().manual_seed(1))[:calib_n]
    ]
    print()
    print(
        "| pattern | dense | magnitude | WANDA | SparseGPT | prune time (magnitude / WANDA / SparseGPT) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    results = {}
    for pattern in ("50%", "2:4"):
        row, times = {}, {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            pruned = copy.deepcopy(model)
            times[method] = prune(pruned, method, pattern, calib)
            row[method] = perplexity(pruned, held)
        results[pattern] = row
        print(
            f"| {pattern} | {dense:.2f} | {row['magnitude']:.2f} | {row['wanda']:.2f} | "
            f"{row['sparsegpt']:.2f} | {times['magnitude']:.1f} / {times['wanda']:.1f} / "
            f"{times['sparsegpt']:.1f} s |"
        )
    print()
    for pattern, row in results.items():
        order = row["sparsegpt"] < row["wanda"] < row["magnitude"]
        print(
            f"ratio perplexity {pattern} sparsegpt / wanda: {row['sparsegpt'] / row['wanda']:.3f}, "
            f"wanda / magnitude: {row['wanda'] / row['magnitude']:.3f} "
            f"(sparsegpt < wanda < magnitude: {order})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
