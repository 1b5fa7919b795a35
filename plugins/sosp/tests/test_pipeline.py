"""SOSP in the pipeline: digits CNN, ``channel`` mask, plan, bad input, physical removal."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import curvprune
from curvprune import ConfigError, MemoryPlanError, Pipeline
from curvprune.testing import DigitsCNN
from curvprune_sosp import plot_bottlenecks_from_run

pytestmark = pytest.mark.filterwarnings("ignore::curvprune_sosp.RankingStabilityWarning")


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    digits = load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:256])
    return DataLoader(TensorDataset(x, y), batch_size=64)


def config(scorer: str, **mask) -> dict:
    return {
        "prune": {"sparsity": 0.5, "loss_samples": 64},
        "scorer": {"name": scorer, "num_samples": 128},
        "schedule": {"name": "oneshot"},
        "mask": {"name": "channel", **mask},
    }


@pytest.mark.parametrize("scorer", ["sosp-h", "sosp-i"])
def test_prunes_half_of_the_structures_globally(loader, scorer) -> None:
    torch.manual_seed(0)
    model = DigitsCNN()
    pipeline = Pipeline.from_config(config(scorer))
    result = pipeline.prune(model, loader)
    layout = result.masks.layout
    alive = layout.alive_structures(result.masks.flat)
    assert layout.n_structures == 16 + 32 + 64 and int((~alive).sum()) == 56
    assert result.steps[0].predicted_loss_change is not None
    # the classifier (never a structure) keeps every row
    assert bool(result.masks.tensors()["10.weight"].all())
    # removed structures are gated exactly: BN affine zeroed with the weights
    assert bool((model[1].weight[~alive[:16]] == 0).all())
    report = pipeline.scorer.bottlenecks  # set by the plugin's curvprune_pipeline_end hook
    assert [g.size for g in report.groups] == [16, 32, 64]
    assert sum(g.kept for g in report.groups) == 56
    if scorer == "sosp-i":
        removed = set((~alive).nonzero().squeeze(1).tolist())
        assert removed == set(pipeline.scorer.greedy.order.tolist())
    # the physically smaller model computes the same function
    x = next(iter(loader))[0][:16]
    model.eval()
    with torch.no_grad():
        before = model(x)
        removal = pipeline.remove(model, result.masks, example_input=x)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert removal.params_after < removal.params_before
    assert model[0].out_channels == int(alive[:16].sum())


def test_plan_reports_and_refuses_the_s_squared_matrix() -> None:
    model = DigitsCNN()
    pipeline = Pipeline.from_config(config("sosp-i"))
    plan = pipeline.plan(model)
    s = 16 + 32 + 64
    assert plan.memory["scorer"] == s * s * 4 + 2 * (1 << 22) * 4
    tight = {**config("sosp-i"), "run": {"memory_limit_gb": plan.memory["scorer"] / 2**31}}
    with pytest.raises(MemoryPlanError, match=r"\(scorer: 0\.0\d GiB\).*scorer 'sosp-i'.*'sosp-h'"):
        Pipeline.from_config(tight).plan(model).check()
    small = {**config("sosp-i"), "scorer": {"name": "sosp-i", "max_jacobian_elements": 64}}
    assert Pipeline.from_config(small).plan(model).memory["scorer"] == s * s * 4 + 2 * 64 * 4
    assert "scorer" not in Pipeline.from_config(config("sosp-h")).plan(model).memory


def test_bad_combinations_are_refused_before_compute() -> None:
    with pytest.raises(ConfigError, match="min_channels >= 1 @ mask.min_channels"):
        Pipeline.from_config(config("sosp-h", min_channels=0))
    with pytest.raises(ConfigError, match="coupled = true @ mask.coupled"):
        Pipeline.from_config(config("sosp-i", coupled=False))
    with pytest.raises(ConfigError, match="mask.name"):
        Pipeline.from_config({**config("sosp-h"), "mask": {"name": "global"}})


@pytest.mark.slow
def test_run_removes_channels_physically_and_fine_tunes(tmp_path) -> None:
    """``curvprune run`` end to end (train 1 epoch, prune, remove, fine-tune): ~8 s."""
    cfg = {
        "model": {"name": "digits-cnn"},
        "data": {"name": "digits"},
        "train": {"epochs": 1},
        "prune": {"sparsity": 0.5, "loss_samples": 64},
        "scorer": {"name": "sosp-h", "num_samples": 256},
        "schedule": {"name": "oneshot"},
        "mask": {"name": "channel", "remove": True},
        "finetune": {"epochs": 1},
        "run": {"progress": False},
    }
    outcome = curvprune.execute_run(cfg, out=tmp_path, name="sosp", quiet=True)
    record = json.loads((outcome.run_dir / "result.json").read_text())
    structure = record["structure"]
    assert structure["params_after"] < structure["params_before"]
    assert structure["flops_after"] < structure["flops_before"]
    assert structure["max_output_difference"] < 1e-4
    assert record["accuracy"]["finetuned"] is not None
    report = record["scorer_report"]
    assert [g["size"] for g in report["bottlenecks"]["groups"]] == [16, 32, 64]
    assert "## Scorer report" in (outcome.run_dir / "report.md").read_text()
    assert report["figures"] == ["bottlenecks.png"]
    assert (outcome.run_dir / "bottlenecks.png").read_bytes()[:4] == b"\x89PNG"
    png = plot_bottlenecks_from_run(outcome.run_dir, tmp_path / "again.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("scorer", ["sosp-h", "sosp-i"])
def test_attention_models_are_scored_through_the_math_attention_path(scorer) -> None:
    """Two ViT layers make the second-order passes run through attention; the fused CPU kernel
    has no double backward / forward AD ("derivative ... not implemented" before the fix)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                              hidden_dim=128, mlp_dim=64, num_classes=4).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    pipeline = Pipeline.from_config({
        "scorer": {"name": scorer}, "mask": {"name": "channel", "scope": "layerwise"},
        "prune": {"sparsity": 0.3, "loss_samples": 0},
    })
    # the residual stream is a group too (its class token and position embedding gated with
    # it), so the run warns of its LayerNorms rather than of a refused group
    with pytest.warns(curvprune.CurvpruneWarning, match="LayerNorms over prunable channels"):
        result = pipeline.prune(model, [(x[:8], y[:8]), (x[8:], y[8:])])
    assert result.steps[-1].sparsity > 0
    assert result.masks.layout.structures.groups[0].name == "conv_proj"
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards


