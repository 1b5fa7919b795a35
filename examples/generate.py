"""Write one example config per valid pairing of the method matrix into ``examples/matrix/``.

The matrix is {no estimator, diagfisher, kfac, woodfisher, mfac static, mfac dynamic} ×
{magnitude, obs, woodtaylor} × {one-shot, multi-step, gradual} × {global, layerwise, 2:4}. A
pairing is valid when the scorer and the estimator agree (``magnitude`` without an estimator,
``obs``/``woodtaylor`` with one): 9 + 5 × 2 × 9 = 99 files. ``magnitude`` *with* an estimator is
valid too but computes a curvature nobody reads (``curvprune validate`` warns), so it is not
worth a file. Each file runs on one of the two digits models, alternating so that every pair of
choices from two axes meets both models.

Run ``python examples/generate.py`` after changing a setting here; it also rewrites the matrix
table in ``examples/README.md`` (between the ``matrix`` markers). ``tests/test_examples.py``
checks that the committed files are exactly what this script writes, and runs every one.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MATRIX = HERE / "matrix"

MODELS = ("mlp", "cnn")
#: name in file names → (the [estimator] table, one line on what it is); None: no estimator.
ESTIMATORS: dict[str, tuple[dict[str, object], str] | None] = {
    "none": None,
    "diagfisher": ({"name": "diagfisher", "damping": 1e-3, "num_grads": 256},
                   "diagonal empirical Fisher (OBD's curvature)"),
    "kfac": ({"name": "kfac", "damping": 1e-3, "num_grads": 256},
             "K-FAC through curvlinops: one Kronecker product per layer, refitted on the model "
             "and data"),
    "woodfisher": ({"name": "woodfisher", "block_size": 128, "damping": 1e-3, "num_grads": 256},
                   "WoodFisher: exact blocks of 128 weights of the empirical Fisher"),
    "mfacstatic": ({"name": "mfac", "algorithm": "static", "damping": 1e-3, "num_grads": 64,
                    "fisher_mini_batch": 4, "block_size": 1000000},
                   "M-FAC static: matrix-free inverse of the unblocked Fisher of all m gradients"),
    "mfacdynamic": ({"name": "mfac", "algorithm": "dynamic", "damping": 1e-3, "num_grads": 64,
                     "fisher_mini_batch": 4},
                    "M-FAC dynamic: the sliding-window inverse (the window is num_grads by "
                    "default)"),
}
SCORERS = {
    "magnitude": "magnitude |w|: no curvature, no data",
    "obs": "OBS saliency w²/(2[F⁻¹]_qq) and the summed compensating update −F⁻¹u",
    "woodtaylor": "WoodTaylor: OBS with the first-order term ḡᵀδ of the local model kept",
}
#: woodtaylor's options in the matrix: the first-order move clipped to 0.3 % of each layer's norm.
WOODTAYLOR = {"normalize_update": True, "normalize": "first_order", "normalize_update_mult": 0.003}
#: name → ([schedule] table, [finetune] epochs, description).
SCHEDULES: dict[str, tuple[dict[str, object], int, str]] = {
    "oneshot": ({"name": "oneshot", "steps": 1}, 0, "one-shot in one step"),
    "multistep": ({"name": "oneshot", "steps": 4}, 0,
                  "one-shot in 4 steps, the curvature recomputed before each"),
    "gradual": ({"name": "gradual", "start": 0, "end": 60, "frequency": 10,
                 "initial_sparsity": 0.1}, 4,
                "gradual (cubic) during 4 fine-tuning epochs, pruning every 10 optimizer steps"),
}
MASKS: dict[str, tuple[dict[str, object], str]] = {
    "global": ({"name": "global"}, "one threshold across all layers"),
    "layerwise": ({"name": "layerwise"}, "the same sparsity in every layer"),
    "nm24": ({"name": "nm", "n_m": "2:4"},
             "2:4 semi-structured sparsity (2 of every 4 consecutive input weights kept)"),
}
SPARSITY = {"mlp": 0.8, "cnn": 0.9}  # global and layerwise; 2:4 is exactly 0.5
TRAIN_EPOCHS = 15


def pairings() -> list[tuple[str, str, str, str, str]]:
    """(model, estimator, scorer, schedule, mask) for every valid pairing, in table order."""
    out = []
    for (i, est), (j, scorer), (k, schedule), (m, mask) in itertools.product(
        enumerate(ESTIMATORS), enumerate(SCORERS), enumerate(SCHEDULES), enumerate(MASKS)
    ):
        if (est == "none") != (scorer == "magnitude"):
            continue
        out.append((MODELS[(i + j + k + m) % 2], est, scorer, schedule, mask))
    return out


def file_name(model: str, est: str, scorer: str, schedule: str, mask: str) -> str:
    """``<model>-<estimator>-<scorer>-<schedule>-<mask>.toml``."""
    return f"{model}-{est}-{scorer}-{schedule}-{mask}.toml"


def _value(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and value < 0.01:
        return f"{value:.0e}".replace("e-0", "e-")  # 1e-3, as people write it
    return str(value).lower() if isinstance(value, bool) else str(value)


def _table(name: str, values: dict[str, object]) -> list[str]:
    return ["", f"[{name}]", *(f"{k} = {_value(v)}" for k, v in values.items())]


def render(model: str, est: str, scorer: str, schedule: str, mask: str) -> str:
    """The TOML text of one pairing."""
    estimator = ESTIMATORS[est]
    schedule_table, finetune, schedule_text = SCHEDULES[schedule]
    mask_table, mask_text = MASKS[mask]
    lines = [f"# digits-{model} · {'no estimator' if estimator is None else est} · {scorer} · "
             f"{schedule} · {mask}"]
    if estimator is not None:
        lines.append(f"# curvature: {estimator[1]}")
    lines += [f"# scorer: {SCORERS[scorer]}", f"# schedule: {schedule_text}", f"# mask: {mask_text}"]
    lines += _table("model", {"name": f"digits-{model}"})
    lines += _table("data", {"name": "digits"})
    lines += _table("train", {"epochs": TRAIN_EPOCHS})
    lines += _table("prune", {"sparsity": 0.5 if mask == "nm24" else SPARSITY[model]})
    if mask == "nm24" and model == "cnn":
        lines += ["# the first conv has 1 input channel: 2:4 groups need inputs divisible by 4",
                  'ignore = ["0.weight"]']
    if estimator is not None:
        lines += _table("estimator", estimator[0])
    if scorer == "woodtaylor":
        lines += ["", "# the exact method (woodtaylor's default) collapses a trained model: the",
                  "# move −F⁻¹ḡ is several times ‖w‖; clip it to a small trust radius",
                  "# (docs/methods/woodfisher.md)"]
        lines += _table("scorer", {"name": scorer, **WOODTAYLOR})[1:]
    else:
        lines += _table("scorer", {"name": scorer})
    lines += _table("schedule", schedule_table)
    lines += _table("mask", mask_table)
    if finetune:
        lines += _table("finetune", {"epochs": finetune})
    lines += _table("run", {"progress": False})
    return "\n".join(lines) + "\n"


def readme_table() -> str:
    """The README's matrix: a row per estimator and scorer, a column per schedule."""
    rows = {}
    for model, est, scorer, schedule, mask in pairings():
        link = f"[{mask} · {model}](matrix/{file_name(model, est, scorer, schedule, mask)})"
        rows.setdefault((est, scorer), {}).setdefault(schedule, []).append(link)
    labels = {"none": "—", "woodfisher": "woodfisher (B = 128)", "mfacstatic": "mfac static",
              "mfacdynamic": "mfac dynamic"}
    lines = ["| estimator | scorer | one-shot, 1 step | one-shot, 4 steps | gradual |",
             "|---|---|---|---|---|"]
    for (est, scorer), cells in rows.items():
        lines.append(f"| {labels.get(est, est)} | {scorer} | "
                     + " | ".join("<br>".join(cells[s]) for s in SCHEDULES) + " |")
    return "\n".join(lines)


def expected_files() -> dict[str, str]:
    """File name → text, for every valid pairing."""
    return {file_name(*p): render(*p) for p in pairings()}


def main() -> int:
    MATRIX.mkdir(exist_ok=True)
    files = expected_files()
    for stale in MATRIX.glob("*.toml"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (MATRIX / name).write_text(text, encoding="utf-8")
    readme = HERE / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = f"<!-- matrix:start -->\n{readme_table()}\n<!-- matrix:end -->"
    new, count = re.subn(r"<!-- matrix:start -->.*?<!-- matrix:end -->", block, text, flags=re.S)
    if count != 1:
        print("examples/README.md has no matrix markers", file=sys.stderr)
        return 1
    readme.write_text(new, encoding="utf-8")
    print(f"wrote {len(files)} configs to {MATRIX.relative_to(HERE.parent)}/ and the README table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
