"""End to end on a causal language model (issue 16): `curvprune run` of an `hf:` folder with
`[data] name = "text"` reports held-out perplexity, `curvprune export` writes a Hugging Face
folder that transformers reloads unchanged, and every bad input is one line with nothing written.

The tiny GPT-2 and its word-level tokenizer are built offline (curvprune.testing.causal_lm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from curvprune import ConfigError, execute_run  # noqa: E402
from curvprune.cli import main  # noqa: E402
from curvprune.run.export import export_run, load_pruned  # noqa: E402
from curvprune.run.models import build_model  # noqa: E402
from curvprune.testing import sample_text, tiny_causal_lm  # noqa: E402

CONFIG = """
[model]
name = "hf:{model}"
[data]
name = "text"
path = "{text}"
seq_len = 16
num_samples = 32
batch_size = 8
{data_extra}
[prune]
sparsity = 0.5
loss_samples = 16
[scorer]
name = "magnitude"
[schedule]
name = "oneshot"
[mask]
name = "layerwise"
[finetune]
epochs = 1
optimizer = "adam"
lr = 1e-3
[run]
device = "cpu"
progress = false
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text(sample_text(150, seed=3))
    return tiny_causal_lm(root / "gpt2", n_positions=32), root / "text.txt"


def _config(tmp_path: Path, model: Path, text: Path, data_extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(model=model, text=text, data_extra=data_extra))
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # transformers' own "Loading weights" bars may precede the error when the model loaded
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_a_text_run_reports_perplexity_and_exports_a_hugging_face_folder(corpus, tmp_path,
                                                                          capsys):
    model_dir, text = corpus
    config = _config(tmp_path, model_dir, text)
    assert main(["run", str(config), "--out", str(tmp_path / "runs"), "--name", "lm"]) == 0
    out = capsys.readouterr().out
    assert "dense perplexity" in out and "pruned perplexity" in out
    assert "fine-tuned perplexity" in out
    run = tmp_path / "runs" / "lm"
    result = json.loads((run / "result.json").read_text())
    assert result["metric"] == "perplexity" and result["dense"]["source"] == "pretrained"
    ppl, loss = result["perplexity"], result["loss"]
    for when in ("dense", "pruned", "finetuned"):
        assert ppl[when] == pytest.approx(math.exp(loss[when]), rel=1e-12)
        assert result["accuracy"][when] is None
    assert result["data"]["train"] == 32 and result["data"]["test"] >= 1
    assert result["sparsity"]["total"] == pytest.approx(0.5)
    assert "| perplexity (held out) |" in (run / "report.md").read_text()

    assert main(["export", str(run)]) == 0
    export = run / "export"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight  # still tied
    ours = load_pruned(run, build_model(f"hf:{model_dir}"))
    masks = {k: v.bool() for k, v in _masks(run).items()}
    state = reloaded.state_dict()
    for name, keep in masks.items():
        assert bool((state[name][~keep] == 0).all()) and float((~keep).float().mean()) > 0.4
    ids = torch.randint(0, reloaded.config.vocab_size, (2, 16), generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours(ids).logits)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer("the model prunes")["input_ids"] == transformers.AutoTokenizer \
        .from_pretrained(model_dir)("the model prunes")["input_ids"]
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["kind"] == "huggingface" and "model.safetensors" in manifest["files"]
    assert not list(export.glob("*.bin"))  # safetensors only
    with pytest.raises(ConfigError, match="a Hugging Face export folder"):
        load_pruned(export, build_model(f"hf:{model_dir}"))


def _masks(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "masks.safetensors")


