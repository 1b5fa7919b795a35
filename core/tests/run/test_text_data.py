"""[data] name = "text": tokenizing, the calibration/held-out split, one-line errors, perplexity,
and safetensors of tied weights. Tiny GPT-2 and word-level tokenizer built offline."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from curvprune import ConfigError  # noqa: E402
from curvprune.config import DataConfig  # noqa: E402
from curvprune.errors import CurvpruneWarning  # noqa: E402
from curvprune.run.checkpoint_files import safetensors_state  # noqa: E402
from curvprune.run.data import build_data, check_data, make_loaders  # noqa: E402
from curvprune.run.models import build_model  # noqa: E402
from curvprune.run.text import split_stream  # noqa: E402
from curvprune.run.training import evaluate  # noqa: E402
from curvprune.testing import sample_text, tiny_causal_lm  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_causal_lm(tmp_path_factory.mktemp("lm"), n_positions=64)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(sample_text(200, seed=1))
    return path


def _cfg(path, **kw):
    return DataConfig(name="text", path=str(path), **{"seq_len": 16, "num_samples": 8, **kw})


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------
def test_the_held_out_sequences_are_the_end_of_the_stream_and_never_overlap():
    stream = torch.arange(1000)
    train, test = split_stream(stream, DataConfig(name="text", seq_len=10, num_samples=20))
    assert test.shape == (10, 10) and train.shape == (20, 10)  # 10 % of 1000 tokens held out
    assert torch.equal(test.flatten(), torch.arange(900, 1000))
    assert int(train.max()) < 900  # no calibration token in the held-out part
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10)) for row in train)
    starts = train[:, 0]
    assert len(set(starts.tolist())) == 20 and bool((starts % 10 == 0).all())  # whole, distinct
    assert int(starts[0]) == 0 and int(starts[-1]) == 890  # spread over the calibration part


def test_fewer_sequences_than_num_samples_are_all_used_with_a_warning():
    with pytest.warns(CurvpruneWarning, match="gives 9 calibration sequences"):
        train, test = split_stream(torch.arange(100), DataConfig(name="text", seq_len=10))
    assert train.shape == (9, 10) and test.shape == (1, 10)


def test_a_text_of_one_calibration_and_one_held_out_sequence_is_enough():
    train, test = split_stream(torch.arange(20), DataConfig(name="text", seq_len=10,
                                                           num_samples=1))
    assert torch.equal(train[0], torch.arange(10)) and torch.equal(test[0], torch.arange(10, 20))


# --------------------------------------------------------------------------------------------
# Building the data
# --------------------------------------------------------------------------------------------
def test_text_is_tokenized_with_the_model_folders_tokenizer(lm, text_file):
    bundle = build_data(_cfg(text_file), model=f"hf:{lm}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(lm), local_files_only=True)
    assert bundle.metric == "perplexity" and bundle.name == "text"
    assert bundle.num_classes == len(tokenizer)
    assert len(bundle.train) == 8
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    held = max(1, round(0.1 * len(ids) / 16))
    assert len(bundle.test) == held
    assert bundle.test.tensors[0].flatten().tolist() == ids[len(ids) - 16 * held:]
    x, y = next(iter(make_loaders(bundle, _cfg(text_file, batch_size=4), seed=0)[0]))
    assert x.dtype == torch.long and x.shape == (4, 16) and torch.equal(x, y)


def test_a_folder_of_txt_files_is_read_in_name_order_with_eos_between(lm, tmp_path):
    (tmp_path / "b.txt").write_text("sparse dense " * 20)
    (tmp_path / "a.txt").write_text("the model " * 20)
    (tmp_path / "notes.md").write_text("ignored ignored")
    bundle = build_data(_cfg(tmp_path, seq_len=4, num_samples=10, holdout=0.5),
                        model=f"hf:{lm}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(lm), local_files_only=True)
    stream = torch.cat([bundle.train.tensors[0].flatten(), bundle.test.tensors[0].flatten()])
    expected = (tokenizer("the model " * 20)["input_ids"] + [tokenizer.eos_token_id]
                + tokenizer("sparse dense " * 20)["input_ids"])
    # 81 tokens: the last 10 sequences of 4 held out, the 10 before them for calibration, and
    # the one token between them in neither
    assert len(expected) == 81 and stream.tolist() == expected[:40] + expected[41:]


def test_data_tokenizer_names_another_folder(lm, text_file, tmp_path):
    transformers.AutoTokenizer.from_pretrained(str(lm)).save_pretrained(tmp_path / "tok")
    cfg = _cfg(text_file, tokenizer=str(tmp_path / "tok"))
    assert len(build_data(cfg, model=f"hf:{tmp_path / 'no-model-needed'}").train) == 8
    assert len(build_data(cfg).train) == 8  # no model name: the tokenizer alone


@pytest.mark.parametrize(("case", "message", "where"), [
    ("no path", "data 'text' needs [data] path", "data.path"),
    ("missing path", "no text file or folder", "data.path"),
    ("folder without txt", "no .txt file in the folder", "data.path"),
    ("non-hf model", "data 'text' needs a Hugging Face causal language model", "model.name"),
    ("no tokenizer", "no tokenizer in", "data.tokenizer"),
    ("missing tokenizer folder", "no tokenizer folder", "data.tokenizer"),
    ("seq_len too long", "seq_len = 65 is longer than the model's 64 positions", "data.seq_len"),
])
def test_bad_text_config_is_one_line_without_reading_anything(lm, text_file, tmp_path, case,
                                                               message, where):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    (bare / "config.json").write_text((lm / "config.json").read_text())
    cfg, model = {
        "no path": (DataConfig(name="text"), f"hf:{lm}"),
        "missing path": (_cfg(tmp_path / "nope.txt"), f"hf:{lm}"),
        "folder without txt": (_cfg(tmp_path), f"hf:{lm}"),
        "non-hf model": (_cfg(text_file), "digits-mlp"),
        "no tokenizer": (_cfg(text_file), f"hf:{bare}"),
        "missing tokenizer folder": (_cfg(text_file, tokenizer=str(tmp_path / "x")), f"hf:{lm}"),
        "seq_len too long": (_cfg(text_file, seq_len=65), f"hf:{lm}"),
    }[case]
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        check_data(cfg, model=model)
    text = str(info.value)
    assert "\n" not in text and text.endswith(f"@ {where}")


def test_a_text_shorter_than_two_sequences_is_one_line(lm, tmp_path):
    (tmp_path / "short.txt").write_text("the model prunes")
    with pytest.raises(ConfigError, match=r"has 3 tokens, fewer than the 32 .* @ data\.path$"):
        build_data(_cfg(tmp_path / "short.txt"), model=f"hf:{lm}")


def test_a_text_that_is_not_utf8_is_one_line(lm, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"the model \xff\xfe")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text .* @ data\.path$"):
        build_data(_cfg(tmp_path / "bad.txt"), model=f"hf:{lm}")


def test_an_unknown_data_name_lists_text():
    with pytest.raises(ConfigError, match="did you mean 'text'"):
        check_data(DataConfig(name="texts"))


# --------------------------------------------------------------------------------------------
# Perplexity, and tied weights in safetensors
# --------------------------------------------------------------------------------------------
def test_perplexity_is_exp_of_the_mean_next_token_cross_entropy(lm, text_file):
    bundle = build_data(_cfg(text_file, holdout=0.3), model=f"hf:{lm}")
    model = build_model(f"hf:{lm}").eval()
    loader = DataLoader(bundle.test, batch_size=3)  # uneven last batch: weighted by sequences
    ppl, loss = evaluate(model, loader, device=torch.device("cpu"), metric="perplexity")
    ids = bundle.test.tensors[0]
    with torch.no_grad():
        expected = float(model(ids, labels=ids).loss)  # transformers' own shifted token mean
    assert loss == pytest.approx(expected, rel=1e-5)
    assert ppl == pytest.approx(math.exp(expected), rel=1e-5)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(model, loader, device=torch.device("cpu"), metric="bleu")


def test_tied_weights_are_saved_as_a_copy_and_load_back_tied(lm):
    from safetensors.torch import load, save

    model = build_model(f"hf:{lm}")
    state = safetensors_state(model.state_dict())
    assert "lm_head.weight" in state and "transformer.wte.weight" in state
    fresh = build_model(f"hf:{lm}")
    with torch.no_grad():
        fresh.transformer.wte.weight.zero_()
    fresh.load_state_dict(load(save(state)))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
