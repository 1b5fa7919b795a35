"""Hugging Face models: hf:<folder> loading (never a download), Conv1D targets, tied weights
selected once, the causal-LM default loss, and pruning a tiny GPT-2 built from a config."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

transformers = pytest.importorskip("transformers")

from curvprune import ConfigError, Pipeline, default_loss, select_parameters  # noqa: E402
from curvprune.run.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                     n_head=2, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _tokens(n=8, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, t), generator=g)
    return DataLoader(TensorDataset(ids, ids), batch_size=4)


def test_a_local_folder_loads_as_a_causal_lm(gpt2_folder):
    model = build_model(f"hf:{gpt2_folder}", num_classes=10)  # num_classes is not the heads
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.transformer.wte.weight is model.lm_head.weight  # tied


def test_a_bert_config_falls_back_to_automodel(tmp_path):
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path)
    assert type(build_model(f"hf:{tmp_path}")).__name__ == "BertModel"


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing", "no model folder"),
    (lambda p: p, "not a Hugging Face model folder (no config.json)"),
])
def test_a_bad_folder_is_one_line_and_nothing_is_downloaded(tmp_path, make, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        build_model(f"hf:{make(tmp_path)}")
    assert "\n" not in str(info.value) and str(info.value).endswith("@ model.name")


def test_a_folder_whose_config_names_no_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ConfigError, match="cannot load the model in"):
        build_model(f"hf:{tmp_path}")


def test_default_targets_take_conv1d_and_linear_and_a_tied_weight_once(gpt2_folder):
    model = build_model(f"hf:{gpt2_folder}")
    layout = select_parameters(model)
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in layout.names)
    assert len(layout.names) == 2 * 4  # attn c_attn, c_proj; mlp c_fc, c_proj; per block
    assert not any("wte" in n or "wpe" in n or "ln_" in n or "lm_head" in n for n in layout.names)


def test_the_default_loss_of_a_causal_lm_is_the_shifted_next_token_loss(gpt2_folder):
    model = build_model(f"hf:{gpt2_folder}").eval()
    ids = next(iter(_tokens()))[0]
    out = model(ids)
    expected = model(ids, labels=ids).loss  # transformers' own shifted loss
    torch.testing.assert_close(default_loss(out, ids), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="pass loss_fn"):
        default_loss({"hidden": out.logits}, ids)


def test_a_tiny_gpt2_prunes_through_the_pipeline_with_the_default_loss(gpt2_folder):
    model = build_model(f"hf:{gpt2_folder}").eval()
    pipeline = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 8},
        "scorer": {"name": "magnitude"},
        "mask": {"name": "layerwise"},
    })
    result = pipeline.prune(model, _tokens())
    assert result.sparsity == pytest.approx(0.5)
    step = result.steps[0]
    assert step.loss_before is not None and step.loss_after is not None  # the LM loss was used
    assert float((model.transformer.h[0].mlp.c_fc.weight == 0).float().mean()) == pytest.approx(0.5)
    logits = model(next(iter(_tokens()))[0]).logits
    assert torch.isfinite(logits).all()