def test_export_refuses_an_existing_folder_and_writes_nothing_else(corpus, tmp_path):
    model_dir, text = corpus
    config = _config(tmp_path, model_dir, text).read_text().replace("epochs = 1", "epochs = 0")
    outcome = execute_run(_write(tmp_path / "c.toml", config), out=tmp_path / "runs", quiet=True)
    assert outcome.result["perplexity"]["finetuned"] is None
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError):
        export_run(outcome.run_dir, tmp_path / "taken")
    assert not any((tmp_path / "taken").iterdir())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("case", "message", "where"), [
    ("missing path", "no text file or folder", "data.path"),
    ("short text", "fewer than the 32 of one calibration", "data.path"),
    ("no tokenizer", "no tokenizer in", "data.tokenizer"),
    ("non-hf model", "needs a Hugging Face causal language model", "model.name"),
])
def test_bad_text_input_is_one_line_and_leaves_no_run_folder(corpus, tmp_path, capsys, case,
                                                             message, where):
    model_dir, text = corpus
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "short.txt").write_text("the model prunes " * 5)
    config = {
        "missing path": lambda: _config(tmp_path, model_dir, tmp_path / "nope.txt"),
        "short text": lambda: _config(tmp_path, model_dir, tmp_path / "short.txt"),
        "no tokenizer": lambda: _config(tmp_path, bare, text),
        "non-hf model": lambda: _write(tmp_path / "c.toml", _config(tmp_path, model_dir, text)
                                       .read_text().replace(f"hf:{model_dir}", "digits-mlp")),
    }[case]()
    runs = tmp_path / "runs"
    assert main(["run", str(config), "--out", str(runs), "--name", "bad"]) == 2
    line = _error_line(capsys)
    assert message in line and line.endswith(f"@ {where}")
    assert not runs.exists() or not any(runs.iterdir())
    if case != "short text":  # static: validate finds it without tokenizing or loading weights
        assert main(["validate", str(config)]) == 2
        assert message in _error_line(capsys)


def test_compare_of_text_runs_tabulates_perplexity(corpus, tmp_path):
    from curvprune.run.compare import compare

    model_dir, text = corpus
    base = _config(tmp_path, model_dir, text).read_text().replace("epochs = 1", "epochs = 0")
    configs = [_write(tmp_path / "layerwise.toml", base),
               _write(tmp_path / "global.toml", base.replace('name = "layerwise"',
                                                             'name = "global"'))]
    folder = compare([str(c) for c in configs], out=tmp_path / "cmp", sparsities=[0.3, 0.6],
                     quiet=True)
    summary = json.loads((folder / "comparison.json").read_text())["summary"]
    assert all(s["metric"] == "perplexity" and s["perplexity_pruned"] > 1 for s in summary)
    assert all(s["accuracy_pruned"] is None for s in summary)
    md = (folder / "comparison.md").read_text()
    assert "## Perplexity vs sparsity" in md and "fine-tuned are the test perplexity" in md
    assert (folder / "accuracy_vs_sparsity.png").stat().st_size > 1000


def test_a_curvature_scorer_prunes_a_causal_lm_on_text(corpus, tmp_path):
    model_dir, text = corpus
    config = _config(tmp_path, model_dir, text).read_text().replace("epochs = 1", "epochs = 0")
    config = config.replace('name = "magnitude"', 'name = "obs"')
    config += '[estimator]\nname = "diagfisher"\nnum_grads = 16\n'
    r = execute_run(_write(tmp_path / "obs.toml", config), out=tmp_path / "runs", quiet=True).result
    assert r["loss_change"]["predicted"] is not None and r["loss_change"]["measured"] is not None
    assert math.isfinite(r["perplexity"]["pruned"]) and r["sparsity"]["total"] == pytest.approx(0.5)


SPARSEGPT = """
[model]
name = "hf:{model}"
[data]
name = "text"
path = "{text}"
seq_len = 16
num_samples = 16
batch_size = 8
[estimator]
name = "sparsegpt"
num_grads = 16
[scorer]
name = "obs"
[schedule]
name = "oneshot"
[mask]
name = "layerwise"
[prune]
sparsity = 0.5
loss_samples = 8
[run]
device = "cpu"
progress = false
checkpoint_every = 1
"""


class _Stop(Exception):
    pass


