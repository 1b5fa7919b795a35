"""Data sets by name, all usable offline.

* ``digits``: scikit-learn's bundled 8×8 digits (1,797 images, shipped with scikit-learn: no
  download), scaled to [0, 1], shape ``[1, 8, 8]``, with a fixed stratified split (75 % / 25 %,
  ``random_state = 0``) that does not change with the run's seed, so runs are comparable.
* ``fake``: torchvision's ``FakeData`` (random images, for tests and smoke runs).
* ``torchvision:<Dataset>``: a torchvision data set (``CIFAR10``, ``MNIST``, ...) from ``root``;
  downloaded only with ``download = true``.
* ``imagefolder``: ``root/train`` and ``root/val`` class folders (ImageNet layout).
* ``text``: token sequences of ``.txt`` text for an ``hf:`` causal language model, with a
  held-out end of the stream for perplexity (:mod:`curvprune.run.text`).

Every bundle names the metric its task is measured by: top-1 ``accuracy`` for the classification
sets, held-out ``perplexity`` for text.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from curvprune.config import DataConfig
from curvprune.errors import ConfigError, closest
from curvprune.run.text import check_text, tokenize_text

__all__ = ["DataBundle", "build_data", "check_data", "make_loaders"]


@attrs.frozen
class DataBundle:
    """Train and test sets with their number of classes and the metric of their task.

    Attributes:
        train: training (and calibration) samples.
        test: evaluation samples.
        num_classes: classes of a classification set; a text's vocabulary size.
        name: the ``[data] name``.
        metric: ``"accuracy"`` (classification) or ``"perplexity"`` (text, causal LMs), see
            :func:`curvprune.run.training.evaluate`.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    name: str
    metric: str = "accuracy"


def _digits() -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )

    def tensors(x: object, y: object) -> TensorDataset:
        xs = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        return TensorDataset(xs, torch.as_tensor(y, dtype=torch.long))

    return DataBundle(tensors(x_train, y_train), tensors(x_test, y_test), 10, "digits")


