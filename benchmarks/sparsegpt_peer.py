"""SparseGPT side by side with llmcompressor's SparseGPTModifier on a small Llama (time, layer error, masks).

A small Llama (hidden 256, intermediate 688, 4 layers, 4 heads, vocabulary 2,048, float32) is
built locally from ``transformers.LlamaConfig`` (nothing is downloaded) and trained for a few
hundred steps on the Vim user manual with a byte-level BPE trained in-script (the helpers of
``sparsegpt_lm.py``), so that held-out perplexity means something. It is saved with
``save_pretrained`` into a temporary folder together with the calibration token ids
(``calibration.pt``: N sequences of L tokens from the training part), so both tools see the very
same model and the very same ids.

Both prune every Linear of the decoder layers (not ``lm_head``) with SparseGPT at 50 %
unstructured and 2:4, damping 0.01 (relative), block size 128, sequential calibration (block
after block, each block calibrated on the outputs of the blocks already pruned):

* curvprune: ``Pipeline.from_config`` with the ``sparsegpt`` estimator, ``obs`` scorer,
  ``oneshot`` schedule (``calibration = "auto"`` = sequential) and the ``layerwise`` or ``nm``
  mask, in this process;
* llmcompressor 0.14 (``oneshot`` with ``SparseGPTModifier`` and ``pipeline="sequential"``), in
  its own virtual environment (it pins another torch) through a driver script written into the
  folder; the driver times the ``oneshot`` call alone and saves the pruned state dict.

The peer's interpreter: ``--peer-python``, else ``<cache>/bin/python`` with the cache
``~/.cache/curvprune-bench/llmcompressor``; in full mode a missing cache is created
(``python -m venv`` + ``pip install llmcompressor==0.14``); when that fails (no network), or in
``--quick`` mode without an existing interpreter, the peer is skipped with a note.

Compared here, in the main environment: wall time and the ratio; the relative layer error
tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ) per layer with H the *dense* model's layer-input Hessian on the
calibration data (mean and max over layers); the fraction of identical mask entries; the
sparsity reached; held-out perplexity and the mean squared logit difference to the dense model.

Run it from the repository root::

    python benchmarks/sparsegpt_peer.py                   # full (~25 min on two busy cores, ~24 of them training)
    python benchmarks/sparsegpt_peer.py --quick           # smoke run (peer only if already installed)
    python benchmarks/sparsegpt_peer.py --peer-python /tmp/llmc/bin/python
    python benchmarks/sparsegpt_peer.py --keep DIR ...; then --reuse DIR   # re-time without retraining
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import describe

HEADLINE = r"^ratio\b.*$"
PEER_SPEC = "llmcompressor==0.14"
INSTALLED = ".curvprune-bench-installed"  # written into the cache once pip succeeded
DEFAULT_CACHE = Path.home() / ".cache" / "curvprune-bench" / "llmcompressor"
PATTERNS = {"50%": "0:0", "2:4": "2:4"}

# Runs in the peer's virtual environment: python driver.py <json arguments>. Prints one JSON line
# prefixed with RESULT (everything else is llmcompressor's logging).
DRIVER = r'''
import json, sys, time
from pathlib import Path

args = json.loads(sys.argv[1])
import torch

torch.set_num_threads(args["threads"])
torch.manual_seed(0)
from datasets import Dataset
from transformers import AutoModelForCausalLM

import llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

folder = Path(args["folder"])
ids = torch.load(folder / "calibration.pt")
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
times = []
for _ in range(args["repeats"]):  # a fresh model each time; the oneshot call alone is timed
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure=args["mask_structure"], block_size=128,
                               dampening_frac=0.01, targets=["Linear"], ignore=args["ignore"])
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args["batch"],
            pipeline="sequential")
    times.append(time.perf_counter() - started)
seconds = sorted(times)[len(times) // 2]
state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
torch.save(state, args["out"])
import transformers
print("RESULT " + json.dumps({"seconds": seconds, "times": times, "llmcompressor": llmcompressor.__version__,
      "torch": torch.__version__, "transformers": transformers.__version__,
      "threads": torch.get_num_threads()}))
'''


def peer_python(args: argparse.Namespace) -> tuple[str | None, str]:
    """The peer's interpreter, or None and why not."""
    if args.no_peer:
        return None, "peer skipped (--no-peer)"
    if args.peer_python:
        if Path(args.peer_python).exists():
            return args.peer_python, f"peer interpreter {args.peer_python} (--peer-python)"
        return None, f"peer skipped: --peer-python {args.peer_python} does not exist"
    cache = Path(args.peer_cache).expanduser()
    python = cache / "bin" / "python"
    if python.exists() and (cache / INSTALLED).exists():
        return str(python), f"peer interpreter {python} (cached virtual environment)"
    if python.exists():  # made by hand, or an install that was interrupted
        ok = subprocess.run([str(python), "-c", "import llmcompressor"], capture_output=True).returncode == 0
        if ok:
            return str(python), f"peer interpreter {python} (cached virtual environment)"
    if args.quick:
        return None, (f"peer skipped: no virtual environment at {cache} (--quick never installs; "
                      f"run once in full mode or pass --peer-python)")
    try:
        print(f"creating {cache} and installing {PEER_SPEC} (once) ...", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(cache)], check=True, timeout=600)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", PEER_SPEC], check=True,
                       timeout=3600)
        (cache / INSTALLED).write_text(PEER_SPEC + "\n", encoding="utf-8")
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(cache, ignore_errors=True)  # so that the next run tries again
        return None, f"peer skipped: installing {PEER_SPEC} into {cache} failed ({exc})"
    return str(python), f"peer interpreter {python} (virtual environment created now)"