def test_sparsegpt_run_from_toml_resumes_between_blocks_to_identical_masks(corpus, tmp_path):
    """SparseGPT from a TOML file, sequential over the blocks, reports perplexity; killed after
    the first block's checkpoint and resumed, it ends with the uninterrupted run's tensors."""
    from safetensors.torch import load_file

    model_dir, text = corpus
    config = tmp_path / "sparsegpt.toml"
    config.write_text(SPARSEGPT.format(model=model_dir, text=text))
    out = tmp_path / "runs"
    reference = execute_run(config, out=out, name="ref", quiet=True)
    assert reference.result["metric"] == "perplexity"
    assert reference.result["steps"][0]["sparsity"] == pytest.approx(0.5, abs=0.01)

    def stop(_path):
        raise _Stop

    with pytest.raises(_Stop):
        execute_run(config, out=out, name="cut", quiet=True, on_checkpoint=stop)
    partial = out / "cut.partial"
    raw = torch.load(partial / "checkpoint.pt", weights_only=True)
    assert raw["phase"] == "prune" and raw["extra"]["oneshot"]["stages_done"] == 1
    resumed = execute_run(None, resume=partial, quiet=True)
    assert resumed.result["run"]["resumed"] == {"phase": "prune", "step": 1}
    for name in ("model.safetensors", "masks.safetensors"):
        a, b = load_file(str(reference.run_dir / name)), load_file(str(resumed.run_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_of_a_sequential_sparsegpt_run_counts_the_calibration(corpus, tmp_path, capsys):
    model_dir, text = corpus
    config = tmp_path / "sparsegpt.toml"
    config.write_text(SPARSEGPT.format(model=model_dir, text=text))
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "memory calibration" in out and "memory activations" in out


def test_a_text_run_removes_attention_heads_and_loads_back(corpus, tmp_path):
    """`[mask] remove = true` on GPT-2 (issue 18): fx cannot trace it, so only its attention
    heads and MLP hidden units prune (said in the warnings); they are removed before
    fine-tuning, the run reloads at the smaller widths, and export refuses the Hugging Face
    folder in one line."""
    model_dir, text = corpus
    config = _config(tmp_path, model_dir, text).read_text()
    config = config.replace('name = "magnitude"', 'name = "magnitude"\ngranularity = "channel"')
    # layerwise: every group loses half of its units, so each attention module loses one of
    # its two heads whatever the group-sum magnitudes of heads against MLP units are
    config = config.replace('[mask]\nname = "layerwise"',
                            '[mask]\nname = "channel"\nscope = "layerwise"\nremove = true')
    run = execute_run(_write(tmp_path / "c.toml", config), out=tmp_path / "runs", name="heads",
                      quiet=True).run_dir
    result = json.loads((run / "result.json").read_text())
    structure = result["structure"]
    kept = structure["kept"]
    assert set(kept) == {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn", "mlp")}
    assert kept["transformer.h.0.attn"] == kept["transformer.h.1.attn"] == [1, 2]
    assert sum(kept[f"transformer.h.{i}.mlp"][0] for i in (0, 1)) < 2 * 128
    assert structure["max_output_difference"] < 1e-5
    assert structure["params_after"] < structure["params_before"]
    assert any("only its attention heads and Hugging Face MLP hidden units are pruned" in w
               for w in result["warnings"])
    small = load_pruned(run, build_model(f"hf:{model_dir}"))
    assert [block.attn.num_heads for block in small.transformer.h] == [1, 1]
    assert [block.mlp.c_fc.nf for block in small.transformer.h] == [
        kept[f"transformer.h.{i}.mlp"][0] for i in (0, 1)]
    ids = torch.randint(0, small.config.vocab_size, (2, 16), generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        assert small(ids).logits.shape == (2, 16, small.config.vocab_size)
    with pytest.raises(ConfigError, match="removed channels of an hf: model"):
        export_run(run, tmp_path / "export")