def _fake(cfg: DataConfig, seed: int) -> DataBundle:
    from torchvision import transforms
    from torchvision.datasets import FakeData

    shape = (3, cfg.image_size, cfg.image_size)
    tf = transforms.ToTensor()
    train = FakeData(cfg.num_samples, shape, cfg.num_classes, tf, random_offset=seed)
    test = FakeData(
        max(1, cfg.num_samples // 4), shape, cfg.num_classes, tf, random_offset=seed + 10**6
    )
    return DataBundle(train, test, cfg.num_classes, "fake")


def _torchvision(cfg: DataConfig) -> DataBundle:
    from torchvision import transforms

    name = cfg.name.split(":", 1)[1]
    cls = _torchvision_class(cfg)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
    try:
        train = cls(cfg.root, train=True, transform=tf, download=cfg.download)
        test = cls(cfg.root, train=False, transform=tf, download=cfg.download)
    except RuntimeError as exc:
        raise ConfigError(
            f"{name} not found under {cfg.root!r} ({exc}); put it there or set [data] "
            "download = true @ data.root"
        ) from None
    classes = getattr(train, "classes", None)
    num_classes = len(classes) if classes else cfg.num_classes
    return DataBundle(train, test, num_classes, cfg.name)


def _imagefolder(cfg: DataConfig) -> DataBundle:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = _imagefolder_root(cfg)
    size = cfg.image_size
    tf = transforms.Compose([
        transforms.Resize(int(size * 8 / 7)),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    train, test = ImageFolder(str(root / "train"), tf), ImageFolder(str(root / "val"), tf)
    return DataBundle(train, test, len(train.classes), "imagefolder")


def _text(cfg: DataConfig, model: str | None) -> DataBundle:
    split = tokenize_text(cfg, model)
    return DataBundle(
        TensorDataset(split.train, split.train), TensorDataset(split.test, split.test),
        split.vocab_size, "text", metric="perplexity",
    )


def build_data(cfg: DataConfig, *, seed: int = 0, model: str | None = None) -> DataBundle:
    """The train and test sets ``[data]`` describes.

    Args:
        cfg: the ``[data]`` table.
        seed: the run's seed (``fake`` draws its images from it).
        model: the ``[model] name``: text needs an ``hf:`` model, whose folder holds the
            tokenizer unless ``[data] tokenizer`` names one (None: ``[data] tokenizer`` must).

    Raises:
        ConfigError: unknown name, missing root, or a data set that is not on disk.
    """
    check_data(cfg, model=model)
    if cfg.name == "text":
        return _text(cfg, model)
    if cfg.name == "digits":
        return _digits()
    if cfg.name == "fake":
        return _fake(cfg, seed)
    if cfg.name.startswith("torchvision:"):
        return _torchvision(cfg)
    return _imagefolder(cfg)


#: Classes of the torchvision data sets people prune on, known without opening them.
_TORCHVISION_CLASSES = {
    "CIFAR10": 10, "CIFAR100": 100, "MNIST": 10, "FashionMNIST": 10, "KMNIST": 10, "SVHN": 10,
    "STL10": 10, "ImageNet": 1000,
}


def check_data(cfg: DataConfig, *, model: str | None = None) -> int | None:
    """Check ``[data]`` without loading a sample; return its number of classes when known.

    Known without loading: digits (10), fake (``num_classes``), an image folder (the class
    folders under ``train/``) and the common torchvision sets; None otherwise (text too: its
    vocabulary needs the tokenizer). ``model`` is the ``[model] name`` (see :func:`build_data`).

    Raises:
        ConfigError: unknown name, unknown torchvision data set, missing ``root`` or folders;
            for text: a model that is not ``hf:``, a missing text or tokenizer.
    """
    if cfg.name == "text":
        check_text(cfg, model)
        return None
    if cfg.name == "digits":
        return 10
    if cfg.name == "fake":
        return cfg.num_classes
    if cfg.name.startswith("torchvision:"):
        cls = _torchvision_class(cfg)
        if not cfg.download and not Path(cfg.root or "").is_dir():
            raise ConfigError(
                f"{cls.__name__} not found: no folder {cfg.root!r}; put it there or set [data] "
                "download = true @ data.root"
            )
        return _TORCHVISION_CLASSES.get(cls.__name__)
    if cfg.name == "imagefolder":
        root = _imagefolder_root(cfg)
        return sum(1 for p in (root / "train").iterdir() if p.is_dir())
    choices = ["digits", "fake", "imagefolder", "text"]
    hint = closest(cfg.name, choices)
    more = f"; did you mean {hint!r}?" if hint else ""
    raise ConfigError(
        f"unknown data {cfg.name!r} (choose digits, fake, imagefolder, text or "
        f"torchvision:<Dataset>){more} @ data.name"
    )


def _torchvision_class(cfg: DataConfig) -> type:
    import torchvision.datasets as tvd

    name = cfg.name.split(":", 1)[1]
    cls = getattr(tvd, name, None)
    if not isinstance(cls, type):
        choices = [n for n in dir(tvd) if n[:1].isupper()]
        hint = closest(name, choices)
        more = f"; did you mean 'torchvision:{hint}'?" if hint else ""
        raise ConfigError(f"torchvision has no data set {name!r}{more} @ data.name")
    if not cfg.root:
        raise ConfigError(f"data set {cfg.name!r} needs a local folder: set [data] root @ data.root")
    return cls


def _imagefolder_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError("data 'imagefolder' needs [data] root with train/ and val/ @ data.root")
    root = Path(cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"no folder {split!r} under {str(root)!r} @ data.root")
    return root


def make_loaders(
    bundle: DataBundle, cfg: DataConfig, *, seed: int
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """``(train, gradients, test)`` loaders.

    The training loader shuffles with a seeded generator; the gradient loader shuffles with its
    own seeded generator, so every pass (every pruning step) sees fresh samples in a
    reproducible order; the test loader does not shuffle.
    """
    def loader(dataset: Dataset, batch: int, shuffle: bool, offset: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed + offset)
        return DataLoader(
            dataset, batch_size=batch, shuffle=shuffle, generator=generator,
            num_workers=cfg.num_workers,
        )

    return (
        loader(bundle.train, cfg.batch_size, True, 0),
        loader(bundle.train, cfg.batch_size, True, 1),
        loader(bundle.test, cfg.eval_batch_size, False, 2),
    )
