"""``storage_dtype``: M-FAC's static G (and Ŵ) held in half precision, computed in ``dtype``.

Storing G in bfloat16/float16 rounds each stored value once when a gradient is stored and once
when Ŵ = C⁻¹G/λ overwrites it; every product reads pieces converted to ``dtype``. So:

* with ``storage_dtype = dtype`` nothing changes, bit for bit;
* against a float64 estimator fed the *already rounded* gradients, the only difference left is
  the rounding of Ŵ: Ŵ̃ = Ŵ + E with |E| ≤ u·|Ŵ| elementwise (u the unit round-off), so
  ‖ΔF⁻¹v‖ = ‖(EᵀŴ + ŴᵀE)v‖ ≤ 2·‖E‖₂·‖Ŵ‖₂·‖v‖ ≤ 2u·‖Ŵ‖_F·‖Ŵ‖₂·‖v‖ ≤ 2u·√m/λ·‖v‖, using
  ŴᵀŴ ⪯ I/λ (F⁻¹ ≻ 0), so ‖Ŵ‖₂ ≤ λ^(-1/2) and ‖Ŵ‖_F ≤ √m·λ^(-1/2). The same bound holds for
  each diagonal entry (v = e_q).
"""

from __future__ import annotations

import math

import pytest
import torch

import curvprune

SIZES = [300, 40, 500]
M = 32
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def _mfac(**options):
    options = {"algorithm": "static", **options}
    return curvprune.create("estimator", "mfac", num_grads=M, fisher_mini_batch=1, damping=1e-2,
                            **options)


def _queries(estimator, rows, probe):
    estimator.setup(SIZES)
    estimator.update(rows)
    return estimator.inverse_diagonal(), estimator.ihvp(probe)


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(M, sum(SIZES), generator=gen) * 0.3
    probe = torch.randn(4, sum(SIZES), generator=gen)
    return rows, probe


@pytest.mark.parametrize("block_size", [None, 64])
def test_storage_in_the_compute_dtype_changes_nothing(data, block_size):
    rows, probe = data
    blocks = {"block_size": block_size, "blocks": "fixed"} if block_size else {"block_size": None}
    plain = _queries(_mfac(**blocks), rows, probe)
    stored = _queries(_mfac(storage_dtype="float32", **blocks), rows, probe)
    for a, b in zip(plain, stored, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
@pytest.mark.parametrize("block_size", [None, 64])
def test_half_storage_error_is_the_rounding_of_w_hat_only(data, storage, block_size):
    rows, probe = data
    blocks = {"block_size": block_size, "blocks": "fixed"} if block_size else {"block_size": None}
    rounded = rows.to(getattr(torch, storage)).double()
    exact_diag, exact_ihvp = _queries(_mfac(dtype="float64", **blocks), rounded, probe.double())
    diag, ihvp = _queries(
        _mfac(dtype="float64", storage_dtype=storage, **blocks), rows.double(), probe.double()
    )
    assert _mfac(storage_dtype=storage).config.storage_torch_dtype == getattr(torch, storage)
    bound = 2 * UNIT_ROUNDOFF[storage] * math.sqrt(M) / 1e-2
    assert (diag - exact_diag).abs().max() <= bound
    err = torch.linalg.vector_norm(ihvp - exact_ihvp, dim=1)
    assert bool((err <= bound * torch.linalg.vector_norm(probe.double(), dim=1)).all())
    # and the rounding is there (the test could fail): stored low is not bit-identical
    assert not torch.equal(diag, exact_diag)


def test_half_storage_halves_the_planned_memory():
    cfg = _mfac(block_size=None).config
    half = _mfac(block_size=None, storage_dtype="bfloat16").config
    est = type(_mfac())
    full_bytes, half_bytes = est.memory_bytes(SIZES, cfg), est.memory_bytes(SIZES, half)
    # the m×m algebra and a query's three d-vectors run in the compute dtype: not halved
    fixed = M * M * (2 * 8 + 4) + 3 * sum(SIZES) * 4
    assert half_bytes - fixed == (full_bytes - fixed) // 2


def test_dynamic_refuses_a_storage_dtype():
    with pytest.raises(curvprune.ConfigError, match="storage_dtype applies to algorithm = 'static'"):
        _mfac(algorithm="dynamic", storage_dtype="bfloat16")
