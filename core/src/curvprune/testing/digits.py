"""scikit-learn's bundled digits for plugin tests: the models and loaders ``curvprune run`` uses.

Offline and small (1,797 images of 8×8): a plugin's integration test trains :class:`DigitsMLP`
or :class:`DigitsCNN` for a few epochs on :func:`digits_loaders` and prunes it, exactly as the
embedded default run does, without reaching into curvprune's run machinery.
"""

from __future__ import annotations

from typing import NamedTuple

from torch.utils.data import DataLoader

from curvprune.config import DataConfig
from curvprune.run.data import build_data, make_loaders
from curvprune.run.models import DigitsCNN, DigitsMLP

__all__ = ["DigitsCNN", "DigitsLoaders", "DigitsMLP", "digits_loaders"]


class DigitsLoaders(NamedTuple):
    """The three loaders of a digits run."""

    #: shuffled with a seeded generator, ``batch_size`` samples a batch.
    train: DataLoader
    #: the same training samples in their own seeded order (what pruning steps draw from).
    grad: DataLoader
    #: the fixed 25 % test split, not shuffled.
    test: DataLoader


def digits_loaders(batch_size: int = 64, *, seed: int = 0) -> DigitsLoaders:
    """Loaders over the digits' fixed stratified split (75 % train, 25 % test).

    Args:
        batch_size: samples per training and gradient batch.
        seed: seeds the loaders' shuffling (the split itself never changes).
    """
    cfg = DataConfig(name="digits", batch_size=batch_size)
    return DigitsLoaders(*make_loaders(build_data(cfg, seed=seed), cfg, seed=seed))
