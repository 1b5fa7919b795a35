"""Text for causal language models: ``[data] name = "text"``.

The text at ``[data] path`` (a file, or every ``*.txt`` file of a folder in name order) is read
as UTF-8 and tokenized once with a Hugging Face tokenizer, loaded with ``local_files_only`` from
``[data] tokenizer`` (default: the folder of the ``hf:`` model, where ``save_pretrained`` of a
model and its tokenizer puts both). The files' tokens are concatenated into one stream (with the
tokenizer's end-of-sequence token between files, when it has one) and cut into sequences of
``seq_len`` tokens:

* **held out** (evaluation, perplexity): the end of the stream, ``holdout`` of it rounded to
  whole sequences, at least one;
* **calibration** (pruning gradients, training, fine-tuning): the stream before it, cut into
  consecutive sequences; ``num_samples`` of them, spread evenly over the whole stream when it
  holds more (all of them, with a warning, when it holds fewer).

The two parts never share a token, and neither depends on the run's seed, so runs compare. A
batch is ``(input_ids, input_ids)``: the default loss of a causal LM
(:func:`curvprune.tensors.gradients.default_loss`) scores the logits at position t against token
t + 1 itself.

:func:`check_text` finds what it can without tokenizing or loading model weights (the model is
an ``hf:`` one, the text and the tokenizer files are there, ``seq_len`` fits the model's
positions); :func:`tokenize_text` does the rest.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from curvprune.config import DataConfig, shown
from curvprune.errors import ConfigError, CurvpruneWarning

__all__ = [
    "TOKENIZER_FILES", "TextSplit", "check_text", "split_stream", "tokenize_text",
    "tokenizer_folder",
]

#: Files of which a tokenizer folder holds at least one (fast, BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model",
)
#: ``config.json`` keys that bound the sequence length of a transformers model.
_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


@attrs.frozen
class TextSplit:
    """Calibration and held-out sequences (``[n, seq_len]`` token ids) of a tokenized text.

    Attributes:
        train: the calibration sequences.
        test: the held-out sequences, after every calibration token in the stream.
        vocab_size: the tokenizer's vocabulary size (special tokens included).
        tokens: tokens in the whole stream.
    """

    train: Tensor
    test: Tensor
    vocab_size: int
    tokens: int


def tokenizer_folder(cfg: DataConfig, model_name: str | None) -> Path:
    """The tokenizer's folder: ``[data] tokenizer``, else the ``hf:`` model's folder.

    Raises:
        ConfigError: a model that is not ``hf:`` (text needs a causal LM), or no folder known.
    """
    if model_name is not None and not model_name.startswith("hf:"):
        raise ConfigError(
            f"data 'text' needs a Hugging Face causal language model, [model] name = "
            f"'hf:<folder>', not {shown(model_name)} @ model.name"
        )
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer).expanduser()
    if model_name is None:
        raise ConfigError("data 'text' needs [data] tokenizer, a tokenizer folder @ data.tokenizer")
    return Path(model_name.split(":", 1)[1]).expanduser()


def _text_files(cfg: DataConfig) -> list[Path]:
    if not cfg.path:
        raise ConfigError(
            "data 'text' needs [data] path, a .txt file or a folder of them @ data.path"
        )
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"no text file or folder {shown(cfg.path)} @ data.path")
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        raise ConfigError(f"no .txt file in the folder {shown(cfg.path)} @ data.path")
    return files


def _max_positions(model_folder: Path) -> int | None:
    """The positions the model's ``config.json`` allows, None when it does not say."""
    try:
        config = json.loads((model_folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading the model reports the folder's problems
    for key in _POSITION_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_text(cfg: DataConfig, model_name: str | None) -> None:
    """Check ``[data]`` for text without reading the text, the tokenizer or the model weights.

    Raises:
        ConfigError: a model that is not ``hf:``, a missing path or tokenizer, ``seq_len`` beyond
            the model's positions, or transformers not installed.
    """
    folder = tokenizer_folder(cfg, model_name)
    _text_files(cfg)
    if not folder.is_dir():
        raise ConfigError(f"no tokenizer folder {shown(str(folder))} @ data.tokenizer")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"no tokenizer in {shown(str(folder))} (none of tokenizer.json, tokenizer_config.json, "
            "vocab.json, ...); save one there with save_pretrained or set [data] tokenizer "
            "@ data.tokenizer"
        )
    if model_name is not None:
        limit = _max_positions(Path(model_name.split(":", 1)[1]).expanduser())
        if limit is not None and cfg.seq_len > limit:
            raise ConfigError(
                f"seq_len = {cfg.seq_len} is longer than the model's {limit} positions "
                "(its config.json) @ data.seq_len"
            )
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "data 'text' needs transformers: pip install 'curvprune-core[hf]' @ data.name"
        ) from None


def _load_tokenizer(folder: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, TypeError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise ConfigError(
            f"cannot load the tokenizer in {shown(str(folder))} ({reason}) @ data.tokenizer"
        ) from None


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{shown(str(file))} is not UTF-8 text (byte {exc.start}: {exc.reason}) @ data.path"
        ) from None


def _stream(files: list[Path], tokenizer: Any) -> Tensor:
    """The token ids of all files, one stream, the end-of-sequence token between files."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for index, file in enumerate(files):
        if index and eos is not None:
            ids.append(int(eos))
        encoded = tokenizer(_read(file), add_special_tokens=False, verbose=False)
        ids.extend(encoded["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def split_stream(stream: Tensor, cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """``(calibration, held out)`` sequences of a token stream (see the module docstring).

    Raises:
        ConfigError: a stream too short for one calibration and one held-out sequence.
    """
    n, length = int(stream.numel()), cfg.seq_len
    held = max(1, round(cfg.holdout * n / length))
    available = (n - held * length) // length
    if available < 1:
        raise ConfigError(
            f"the text at {shown(str(cfg.path))} has {n} tokens, fewer than the "
            f"{(held + 1) * length} of one calibration and {held} held-out sequence(s) of "
            f"seq_len = {length}; give more text or lower [data] seq_len @ data.path"
        )
    test = stream[n - held * length:].reshape(held, length)
    calibration = stream[: available * length].reshape(available, length)
    if available < cfg.num_samples:
        warnings.warn(
            f"the text gives {available} calibration sequences of {length} tokens, fewer than "
            f"[data] num_samples = {cfg.num_samples}: all of them are used",
            CurvpruneWarning, stacklevel=2,
        )
        return calibration, test
    chosen = torch.linspace(0, available - 1, cfg.num_samples).round().long()
    return calibration[chosen], test


def tokenize_text(cfg: DataConfig, model_name: str | None) -> TextSplit:
    """Tokenize the text of ``[data]`` and split it.

    Raises:
        ConfigError: anything :func:`check_text` finds, an unreadable tokenizer or text, or a
            text too short.
    """
    check_text(cfg, model_name)
    tokenizer = _load_tokenizer(tokenizer_folder(cfg, model_name))
    stream = _stream(_text_files(cfg), tokenizer)
    train, test = split_stream(stream, cfg)
    return TextSplit(train, test, len(tokenizer), int(stream.numel()))
