"""Sequential calibration end to end on transformers models built from configs (no download).

The pipeline's stage driver (cached block inputs, the prefix forward for the other layers) is
checked against a reference written here from the papers' definition: before a layer is pruned,
its calibration inputs are recorded by running the *whole* model, whose earlier layers are
already pruned; the layers of one block share one such pass (the reference's block-wise mode).
Everything in float64, so masks must be identical and weights equal to round-off.
"""

from __future__ import annotations

import pytest
import torch

from curvprune import ConfigError, LayerwiseMask, Pipeline, select_parameters
from curvprune_sparsegpt import (
    LayerHessian,
    set_weight_matrix,
    sparsegpt,
    wanda_scores,
    weight_matrix,
)

transformers = pytest.importorskip("transformers")

F64 = torch.float64
VOCAB = 64


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg), "transformer.h"


def _llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg), "model.layers"


def _bert():
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg), "encoder.layer"


MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}


def _model(kind: str):
    torch.manual_seed(0)
    model, blocks = MODELS[kind]()
    return model.double().eval(), blocks


def _data(n: int = 24, batch: int = 8, seq: int = 16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    return [(ids[i : i + batch], ids[i : i + batch]) for i in range(0, n, batch)]


def _loss(out, y):
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return hidden.square().mean()


def _reference(
    model, blocks: str, data, *, sparsity: float, stages: str = "block", method: str = "sparsegpt"
):
    """Prune ``model`` in place the papers' way: stage by stage, inputs from a full forward."""
    layout = select_parameters(model)
    modules = dict(model.named_modules())
    groups: dict[str, list[str]] = {}
    for name in layout.names:
        owner = name.rpartition(".")[0]
        key = owner
        if stages == "block" and owner.startswith(blocks + "."):
            key = ".".join(owner.split(".")[: blocks.count(".") + 2])
        groups.setdefault(key, []).append(name)
    order = {path: i for i, path in enumerate(modules)}
    for key in sorted(groups, key=order.__getitem__):
        names = groups[key]
        owners = [modules[n.rpartition(".")[0]] for n in names]
        accs = [LayerHessian(m, dtype=F64) for m in owners]
        handles = [
            m.register_forward_pre_hook(lambda _, a, acc=acc: acc.add_batch(a[0]))
            for m, acc in zip(owners, accs, strict=True)
        ]
        with torch.no_grad():
            for x, _ in data:
                model(x)
        for h in handles:
            h.remove()
        for name, module, acc in zip(names, owners, accs, strict=True):
            w = weight_matrix(module)
            if method == "sparsegpt":
                set_weight_matrix(
                    module, sparsegpt(w, acc, sparsity=sparsity, scope="layer").weight
                )
                continue
            scores = wanda_scores(w, acc)  # the pipeline's layerwise mask ranks the whole layer
            sub = select_parameters(model).subset([layout.names.index(name)])
            shaped = scores.t() if type(module).__name__ == "Conv1D" else scores
            keep = LayerwiseMask().select(
                shaped.reshape(-1).float(), torch.ones(sub.d, dtype=torch.bool), sparsity, sub
            )
            with torch.no_grad():
                module.weight.mul_(keep.reshape(module.weight.shape))


def _pipeline(scorer: str = "obs", **schedule):
    config = {
        "scorer": {"name": scorer},
        "schedule": {"name": "oneshot", **schedule},
        "mask": {"name": "layerwise"},
        "prune": {"sparsity": 0.5, "loss_samples": 0},
    }
    if scorer == "obs":
        config["estimator"] = {"name": "sparsegpt", "dtype": "float64", "num_grads": 24}
    else:
        config["scorer"]["num_samples"] = 24
        config["schedule"].setdefault("calibration_samples", 24)
    return Pipeline.from_config(config)


def _assert_same_pruned_model(got, expected):
    layout = select_parameters(expected)
    a, b = layout.gather(got), layout.gather(expected)
    assert torch.equal(a == 0, b == 0), "masks differ"
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_sparsegpt_sequential_equals_the_reference(kind):
    model, blocks = _model(kind)
    reference, _ = _model(kind)
    _pipeline().prune(model, _data(), loss_fn=_loss)  # calibration "auto" → sequential
    _reference(reference, blocks, _data(), sparsity=0.5)
    _assert_same_pruned_model(model, reference)


def test_layer_stages_equal_the_per_layer_reference():
    model, blocks = _model("gpt2")
    reference, _ = _model("gpt2")
    _pipeline(stages="layer").prune(model, _data(), loss_fn=_loss)
    _reference(reference, blocks, _data(), sparsity=0.5, stages="layer")
    _assert_same_pruned_model(model, reference)


def test_wanda_sequential_equals_the_reference():
    model, blocks = _model("gpt2")
    reference, _ = _model("gpt2")
    _pipeline("wanda", calibration="sequential").prune(model, _data(), loss_fn=_loss)
    _reference(reference, blocks, _data(), sparsity=0.5, method="wanda")
    layout = select_parameters(reference)
    assert torch.equal(layout.gather(model) == 0, layout.gather(reference) == 0)


def test_sequential_differs_from_dense_calibration_after_the_first_block():
    sequential, _ = _model("gpt2")
    dense, _ = _model("gpt2")
    _pipeline().prune(sequential, _data(), loss_fn=_loss)
    _pipeline(calibration="dense").prune(dense, _data(), loss_fn=_loss)
    first = "transformer.h.0.mlp.c_fc.weight"
    later = "transformer.h.2.mlp.c_fc.weight"
    p, q = dict(sequential.named_parameters()), dict(dense.named_parameters())
    torch.testing.assert_close(p[first], q[first], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(p[later], q[later])


def test_sequential_is_refused_for_a_loss_based_estimator():
    with pytest.raises(
        ConfigError, match=r"fits the loss's curvature of the whole model.*@ schedule.calibration$"
    ):
        Pipeline.from_config(
            {
                "estimator": {"name": "dense"},
                "scorer": {"name": "obs"},
                "schedule": {"name": "sequential"},
                "mask": {"name": "layerwise"},
                "prune": {"sparsity": 0.5},
            }
        )


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 2])
def test_interrupted_between_stages_resumes_to_identical_masks(stop_after):
    """Kill the prune after a stage (the model is rolled back, the progress was saved), load
    the weights of that moment, resume: the result equals the uninterrupted prune."""
    model, _ = _model("llama")
    uninterrupted, _ = _model("llama")
    _pipeline().prune(uninterrupted, _data(), loss_fn=_loss)
    saved = {}

    def checkpoint(progress):
        if progress.stages_done == stop_after:
            saved["model"] = {k: v.clone() for k, v in model.state_dict().items()}
            saved["progress"] = type(progress).from_state_dict(progress.state_dict())
            raise _Stop

    with pytest.raises(_Stop):
        _pipeline().prune(model, _data(), loss_fn=_loss, on_stage=checkpoint)
    fresh, _ = _model("llama")
    assert not torch.equal(
        fresh.model.layers[0].mlp.up_proj.weight,
        saved["model"]["model.layers.0.mlp.up_proj.weight"],
    )
    fresh.load_state_dict(saved["model"])
    result = _pipeline().prune(fresh, _data(), loss_fn=_loss, resume=saved["progress"])
    layout = select_parameters(uninterrupted)
    assert torch.equal(layout.gather(fresh), layout.gather(uninterrupted))
    assert len(result.steps) == 1 and result.steps[0].sparsity == pytest.approx(0.5)
