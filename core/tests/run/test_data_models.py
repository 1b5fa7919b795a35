"""Models and data by name, all offline: digits, FakeData, torchvision data sets and image folders."""

from __future__ import annotations

import struct
import sys
import textwrap

import pytest
import torch

import curvprune
from curvprune import ConfigError
from curvprune.config import DataConfig
from curvprune.run.data import build_data, make_loaders
from curvprune.run.models import DigitsCNN, DigitsMLP, build_model


def test_digits_split_is_fixed_and_stratified():
    a, b = build_data(DataConfig(name="digits"), seed=0), build_data(DataConfig(name="digits"), seed=7)
    assert (len(a.train), len(a.test)) == (1347, 450)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0]), "the split does not depend on the seed"
    x, y = a.train.tensors
    assert x.shape[1:] == (1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    counts = torch.bincount(a.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 47


def test_loaders_are_seeded():
    bundle = build_data(DataConfig(name="digits"))
    first = [next(iter(make_loaders(bundle, DataConfig(), seed=s)[0]))[1] for s in (0, 0, 1)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_fake_data_shapes():
    bundle = build_data(DataConfig(name="fake", image_size=16, num_samples=20, num_classes=5), seed=3)
    x, y = bundle.train[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 5 and len(bundle.test) == 5


def _write_idx(path, array: torch.Tensor) -> None:
    dims = array.shape
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


def test_torchvision_dataset_from_a_local_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 12), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", torch.randint(0, 255, (n, 28, 28), generator=gen))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", torch.randint(0, 10, (n,), generator=gen))
    bundle = build_data(DataConfig(name="torchvision:MNIST", root=str(tmp_path)))
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (12, 4, 10)
    x, _ = bundle.train[0]
    assert x.shape == (1, 28, 28)


def test_torchvision_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"MNIST not found .*download = true @ data.root"):
        build_data(DataConfig(name="torchvision:MNIST", root=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"needs a local folder.*@ data.root"):
        build_data(DataConfig(name="torchvision:CIFAR10"))
    with pytest.raises(ConfigError, match="did you mean 'torchvision:CIFAR10'"):
        build_data(DataConfig(name="torchvision:CIFAR1O", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        build_data(DataConfig(name="digit"))


def test_image_folder(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 255, (20, 20, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    bundle = build_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16))
    assert bundle.num_classes == 2 and len(bundle.train) == 4
    assert bundle.train[0][0].shape == (3, 16, 16)
    with pytest.raises(ConfigError, match="no folder 'val'"):
        (tmp_path / "val").rename(tmp_path / "valid")
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_builtin_and_torchvision_models():
    assert isinstance(build_model("digits-mlp"), DigitsMLP)
    assert isinstance(build_model("digits-cnn", num_classes=3), DigitsCNN)
    resnet = build_model("torchvision:resnet18", num_classes=7)
    assert resnet.fc.out_features == 7
    with pytest.raises(ConfigError, match="did you mean 'torchvision:resnet18'"):
        build_model("torchvision:resnet81")
    with pytest.raises(ConfigError, match="did you mean 'digits-cnn'"):
        build_model("digits-cn")
    with pytest.raises(ConfigError, match="rejected its arguments"):
        build_model("digits-mlp", colour=True)


def test_module_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def tiny(num_classes=2, width=4):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, num_classes))
        not_callable = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("module:my_models:tiny", num_classes=3, width=5)
    assert model[3].out_features == 3 and model[1].out_features == 5
    with pytest.raises(ConfigError, match="no callable 'not_callable'"):
        build_model("module:my_models:not_callable")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        build_model("module:no_such_module:f")
    sys.modules.pop("my_models", None)


def test_resnet_on_fake_data_prunes_end_to_end():
    """A torchvision ResNet (BatchNorm, residual blocks) through the pipeline with OBS."""
    bundle = build_data(DataConfig(name="fake", image_size=16, num_samples=16, num_classes=4), seed=0)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=8)
    model = build_model("torchvision:resnet18", num_classes=4).eval()
    pipe = curvprune.Pipeline.from_config({
        "prune": {"sparsity": 0.5, "targets": ["re:layer1\\.0\\.conv.\\.weight"], "loss_samples": 8},
        "estimator": {"name": "dense", "block_size": 8, "damping": 1e-2, "num_grads": 4},
        "scorer": {"name": "obs"},
    })
    result = pipe.prune(model, loader)
    assert abs(result.sparsity - 0.5) < 1e-6
    assert set(result.per_layer) == {"layer1.0.conv1.weight", "layer1.0.conv2.weight"}
