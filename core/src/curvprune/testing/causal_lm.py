"""A tiny causal language model and its tokenizer, built offline, for tests of ``hf:`` runs.

:func:`tiny_causal_lm` saves a two-layer GPT-2 (random weights, from a config: nothing is
downloaded) and a word-level tokenizer trained on the given text into one folder, the layout
``[model] name = "hf:<folder>"`` with ``[data] name = "text"`` reads. :func:`sample_text` writes
a few hundred lines of seeded pseudo-sentences to tokenize. Needs transformers and tokenizers
(the ``hf`` extra).
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["sample_text", "tiny_causal_lm"]

_WORDS = (
    "the a one every some curvature weight mask prunes keeps model layer token sequence loss "
    "gradient fisher hessian small large quickly slowly and or but then when is was becomes "
    "sparse dense ."
).split()


def sample_text(lines: int = 200, *, seed: int = 0) -> str:
    """``lines`` lines of 6 to 14 words from a 40-word vocabulary, the same for a given seed."""
    rng = random.Random(seed)
    return "\n".join(
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))) for _ in range(lines)
    ) + "\n"


def tiny_causal_lm(
    folder: str | Path, *, text: str | None = None, n_layer: int = 2, n_embd: int = 32,
    n_positions: int = 64, seed: int = 0,
) -> Path:
    """Save a tiny GPT-2 (tied ``lm_head``) and a word-level tokenizer of ``text`` in ``folder``.

    Args:
        folder: where both go (created).
        text: what the tokenizer's vocabulary is trained on (default :func:`sample_text`).
        n_layer: transformer blocks.
        n_embd: width (two attention heads).
        n_positions: the longest sequence the model takes.
        seed: the weights' seed.

    Returns:
        ``folder``, for ``[model] name = f"hf:{folder}"``.
    """
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"])
    words.train_from_iterator((text or sample_text()).splitlines(), trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=2, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
