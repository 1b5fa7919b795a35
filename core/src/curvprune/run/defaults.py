"""The embedded default run: ``curvprune run`` with no config file.

The bundled digits, the digits CNN trained from scratch, then pruned to 90 % of its conv and
linear weights: with WoodFisher + OBS in four one-shot steps when the woodfisher plugin is
installed, with global magnitude pruning otherwise; two epochs of fine-tuning with masks held.
Everything runs offline on a CPU in well under a minute.
"""

from __future__ import annotations

from typing import Any

from curvprune.plugin.registry import Registry

__all__ = ["default_config"]


def default_config(registry: Registry) -> dict[str, Any]:
    """The default run's config as a raw dict, for the installed components."""
    config: dict[str, Any] = {
        "model": {"name": "digits-cnn"},
        "data": {"name": "digits"},
        "train": {"epochs": 15, "lr": 0.05},
        "prune": {"sparsity": 0.9, "targets": ["Conv2d", "Linear"]},
        "mask": {"name": "global"},
        "finetune": {"epochs": 2, "lr": 0.01},
    }
    if ("estimator", "woodfisher") in registry:
        config["estimator"] = {
            "name": "woodfisher", "block_size": 128, "damping": 1e-4, "num_grads": 256,
        }
        config["scorer"] = {"name": "obs"}
        config["schedule"] = {"name": "oneshot", "steps": 4}
    else:
        config["scorer"] = {"name": "magnitude"}
        config["schedule"] = {"name": "oneshot", "steps": 1}
    return config