def run_peer(python: str, folder: Path, pattern: str, threads: int, batch: int,
             ignore: list[str], repeats: int) -> tuple[dict, dict]:
    """Prune with llmcompressor in its own process; its timing and the pruned state dict."""
    driver = folder / "llmc_driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    out = folder / f"llmc_{pattern.replace(':', '-').replace('%', 'pct')}.pt"
    spec = {"folder": str(folder), "mask_structure": PATTERNS[pattern], "threads": threads,
            "batch": batch, "out": str(out), "ignore": ignore, "repeats": repeats}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([python, str(driver), json.dumps(spec)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"llmcompressor driver failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):]), torch.load(out)


def tokenize(text: str, vocab: int):
    """Byte-level BPE trained on the first 90 % of ``text`` (as sparsegpt_lm.py); ids and tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([text[: int(len(text) * 0.9)]], trainer)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    # llmcompressor's oneshot loads a processor from the model folder whenever a dataset is given
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    return ids, tok.get_vocab_size(), fast


def prune_curvprune(model: torch.nn.Module, pattern: str, calib: torch.Tensor, batch: int,
                    repeats: int) -> tuple[float, list[float]]:
    """Prune ``model`` in place (the last of ``repeats`` runs on fresh copies); median seconds and all."""
    times = []
    for r in range(repeats):
        target = model if r == repeats - 1 else copy.deepcopy(model)
        times.append(_prune_once(target, pattern, calib, batch))
    return sorted(times)[len(times) // 2], times


def _prune_once(model: torch.nn.Module, pattern: str, calib: torch.Tensor, batch: int) -> float:
    from curvprune import Pipeline

    config = {
        "estimator": {"name": "sparsegpt", "num_grads": calib.shape[0], "damping": 0.01,
                      "blocksize": 128},
        "scorer": {"name": "obs"},
        "schedule": {"name": "oneshot"},  # calibration "auto": sequential, block by block
        "mask": {"name": "layerwise"} if pattern == "50%" else {"name": "nm", "n_m": "2:4"},
        "prune": {"sparsity": 0.5, "loss_samples": 0, "ignore": ["lm_head"]},
    }
    batches = [(calib[i : i + batch], calib[i : i + batch]) for i in range(0, calib.shape[0], batch)]
    pipeline = Pipeline.from_config(config)
    started = time.perf_counter()
    pipeline.prune(model, batches)
    return time.perf_counter() - started


def target_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


@torch.no_grad()
def dense_hessians(model: torch.nn.Module, calib: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Every target layer's input Hessian 2XXᵀ/n on the calibration data through the dense model."""
    from curvprune_sparsegpt import LayerHessian

    accs, hooks = {}, []
    for name, layer in target_layers(model).items():
        acc = accs[name] = LayerHessian(layer, dtype=torch.float64)
        hooks.append(layer.register_forward_pre_hook(lambda m, a, acc=acc: acc.add_batch(a[0])))
    model.eval()
    try:
        for i in range(0, calib.shape[0], batch):
            model(calib[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    return {n: a.hessian for n, a in accs.items()}


def compare(dense: torch.nn.Module, pruned: torch.nn.Module, hessians: dict[str, torch.Tensor]) -> dict:
    """Relative layer errors, masks and sparsity of ``pruned`` against ``dense``."""
    from curvprune_sparsegpt import layer_error, weight_matrix

    pruned_layers = target_layers(pruned)
    errors, masks, zeros, total = {}, {}, 0, 0
    for name, layer in target_layers(dense).items():
        w, w_hat, h = weight_matrix(layer), weight_matrix(pruned_layers[name]), hessians[name]
        errors[name] = float(layer_error(w, w_hat, h) / layer_error(w, torch.zeros_like(w), h))
        masks[name] = w_hat == 0
        zeros += int(masks[name].sum())
        total += w.numel()
    head = pruned.lm_head.weight
    return {"errors": errors, "masks": masks, "sparsity": zeros / total,
            "lm_head_sparsity": float((head == 0).float().mean())}


@torch.no_grad()
def outputs(model: torch.nn.Module, held: torch.Tensor, batch: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(held[i : i + batch]).logits for i in range(0, held.shape[0], batch)])


def perplexity_and_mse(model, held, dense_logits, batch) -> tuple[float, float]:
    logits = outputs(model, held, batch)
    shift = logits[:, :-1].reshape(-1, logits.shape[-1])
    nll = torch.nn.functional.cross_entropy(shift, held[:, 1:].reshape(-1))
    return float(torch.exp(nll)), float(((logits - dense_logits) ** 2).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="training steps (full 400, quick 30)")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences N (full 64)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence L (full 128)")
    parser.add_argument("--batch", type=int, default=8, help="calibration batch size of both tools")
    parser.add_argument("--peer-python", default=None, help="an interpreter with llmcompressor 0.14")
    parser.add_argument("--peer-cache", default=str(DEFAULT_CACHE),
                        help="virtual environment used (and created in full mode) when --peer-python is not given")
    parser.add_argument("--peer-ignore", default="re:.*lm_head",
                        help="comma-separated ignore list given to SparseGPTModifier (a plain 'lm_head' "
                             "does not exclude it in 0.14: the name it matches is 'lm_head.')")
    parser.add_argument("--repeats", type=int, default=None, help="timed prunes per tool and pattern "
                        "(median; full 3, quick 1)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of both tools")
    parser.add_argument("--keep", default=None, help="keep the temporary folder here")
    parser.add_argument("--reuse", default=None, help="a folder kept by --keep: prune its model and "
                        "calibration ids again (no training; same sizes and flags as that run)")
    args = parser.parse_args(argv)
    import transformers
    from sparsegpt_lm import corpus, sequences, train

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    if args.quick:
        hidden, inter, layers, heads, vocab, steps, samples, seq = 64, 172, 2, 4, 512, 30, 8, 64
        text_limit = 200_000
    else:
        hidden, inter, layers, heads, vocab, steps, samples, seq = 256, 688, 4, 4, 2048, 400, 64, 128
        text_limit = None
    steps = args.steps if args.steps is not None else steps
    repeats = args.repeats or (1 if args.quick else 3)
    samples, seq = args.samples or samples, args.seq or seq
    text, source = corpus()
    text = text[:text_limit] if text_limit else text
    if args.reuse:  # the folder of an earlier --keep run: its tokenizer, model and calibration ids
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(args.reuse) / "model")
        ids = torch.tensor(tokenizer.backend_tokenizer.encode(text).ids, dtype=torch.long)
        vocab = tokenizer.backend_tokenizer.get_vocab_size()
    else:
        ids, vocab, tokenizer = tokenize(text, vocab)
    cut = int(ids.numel() * 0.9)
    train_seqs, held = sequences(ids[:cut], seq), sequences(ids[cut:], seq)
    held = held[: 64 if not args.quick else 8]
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                   max_position_embeddings=max(seq, 128), tie_word_embeddings=False,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).float()
    python, peer_note = peer_python(args)
    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {threads}")
    print(f"model: Llama {layers} layers, hidden {hidden}, intermediate {inter}, {heads} heads, vocab {vocab}, "
          f"float32, {sum(p.numel() for p in model.parameters()):,} parameters; trained {steps} steps of "
          f"16 sequences on {source}; calibration {samples} sequences of {seq} tokens (batches of "
          f"{args.batch}); held-out {held.shape[0]} sequences of {seq}")
    print(peer_note)
    print(f"load average at the start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    tmp = tempfile.TemporaryDirectory(prefix="sparsegpt_peer_")
    if args.reuse:
        folder = Path(args.reuse)
        calib = torch.load(folder / "calibration.pt")
        print(f"model and calibration ids reused from {folder} (no training)")
    else:
        started = time.perf_counter()
        train(model, train_seqs, steps, 16, 3e-3, 0)
        model.eval()
        print(f"trained in {time.perf_counter() - started:.0f} s")
        calib = train_seqs[torch.randperm(train_seqs.shape[0], generator=torch.Generator().manual_seed(1))[:samples]]
        calib = calib.contiguous()
        folder = Path(args.keep) if args.keep else Path(tmp.name)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        torch.save(calib, folder / "calibration.pt")
    dense = transformers.LlamaForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    hessians = dense_hessians(dense, calib, args.batch)
    dense_logits = outputs(dense, held, args.batch)
    dense_ppl, _ = perplexity_and_mse(dense, held, dense_logits, args.batch)

    results: dict[str, dict[str, dict]] = {}
    peer_versions = None
    ignore = [s for s in args.peer_ignore.split(",") if s]
    for pattern in PATTERNS:
        row = results[pattern] = {}
        pruned = copy.deepcopy(dense)
        seconds, times = prune_curvprune(pruned, pattern, calib, args.batch, repeats)
        row["curvprune"] = {"seconds": seconds, "times": times, **compare(dense, pruned, hessians)}
        row["curvprune"]["ppl"], row["curvprune"]["mse"] = perplexity_and_mse(pruned, held, dense_logits, args.batch)
        if python is None:
            continue
        try:
            info, state = run_peer(python, folder, pattern, threads, args.batch, ignore, repeats)
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            print(f"peer failed on {pattern}: {exc}")
            python, peer_note = None, "peer skipped: the llmcompressor run failed (above)"
            continue
        peer_versions = info
        peer = copy.deepcopy(dense)
        peer.load_state_dict(state)
        row["llmcompressor"] = {"seconds": info["seconds"], "times": info["times"], **compare(dense, peer, hessians)}
        row["llmcompressor"]["ppl"], row["llmcompressor"]["mse"] = perplexity_and_mse(peer, held, dense_logits, args.batch)
    tmp.cleanup()

    if peer_versions:
        print(f"peer: llmcompressor {peer_versions['llmcompressor']}, torch {peer_versions['torch']}, "
              f"transformers {peer_versions['transformers']}, threads {peer_versions['threads']}; "
              f"ignore={ignore}")
    else:
        print(f"note: {peer_note}; only curvprune's figures below")
    print()
    print(f"dense held-out perplexity {dense_ppl:.2f}")
    print()
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print()
    print("| pattern | tool | prune wall s (median) | runs s | rel. layer error mean | max | sparsity (decoder Linears) | "
          "lm_head sparsity | held-out ppl | logit MSE to dense |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for pattern, row in results.items():
        for tool, r in row.items():
            errs = list(r["errors"].values())
            runs = " / ".join(f"{t:.2f}" for t in r["times"])
            print(f"| {pattern} | {tool} | {r['seconds']:.2f} | {runs} | {sum(errs) / len(errs):.5f} | {max(errs):.5f} | "
                  f"{r['sparsity']:.5f} | {r['lm_head_sparsity']:.3f} | {r['ppl']:.2f} | {r['mse']:.4g} |")
    both = {p: row for p, row in results.items() if "llmcompressor" in row}
    if both:
        print()
        names = list(next(iter(both.values()))["curvprune"]["errors"])
        head = " | ".join(f"{p} curvprune | {p} llmc | {p} same mask" for p in both)
        print(f"| layer | {head} |")
        print("|---|" + "---:|" * (3 * len(both)))
        for name in names:
            cells = []
            for row in both.values():
                c, p = row["curvprune"], row["llmcompressor"]
                same = float((c["masks"][name] == p["masks"][name]).float().mean())
                cells.append(f"{c['errors'][name]:.5f} | {p['errors'][name]:.5f} | {same:.4f}")
            print(f"| {name.removeprefix('model.')} | {' | '.join(cells)} |")
        print()
        for pattern, row in both.items():
            c, p = row["curvprune"], row["llmcompressor"]
            same = sum(int((c["masks"][n] == p["masks"][n]).sum()) for n in c["masks"])
            total = sum(m.numel() for m in c["masks"].values())
            ce, pe = (sum(r["errors"].values()) / len(r["errors"]) for r in (c, p))
            print(f"ratio {pattern} wall time curvprune / llmcompressor: {c['seconds'] / p['seconds']:.2f}x "
                  f"({c['seconds']:.1f} s / {p['seconds']:.1f} s); mean layer error ratio {ce / pe:.3f}; "
                  f"identical mask entries {same / total:.4f}; ppl {c['ppl']:.2f} / {p['ppl']:.2f}")
    else:
        for pattern, row in results.items():
            print(f"ratio {pattern} wall time curvprune / llmcompressor: n/a (peer skipped); "
                  f"curvprune {row['curvprune']['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
