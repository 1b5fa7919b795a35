"""``curvprune export --onnx``: the exported model as ONNX, checked against PyTorch's output.

The model is exported with ``torch.onnx.export`` (the TorchScript-based exporter, which needs only
the ``onnx`` package; a dynamic batch dimension), then run with onnxruntime on the same probe
input: the largest difference to PyTorch's output must stay within float32 round-off
(``1e-4 · max(1, max |output|)``), else the export is refused and nothing is written.
Requires the ``onnx`` extra (``pip install "curvprune-core[onnx]"``: onnx, onnxruntime).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvprune.errors import ConfigError

__all__ = ["ONNX_FILE", "export_onnx"]

ONNX_FILE = "model.onnx"


def export_onnx(model: nn.Module, probe: Tensor, folder: Path) -> dict[str, Any]:
    """Write ``folder/model.onnx`` and check it with onnxruntime; return what the manifest keeps.

    Raises:
        ConfigError: the onnx extra is missing, the export fails, or onnxruntime's output differs.
    """
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            'ONNX export needs the onnx extra: pip install "curvprune-core[onnx]" @ export --onnx'
        ) from None
    path = folder / ONNX_FILE
    model = model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(
                model, (probe,), str(path), dynamo=False, input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    except Exception as exc:  # the exporter raises many types; report one line
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ConfigError(f"ONNX export failed ({reason}) @ export --onnx") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(probe).detach().double().cpu()
    got = torch.from_numpy(session.run(None, {"input": probe.cpu().numpy()})[0]).double()
    difference = float((got - expected).abs().max()) if expected.numel() else 0.0
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    if got.shape != expected.shape or not difference <= tolerance:
        raise ConfigError(
            f"the ONNX model's output differs from PyTorch's by {difference:.3g} (tolerance "
            f"{tolerance:.3g}) @ export --onnx"
        )
    return {"file": ONNX_FILE, "max_abs_difference": difference, "tolerance": tolerance}