@pytest.mark.parametrize("net", ["InvertedResidualNet", "DenseCatNet", "GroupedNet",
                                 "SqueezeExciteNet", "CatNet", "ChunkNet"])
def test_sosp_h_prunes_and_removes_depthwise_grouped_cat_and_se_models(net) -> None:
    """The gates of depthwise, grouped, concatenated and SE groups (issue 18) carry SOSP: half
    the structures go, and the removed model computes what the masked one did."""
    import copy

    from curvprune.testing import nets

    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 3, (64,))
    data = DataLoader(TensorDataset(x, y), batch_size=32)
    model = getattr(nets, net)()
    pipeline = Pipeline.from_config({**config("sosp-h"), "prune": {"sparsity": 0.5,
                                                                   "loss_samples": 32}})
    result = pipeline.prune(model, data)
    layout = result.masks.layout
    alive = layout.alive_structures(result.masks.flat)
    assert 0 < int((~alive).sum()) < layout.n_structures
    model.eval()
    small = copy.deepcopy(model)
    pipeline.remove(small, result.masks)
    with torch.no_grad():
        assert torch.allclose(small(x[:8]), model(x[:8]), atol=1e-5)


@pytest.mark.parametrize("scorer", ["sosp-h", "sosp-i"])
def test_sosp_prunes_and_removes_attention_heads(scorer) -> None:
    """Attention heads (issue 18) are gated structures too: with the in-projections selected,
    SOSP ranks heads, and the removed ViT computes what the masked one did."""
    import copy

    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4,
                              hidden_dim=32, mlp_dim=64, num_classes=4).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    pipeline = Pipeline.from_config({
        "scorer": {"name": scorer}, "mask": {"name": "channel", "scope": "layerwise"},
        "prune": {"sparsity": 0.5, "loss_samples": 0,
                  "targets": ["Linear", "MultiheadAttention"]},
    })
    with pytest.warns(curvprune.StructureSkipWarning):
        result = pipeline.prune(model, [(x[:8], y[:8]), (x[8:], y[8:])])
    small = copy.deepcopy(model)
    pipeline.remove(small, result.masks)
    assert [layer.self_attention.num_heads for layer in small.encoder.layers] == [2, 2]
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


class _LastLogits(torch.nn.Module):
    """A Hugging Face causal LM as a classifier of the next token (SOSP's curvature needs
    tensor outputs, not a ``ModelOutput``)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits[:, -1]


@pytest.mark.parametrize("scorer", ["sosp-h", "sosp-i"])
def test_sosp_prunes_and_removes_hugging_face_heads_and_mlp_units(scorer) -> None:
    """A Hugging Face GPT-2 (fx cannot trace it): SOSP differentiates the gates of its heads
    and MLP hidden units (issue 18), and the removed model computes what the masked one did."""
    import copy

    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    model = _LastLogits(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_inner=24, n_positions=16,
        bos_token_id=0, eos_token_id=0))).double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (8, 10), generator=g)
    y = torch.randint(0, 50, (8,), generator=g)
    pipeline = Pipeline.from_config({
        "scorer": {"name": scorer}, "mask": {"name": "channel", "scope": "layerwise"},
        "prune": {"sparsity": 0.5, "loss_samples": 0, "targets": ["Linear", "Conv1D"]},
    })
    with pytest.warns(curvprune.StructureSkipWarning, match="MLP hidden units"):
        result = pipeline.prune(model, [(ids[:4], y[:4]), (ids[4:], y[4:])])
    kinds = {type(grp).__name__ for grp in result.masks.layout.structures.groups}
    assert {"HeadGroup", "MlpGroup"} <= kinds  # (by name: plugins see only the public API)
    small = copy.deepcopy(model)
    pipeline.remove(small, result.masks)
    assert [block.attn.num_heads for block in small.lm.transformer.h] == [2, 2]
    assert [block.mlp.c_fc.nf for block in small.lm.transformer.h] == [12, 12]
    with torch.no_grad():
        torch.testing.assert_close(small(ids), model(ids), rtol=0, atol=1e-10)
